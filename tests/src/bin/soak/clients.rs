//! The soak's WebSocket clients, four kinds, each checking every frame it reads against the
//! [`Ledger`]:
//!
//! - **stable**: connected for the whole run, never closed; at the end it must hold every
//!   acknowledged message of its channels, with no `history_gone` on the way (Redis restarts
//!   with AOF lose nothing, so the node's own catch-up must replay everything).
//! - **churner**: connects to a random node with 1–3 channels, reads for a while, leaves
//!   (a close frame, or the TCP connection dropped), and comes back resuming with `since`.
//! - **subscriber**: one connection that keeps subscribing (with `since` when it had the
//!   channel before) and unsubscribing, history and live-only channels alike.
//! - **slow**: reads a while, then stops reading while a large-message channel fills its queue,
//!   until the node cuts it off with 4000; then resumes with `since` on another connection.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::ledger::{Ledger, Track};
use crate::report::Report;

type Ws = WebSocketStream<TcpStream>;

/// How long a connection may take to be welcomed (a Redis restart delays welcomes).
const WELCOME_TIMEOUT: Duration = Duration::from_secs(20);

/// What every client shares.
#[derive(Clone)]
pub struct Env {
    /// `ws://127.0.0.1:PORT/ws` of each node.
    pub nodes: Vec<String>,
    /// Each node's admin address (host:port), in the same order.
    pub admin: Vec<String>,
    pub ledger: Arc<Ledger>,
    pub report: Arc<Report>,
    /// The published channels with history.
    pub history: Vec<String>,
    /// The large-message channel slow readers stall on (also published, with history).
    pub fire: String,
    /// Live-only channels nobody publishes to (subscription churn only).
    pub plain: Vec<String>,
}

/// A frame, or the end of the connection (with the close code, if any).
enum Read {
    Frame(Value),
    Closed(Option<u16>),
}

async fn next(ws: &mut Ws) -> Read {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => match serde_json::from_str(text.as_str()) {
                Ok(value) => return Read::Frame(value),
                Err(_) => return Read::Closed(None),
            },
            Some(Ok(Message::Close(frame))) => {
                return Read::Closed(frame.map(|f| u16::from(f.code)))
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Read::Closed(None),
        }
    }
}

/// Open a WebSocket to `node` with `query`; a small receive buffer makes a reader that stops
/// reading fill its node-side queue quickly.
async fn open(node: &str, query: &str, rcvbuf: Option<u32>) -> anyhow::Result<Ws> {
    let authority = node
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .ok_or_else(|| anyhow::anyhow!("bad node URL {node}"))?;
    let socket = TcpSocket::new_v4()?;
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size)?;
    }
    let stream = socket.connect(authority.parse()?).await?;
    let (ws, _) = tokio_tungstenite::client_async(format!("{node}?{query}"), stream).await?;
    Ok(ws)
}

/// One reader's state across its connections: a [`Track`] per channel, the channels it is
/// confirmed on right now, and the last tick.
struct Reader {
    kind: &'static str,
    id: usize,
    env: Env,
    tracks: HashMap<String, Track>,
    confirmed: HashSet<String>,
    /// Subscribes sent and not yet answered: channel → whether `since` was sent.
    pending: HashMap<String, bool>,
    last_tick: Option<(u64, u64)>,
}

impl Reader {
    fn new(kind: &'static str, id: usize, env: &Env) -> Reader {
        Reader {
            kind,
            id,
            env: env.clone(),
            tracks: HashMap::new(),
            confirmed: HashSet::new(),
            pending: HashMap::new(),
            last_tick: None,
        }
    }

    fn fail(&self, what: String) {
        self.env
            .report
            .fail(format!("{} #{}: {what}", self.kind, self.id));
    }

    /// `channels=…&since=…` for `channels`, resuming those it has an offset for.
    fn query(&self, channels: &[String]) -> String {
        let since: Vec<String> = channels
            .iter()
            .filter_map(|c| Some(format!("{c}@{}", self.tracks.get(c)?.since()?)))
            .collect();
        let mut query = format!("channels={}", channels.join(","));
        if !since.is_empty() {
            query.push_str(&format!("&since={}", since.join(",")));
        }
        query
    }

    /// Connect to a node with `channels` (resuming where it can) and read the welcome.
    async fn connect(
        &mut self,
        node: &str,
        channels: &[String],
        rcvbuf: Option<u32>,
    ) -> Option<Ws> {
        let query = self.query(channels);
        let attempt = async {
            let mut ws = open(node, &query, rcvbuf).await?;
            match next(&mut ws).await {
                Read::Frame(welcome) if welcome["type"] == "welcome" => Ok(ws),
                Read::Frame(other) => anyhow::bail!("expected welcome, got {other}"),
                Read::Closed(code) => anyhow::bail!("closed before the welcome ({code:?})"),
            }
        };
        match tokio::time::timeout(WELCOME_TIMEOUT, attempt).await {
            Ok(Ok(ws)) => {
                self.env.report.count("connects");
                self.confirmed.clear();
                self.pending.clear();
                for channel in channels {
                    self.confirm(channel, query.contains(&format!("{channel}@")));
                }
                Some(ws)
            }
            Ok(Err(e)) => {
                self.env.report.count("connect_failed");
                eprintln!("soak: {} #{} connect to {node}: {e}", self.kind, self.id);
                None
            }
            Err(_) => {
                self.env.report.count("connect_failed");
                eprintln!(
                    "soak: {} #{} not welcomed within {WELCOME_TIMEOUT:?}",
                    self.kind, self.id
                );
                None
            }
        }
    }

    /// `channel` is confirmed (welcome or `subscribed`): resumed when `since` was sent,
    /// otherwise every message published from now on is owed.
    fn confirm(&mut self, channel: &str, resumed: bool) {
        self.confirmed.insert(channel.to_owned());
        if !self.env.ledger.has(channel) {
            return;
        }
        let track = self.tracks.entry(channel.to_owned()).or_default();
        if !resumed && track.last.is_none() {
            track.fresh(self.env.ledger.channel(channel).started());
        }
    }

    /// The `subscribe` frame for `channel`: resuming with `since` when it had the channel
    /// before, otherwise afresh (what it owes is decided when `subscribed` arrives).
    fn subscribe(&mut self, channel: &str, id: u64) -> Value {
        let track = self.tracks.entry(channel.to_owned()).or_default();
        let since = track.since().map(str::to_owned);
        self.pending.insert(channel.to_owned(), since.is_some());
        match since {
            Some(since) => {
                json!({"type": "subscribe", "channel": channel, "id": id, "since": since})
            }
            None => {
                track.forget();
                json!({"type": "subscribe", "channel": channel, "id": id})
            }
        }
    }

    /// Check one frame. Err(code) when the connection ended.
    fn frame(&mut self, read: Read) -> Result<(), Option<u16>> {
        let frame = match read {
            Read::Frame(frame) => frame,
            Read::Closed(code) => return Err(code),
        };
        let channel = frame["channel"].as_str().unwrap_or_default().to_owned();
        match frame["type"].as_str().unwrap_or_default() {
            "message" if channel == "ticks" => self.tick(&frame["data"]),
            "message" if self.env.ledger.has(&channel) => {
                if !self.confirmed.contains(&channel) && !self.pending.contains_key(&channel) {
                    // Fanned out just before an unsubscribe took effect.
                    self.env.report.count("late_after_unsubscribe");
                    return Ok(());
                }
                let (Some(n), Some(offset)) =
                    (frame["data"]["n"].as_u64(), frame["offset"].as_str())
                else {
                    self.fail(format!("a message without n or offset: {frame}"));
                    return Ok(());
                };
                let record = self.env.ledger.channel(&channel);
                let track = self.tracks.entry(channel.clone()).or_default();
                if let Err(violation) = track.message(record, n, offset) {
                    self.fail(format!("{channel}: {violation:?}"));
                }
                self.env.report.count("received");
            }
            "message" => self.fail(format!("a message nobody published: {frame}")),
            "error" if frame["code"] == "history_gone" => {
                self.env
                    .report
                    .count(&format!("history_gone_{}", self.kind));
                if self.kind == "stable" {
                    self.fail(format!("history_gone with Redis on AOF: {frame}"));
                }
                if self.env.ledger.has(&channel) {
                    let started = self.env.ledger.channel(&channel).started();
                    self.tracks.entry(channel).or_default().gone(started);
                }
            }
            "subscribed" => {
                if let Some(resumed) = self.pending.remove(&channel) {
                    self.confirm(&channel, resumed);
                }
            }
            "unsubscribed" => {
                self.pending.remove(&channel);
                self.confirmed.remove(&channel);
            }
            "pong" => {}
            _ => self.fail(format!("unexpected frame {frame}")),
        }
        Ok(())
    }

    fn tick(&mut self, data: &Value) {
        let (Some(slot), Some(seq)) = (data["unix_ms"].as_u64(), data["seq"].as_u64()) else {
            self.fail(format!("a malformed tick {data}"));
            return;
        };
        if let Some((last_slot, last_seq)) = self.last_tick {
            if slot <= last_slot || seq <= last_seq {
                self.fail(format!(
                    "tick slot {slot} seq {seq} after slot {last_slot} seq {last_seq}"
                ));
            }
        }
        self.last_tick = Some((slot, seq));
        self.env.report.count("ticks");
    }

    /// Read and check frames until `until`, or `stop`. Err(code) when the connection ended.
    async fn read_until(
        &mut self,
        ws: &mut Ws,
        until: Instant,
        stop: &CancellationToken,
    ) -> Result<(), Option<u16>> {
        loop {
            tokio::select! {
                read = next(ws) => self.frame(read)?,
                () = tokio::time::sleep_until(until) => return Ok(()),
                () = stop.cancelled() => return Ok(()),
            }
        }
    }

    /// Every confirmed channel has all that was acknowledged.
    fn complete(&self) -> bool {
        self.tracks.iter().all(|(channel, track)| {
            !self.confirmed.contains(channel) || track.complete(self.env.ledger.channel(channel))
        })
    }
}

fn pick<'a>(from: &'a [String], rng: &mut impl Rng) -> &'a String {
    &from[rng.random_range(0..from.len())]
}

fn millis(rng: &mut impl Rng, range: std::ops::Range<u64>) -> Duration {
    Duration::from_millis(rng.random_range(range))
}

/// Connected from start to end. Returns once welcomed (`ready`), then reads until `finish`,
/// when it must hold everything acknowledged within 30 s.
pub async fn stable(
    env: Env,
    id: usize,
    channels: Vec<String>,
    ready: tokio::sync::oneshot::Sender<()>,
    finish: CancellationToken,
) {
    let mut reader = Reader::new("stable", id, &env);
    let node = env.nodes[id % env.nodes.len()].clone();
    let Some(mut ws) = reader.connect(&node, &channels, None).await else {
        reader.fail("could not connect".into());
        return;
    };
    let _ = ready.send(());
    let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    if let Err(code) = reader.read_until(&mut ws, far, &finish).await {
        reader.fail(format!("closed during the run ({code:?})"));
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reader.complete() {
        if Instant::now() >= deadline {
            let behind: Vec<String> = reader
                .tracks
                .iter()
                .filter(|(c, t)| !t.complete(env.ledger.channel(c)))
                .map(|(c, t)| {
                    format!(
                        "{c} at {:?} of {}",
                        t.last.as_ref().map(|l| l.0),
                        env.ledger.channel(c).acked()
                    )
                })
                .collect();
            reader.fail(format!("never received the end: {}", behind.join(", ")));
            break;
        }
        let step = Instant::now() + Duration::from_millis(100);
        if let Err(code) = reader
            .read_until(&mut ws, step, &CancellationToken::new())
            .await
        {
            reader.fail(format!("closed at the end ({code:?})"));
            return;
        }
    }
    let _ = ws.close(None).await;
}

/// Connect, read a while, leave, come back resuming; until `stop`.
pub async fn churner(env: Env, id: usize, stop: CancellationToken) {
    let mut reader = Reader::new("churner", id, &env);
    let mut rng = StdRng::from_os_rng();
    while !stop.is_cancelled() {
        let node = pick(&env.nodes, &mut rng).clone();
        let mut channels: Vec<String> = (0..rng.random_range(1..=3))
            .map(|_| pick(&env.history, &mut rng).clone())
            .collect();
        channels.sort();
        channels.dedup();
        let Some(mut ws) = reader.connect(&node, &channels, None).await else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let until = Instant::now() + millis(&mut rng, 300..4000);
        if let Err(code) = reader.read_until(&mut ws, until, &stop).await {
            reader.fail(format!("closed by the node ({code:?})"));
            continue;
        }
        if rng.random_bool(0.8) {
            let _ = ws.close(None).await;
            env.report.count("churn_closed");
        } else {
            env.report.count("churn_dropped");
        }
        drop(ws);
        tokio::time::sleep(millis(&mut rng, 0..300)).await;
    }
}

/// One connection that keeps subscribing and unsubscribing; until `stop`.
pub async fn subscriber(env: Env, id: usize, stop: CancellationToken) {
    let mut reader = Reader::new("subscriber", id, &env);
    let mut rng = StdRng::from_os_rng();
    let mut request = 0u64;
    'connection: while !stop.is_cancelled() {
        let node = env.nodes[id % env.nodes.len()].clone();
        let first = vec![pick(&env.plain, &mut rng).clone()];
        let Some(mut ws) = reader.connect(&node, &first, None).await else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        while !stop.is_cancelled() {
            let held: Vec<String> = reader.confirmed.iter().cloned().collect();
            let frame = if held.len() >= 4 || (held.len() > 1 && rng.random_bool(0.4)) {
                let channel = pick(&held, &mut rng);
                Some(json!({"type": "unsubscribe", "channel": channel}))
            } else {
                let from = if rng.random_bool(0.6) {
                    &env.history
                } else {
                    &env.plain
                };
                let free: Vec<String> = from
                    .iter()
                    .filter(|c| !reader.confirmed.contains(*c) && !reader.pending.contains_key(*c))
                    .cloned()
                    .collect();
                (!free.is_empty()).then(|| {
                    let channel = pick(&free, &mut rng).clone();
                    request += 1;
                    env.report.count("subscribes");
                    reader.subscribe(&channel, request)
                })
            };
            if let Some(frame) = frame {
                if ws.send(Message::text(frame.to_string())).await.is_err() {
                    reader.fail("the connection failed".into());
                    continue 'connection;
                }
            }
            let until = Instant::now() + millis(&mut rng, 200..1000);
            if let Err(code) = reader.read_until(&mut ws, until, &stop).await {
                reader.fail(format!("closed by the node ({code:?})"));
                continue 'connection;
            }
        }
        let _ = ws.close(None).await;
    }
}

/// The node's count of sessions it cut off as slow consumers.
async fn cut_offs(admin: &str) -> f64 {
    crate::sample::metrics(admin).await.map_or(0.0, |m| {
        m.get(r#"gateway_disconnects_total{reason="slow_consumer"}"#)
    })
}

/// Read a while, stall until the node cuts a slow consumer off (at most `stall`), then read
/// what was buffered, which must end with 4000; resume with `since`; until `stop`.
pub async fn slow(env: Env, id: usize, stall: Duration, stop: CancellationToken) {
    let mut reader = Reader::new("slow", id, &env);
    let mut rng = StdRng::from_os_rng();
    let channels = vec![
        env.fire.clone(),
        env.history[id % env.history.len()].clone(),
    ];
    while !stop.is_cancelled() {
        let index = (id + 1) % env.nodes.len();
        let node = env.nodes[index].clone();
        let Some(mut ws) = reader.connect(&node, &channels, Some(4096)).await else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let until = Instant::now() + millis(&mut rng, 1000..3000);
        if let Err(code) = reader.read_until(&mut ws, until, &stop).await {
            reader.fail(format!("closed while reading ({code:?})"));
            continue;
        }
        // Stall: read nothing at all, until the node says it cut a slow consumer off. (A
        // client that stays stalled past the node's close timeout never sees the close frame,
        // which waits behind what the kernel buffers: it would see the connection end.)
        let before = cut_offs(&env.admin[index]).await;
        let stalled = Instant::now() + stall;
        while Instant::now() < stalled && !stop.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if cut_offs(&env.admin[index]).await > before {
                break;
            }
        }
        // Read what was buffered: it ends with the cut-off, or, not cut off, at the live edge.
        let fire = env.ledger.channel(&env.fire);
        let ended = loop {
            let Ok(read) = tokio::time::timeout(Duration::from_secs(2), next(&mut ws)).await else {
                break None;
            };
            let live = matches!(&read, Read::Frame(f) if f["channel"] == env.fire.as_str()
                && f["data"]["n"].as_u64() >= Some(fire.started().saturating_sub(1)));
            if let Err(code) = reader.frame(read) {
                break Some(code);
            }
            if live {
                break None;
            }
        };
        match ended {
            Some(Some(4000)) => env.report.count("slow_cut_off_4000"),
            Some(code) => reader.fail(format!("closed with {code:?}, not 4000")),
            None => {
                env.report.count("slow_not_cut_off");
                let _ = ws.close(None).await;
            }
        }
    }
}
