//! One client session's life, whatever carries it: subscriptions at connect, the welcome
//! frame, then one task that selects over the transport (client frames), the outbox
//! (fan-out), the heartbeat and the node's shutdown, and finally the close code and the
//! cleanup. [`transport`] says what a carrier must do; [`ws`] (WebSocket) and [`sse`]
//! (Server-Sent Events plus POSTed client frames) are the two carriers. Nothing here knows
//! which one it drives.
//!
//! A session is exactly one task. The writer drains the whole outbox per wake-up and writes
//! it with `feed` + one `flush`, so frames queued together leave in one `write()`. Every write
//! is guarded: a client that stops reading cannot pin the task, because overflow of its
//! outbox, the heartbeat deadline and shutdown all interrupt the write.

pub mod sse;
pub mod transport;
pub mod ws;

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::auth::{self, Grant, Permissions};
use crate::bus::{BusError, History, Live};
use crate::hub::{SessionId, Subscribed, Unsubscribed};
use crate::metrics::{frame_type, reason};
use crate::node::{Node, SessionCommand};
use crate::outbox::{signal, Frame, Outbox};
use crate::protocol::{self, close, ClientFrame, Offset};
use transport::{End, Inbound, Transport};

/// How long a closing session waits for its close frame to be written and answered.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the client asked for in the upgrade request, already validated where it could be.
pub struct Params {
    /// The session's id, told to the client in its welcome (and, for SSE, the address of its
    /// `POST /sse/{session}`).
    pub uuid: uuid::Uuid,
    pub client_id: String,
    /// Channels named in the query (not yet validated); empty = `default_channels`.
    pub channels: Vec<String>,
    pub peer: SocketAddr,
    /// The `since` query parameter (not yet parsed): `channel@offset,…` to resume from.
    pub since: Option<Box<str>>,
    /// What the token allows; None when auth is off. Boxed: the session's future keeps its
    /// arguments for its whole life, and idle memory per session is a budget.
    pub grant: Option<Box<Grant>>,
}

/// A token bucket for client publishes (and for frames that earn an error).
struct Bucket {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
    /// Frames refused while the bucket was empty, since it was last full.
    strikes: u32,
}

impl Bucket {
    fn new(rate: f64, burst: u32) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            last: Instant::now(),
            rate,
            burst: f64::from(burst),
            strikes: 0,
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= self.burst {
            self.strikes = 0;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.strikes += 1;
            false
        }
    }
}

struct Session {
    node: Arc<Node>,
    id: SessionId,
    uuid: uuid::Uuid,
    /// `user:<client_id>`; the client id is its suffix.
    personal: Arc<str>,
    outbox: Arc<Outbox>,
    /// Channels this session is subscribed to in the hub, the personal one included.
    /// A Vec, not a set: at most `max_subscriptions` + 1 entries, and an idle session's
    /// memory matters more than a linear scan on subscribe.
    channels: Vec<Arc<str>>,
    /// Created at the first publish (or refused frame): most sessions never publish.
    bucket: Option<Box<Bucket>>,
    /// When the client was last heard from ([`now_ms`]): 8 bytes, not an `Instant`'s 16.
    last_seen: u64,
    /// The token's `exp` (seconds since the Unix epoch); 0 = auth off, no expiry.
    exp: u64,
    /// The token's `channels` / `publish` claims; None when it carried neither (or auth is
    /// off), so an idle session pays one word for them.
    permissions: Option<Box<Permissions>>,
    /// While live frames may duplicate a replay (docs/REFERENCE.md §5): per recovered
    /// channel, the last offset written from history. None (one word) for every session that
    /// is not recovering.
    recovered: Option<Box<Watermarks>>,
    /// Replies that wait for the bus: the welcome and `subscribed` are sent only once their
    /// channels are live on this node. None (one word) for a session not waiting.
    pending: Option<Box<Pending>>,
}

/// What a session waits for from the bus.
#[derive(Default)]
struct Pending {
    /// The welcome, until every connect-time channel is live. While it waits the session
    /// reads no client frame and writes no queued message, so the welcome comes first.
    welcome: Option<Welcome>,
    waits: Vec<Wait>,
}

/// The welcome frame and what follows it, held until the connect-time channels are live.
struct Welcome {
    joined: Vec<String>,
    refused: Vec<(String, (&'static str, String))>,
    since: Option<Box<str>>,
}

/// One channel not yet live on this node, and what to do when it is.
struct Wait {
    channel: Box<str>,
    live: tokio::sync::oneshot::Receiver<Live>,
    then: Then,
}

enum Then {
    /// Part of the welcome.
    Welcome,
    /// Answer a `subscribe` (with its request id), then replay from `since` if given.
    Subscribe {
        id: Option<Box<RawValue>>,
        since: Option<Offset>,
        /// The session joined the channel with this `subscribe` (it was not subscribed
        /// already): until it is told `subscribed`, the channel's frames are not its own.
        joined: bool,
    },
}

/// Boxed behind one pointer in [`Session`]; a Vec itself would cost three words.
#[derive(Default)]
struct Watermarks(Vec<Watermark>);

/// The last history entry replayed on `channel`: live frames of that channel at or before it
/// are duplicates. Dropped at the first newer live frame (pub/sub keeps the stream's order).
struct Watermark {
    channel: Box<str>,
    offset: Offset,
}

/// Milliseconds since the process's first call: a session's clock, in one word.
fn now_ms() -> u64 {
    static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
    EPOCH.elapsed().as_millis() as u64
}

/// Run a session to its end on transport `t`. Called by the upgrade handler (WebSocket) or
/// the `/sse` handler; returns when the connection is done.
///
/// `params` is boxed, and this is not an `async fn`: each async function keeps its arguments
/// in its future for the whole connection, and idle memory per session is a budget.
pub fn run<T: Transport>(
    t: T,
    node: Arc<Node>,
    params: Box<Params>,
) -> impl Future<Output = ()> + Send {
    // Debug level: an enabled span costs a few hundred bytes per session, so it exists only
    // when someone asks for session logs (RUST_LOG=gateway=debug).
    let span = tracing::debug_span!("session", client_id = %params.client_id, peer = %params.peer, transport = T::KIND);
    if span.is_disabled() {
        // Skip the span's enter/exit on every poll when nobody listens, and keep no span in
        // every session's future.
        futures_util::future::Either::Left(run_session(t, node, params))
    } else {
        // Boxed: otherwise every session's future would hold room for the span.
        futures_util::future::Either::Right(Box::pin(tracing::Instrument::instrument(
            run_session(t, node, params),
            span,
        )))
    }
}

/// Refuse a connection that was opened only so that the client can read why: close with
/// `code` and `message` as the reason at once, before any subscription.
pub async fn refuse<T: Transport>(mut t: T, node: Arc<Node>, refusal: (u16, &'static str, String)) {
    let (code, why, message) = refusal;
    tracing::debug!(code, reason = why, %message, transport = T::KIND, "connection refused");
    node.metrics
        .disconnects
        .with_label_values(&[why, T::KIND])
        .inc();
    // Short: a refused client gets no more of the node's time than it takes to say why.
    let _ = timeout(
        Duration::from_secs(1),
        t.close(code, close_reason(&message)),
    )
    .await;
}

/// A close frame's reason is at most 123 bytes.
fn close_reason(message: &str) -> &str {
    let mut end = message.len().min(123);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// `params` is boxed: an async function keeps its arguments in its future for its whole
/// life, and this one lives as long as the connection.
async fn run_session<T: Transport>(mut t: T, node: Arc<Node>, params: Box<Params>) {
    // Boxed: it lives as long as the session, whose future is kept small.
    let _slot = match node.connection_slot(params.peer.ip(), T::KIND) {
        Ok(slot) => Box::new(slot),
        Err((code, why)) => {
            Box::pin(finish(t, End::Close(code, why), node.metrics.clone())).await;
            return;
        }
    };
    node.metrics
        .connections_total
        .with_label_values(&[T::KIND])
        .inc();
    // Moved out whole, so the box is freed here rather than kept (partly moved) for the
    // session's life.
    let Params {
        uuid,
        client_id,
        channels,
        since,
        grant,
        ..
    } = unbox(params);
    let (exp, permissions) = match grant {
        Some(grant) => {
            let Grant {
                exp, permissions, ..
            } = *grant;
            (exp, permissions)
        }
        None => (0, None),
    };
    let mut session = Session {
        id: node.next_session_id(),
        uuid,
        personal: protocol::personal_channel(&client_id).into(),
        outbox: t.outbox().clone(),
        channels: Vec::new(),
        bucket: None,
        last_seen: now_ms(),
        exp,
        permissions,
        recovered: None,
        pending: None,
        node,
    };
    tracing::debug!(session = %session.uuid, "session open");
    session.node.register(session.id, &session.outbox);
    drop(client_id);
    let end = match Box::pin(session.open(&mut t, channels, since)).await {
        Ok(()) => session.serve(&mut t).await,
        Err(end) => end,
    };
    // Leave the hub first: nothing more is queued for a session that is closing.
    session.cleanup();
    let metrics = session.node.metrics.clone();
    Box::pin(finish(t, end, metrics)).await;
}

/// The value of `b`, whose allocation is freed on return.
#[expect(
    clippy::boxed_local,
    reason = "taking the box is the point: it is freed here"
)]
fn unbox<T>(b: Box<T>) -> T {
    *b
}

/// Count how the session ended and close the connection accordingly.
async fn finish<T: Transport>(mut t: T, end: End, metrics: crate::metrics::Metrics) {
    match end {
        End::Close(code, why) => {
            tracing::debug!(code, reason = why, "closing session");
            metrics.disconnects.with_label_values(&[why, T::KIND]).inc();
            let _ = timeout(CLOSE_TIMEOUT, t.close(code, close_text(why))).await;
        }
        End::Gone(why) => {
            tracing::debug!(reason = why, "session ended");
            metrics.disconnects.with_label_values(&[why, T::KIND]).inc();
            t.gone().await;
        }
    }
}

/// The close frame's reason for a session ended for `why` (a `gateway_disconnects_total`
/// reason): what happened, in words, like the reasons of refused connections ("token
/// expired", "origin … is not allowed"), not the metric's label.
fn close_text(why: &'static str) -> &'static str {
    match why {
        reason::SHUTDOWN => "node is draining",
        reason::SLOW_CONSUMER => "slow consumer: the outbound queue overflowed",
        reason::HEARTBEAT_TIMEOUT => "no pong within the heartbeat timeout",
        reason::RATE_LIMITED => "kept publishing past the rate limit",
        reason::MESSAGE_TOO_BIG => "message larger than limits.max_message_bytes",
        reason::PROTOCOL_ERROR => "websocket protocol error",
        reason::BINARY_FRAME => "binary frames are not part of this protocol",
        reason::INVALID_UTF8 => "text frame is not valid UTF-8",
        reason::MAX_CONNECTIONS => "node is at limits.max_connections",
        reason::MAX_CONNECTIONS_PER_IP => "too many connections from this address",
        reason::TOKEN_EXPIRED => "token expired",
        reason::DISCONNECTED => "disconnected by the server",
        other => other,
    }
}

// === impl Session ===

impl Session {
    /// Connect-time subscriptions (the personal channel, then what the query named), then
    /// the welcome frame and an error frame per refused channel: at once when every channel
    /// is live on this node, otherwise once they are (the serve loop waits for them).
    async fn open<T: Transport>(
        &mut self,
        t: &mut T,
        requested: Vec<String>,
        since: Option<Box<str>>,
    ) -> Result<(), End> {
        // Subscriptions at connect: the personal channel, then what the query named. Room
        // for exactly those: most sessions never subscribe to more.
        let defaults = requested.is_empty();
        let requested = if defaults {
            self.node.config.default_channels.clone()
        } else {
            requested
        };
        self.channels.reserve_exact(1 + requested.len());
        let mut refused = Vec::new();
        let personal = self.personal.to_string();
        if let Err(e) = self.add_channel(self.personal.clone()) {
            refused.push((personal.clone(), e));
        }
        let mut joined = Vec::new();
        for channel in requested {
            // The client did not ask for the defaults: skip those its token does not allow.
            if defaults && self.check_subscribe(&channel).is_err() {
                continue;
            }
            match self.check_subscribe(&channel) {
                Ok(()) => match self.add_channel(channel.as_str().into()) {
                    Ok(_) => joined.push(channel),
                    Err(e) => refused.push((channel, e)),
                },
                Err(e) => refused.push((channel, e)),
            }
        }
        let welcome = Welcome {
            joined,
            refused,
            since,
        };
        let mut waits: Vec<Wait> = std::iter::once(personal)
            .chain(welcome.joined.iter().cloned())
            .filter_map(|channel| {
                let live = self.node.bus.live(&channel)?;
                Some(Wait {
                    channel: channel.into(),
                    live,
                    then: Then::Welcome,
                })
            })
            .collect();
        if waits.is_empty() {
            return self.welcome(t, welcome).await;
        }
        tracing::debug!(waiting = waits.len(), "welcome waits for the bus");
        waits.shrink_to_fit();
        self.pending = Some(Box::new(Pending {
            welcome: Some(welcome),
            waits,
        }));
        Ok(())
    }

    /// Send the welcome, the refusals of connect-time channels, and the replays asked for
    /// with `since`.
    async fn welcome<T: Transport>(&mut self, t: &mut T, welcome: Welcome) -> Result<(), End> {
        let Welcome {
            joined,
            refused,
            since,
        } = welcome;
        let frame = protocol::welcome_frame(
            &self.uuid.to_string(),
            self.client_id(),
            &self.node.node_name,
            &joined,
        );
        self.send(t, frame).await?;
        for (channel, (code, message)) in refused {
            let frame = protocol::error_frame(code, &message, Some(&channel), None);
            self.send(t, frame).await?;
        }
        // Resume: `since` applies to the channels joined above; pairs naming others are
        // ignored. The memory bus keeps no history, so there `since` is ignored altogether.
        let Some(since) = since.filter(|_| self.node.bus.keeps_history()) else {
            return Ok(());
        };
        for pair in protocol::parse_since_param(&since) {
            match pair {
                Ok((channel, offset)) if joined.contains(&channel) => {
                    self.recover(t, &channel, offset, None).await?;
                }
                Ok(_) => {}
                Err(pair) => {
                    let message = format!("`since` wants channel@offset pairs, got `{pair}`");
                    let frame = protocol::error_frame("bad_since", &message, None, None);
                    self.send(t, frame).await?;
                }
            }
        }
        Ok(())
    }

    /// A channel this session waited for is live: answer what waited for it.
    async fn on_live<T: Transport>(
        &mut self,
        t: &mut T,
        (index, at): (usize, Option<Offset>),
    ) -> Result<(), End> {
        let Some(pending) = self.pending.as_deref_mut() else {
            return Ok(());
        };
        let Wait { channel, then, .. } = pending.waits.swap_remove(index);
        let welcome_done = matches!(then, Then::Welcome)
            && !pending
                .waits
                .iter()
                .any(|w| matches!(w.then, Then::Welcome));
        let welcome = if welcome_done {
            pending.welcome.take()
        } else {
            None
        };
        if pending.waits.is_empty() && pending.welcome.is_none() {
            self.pending = None;
        }
        // Messages the node caught up before this session was told are not its own.
        if let Some(at) = at {
            self.watermark(&channel, at);
        }
        match then {
            Then::Subscribe { id, since, .. } => {
                if !self.channels.iter().any(|c| **c == *channel) {
                    // Unsubscribed meanwhile (and answered then).
                    return Ok(());
                }
                let frame = protocol::ack_frame("subscribed", &channel, id.as_deref());
                self.send(t, frame).await?;
                match since {
                    Some(since) => self.recover(t, &channel, since, id.as_deref()).await,
                    None => Ok(()),
                }
            }
            Then::Welcome => {
                let Some(welcome) = welcome else {
                    return Ok(());
                };
                self.last_seen = now_ms();
                self.welcome(t, welcome).await?;
                // Server unsubscribes that arrived while the welcome waited.
                self.on_commands(t).await?;
                // Nothing queued was written while the welcome waited.
                let mut batch = VecDeque::new();
                if !self.outbox.take(&mut batch) {
                    return Err(End::Close(close::SLOW_CONSUMER, reason::SLOW_CONSUMER));
                }
                self.write_batch(t, &mut batch).await
            }
        }
    }

    /// Before writing `batch` while subscribes wait for the bus: answer those whose channel
    /// became live meanwhile (their watermark then drops what the node caught up before the
    /// session was told), and drop the frames of channels the session joined and was not told
    /// `subscribed` for yet. The node hands a channel's catch-up to the hub before it tells
    /// the waiting sessions, so without this a session could write those frames ahead of its
    /// `subscribed` and of its own `since` replay: duplicates, out of order. Nothing it is
    /// owed is lost: what is owed starts with `subscribed`, and a `since` replay covers what
    /// came before.
    async fn before_joined<T: Transport>(
        &mut self,
        t: &mut T,
        batch: &mut VecDeque<Frame>,
    ) -> Result<(), End> {
        while let Some(live) = ready_live(&mut self.pending) {
            self.on_live(t, live).await?;
        }
        let Some(pending) = self.pending.as_deref() else {
            return Ok(());
        };
        let joining: Vec<&str> = pending
            .waits
            .iter()
            .filter(|w| matches!(w.then, Then::Subscribe { joined: true, .. }))
            .map(|w| &*w.channel)
            .collect();
        if !joining.is_empty() {
            batch.retain(|frame| {
                protocol::frame_channel(frame.text()).is_none_or(|c| !joining.contains(&c))
            });
        }
        Ok(())
    }

    /// Whether the welcome has not been sent yet.
    fn awaiting_welcome(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| p.welcome.is_some())
    }

    /// Drop queued live frames of `channel` at or before `offset` until the first newer one.
    fn watermark(&mut self, channel: &str, offset: Offset) {
        let watermarks = &mut self.recovered.get_or_insert_with(Default::default).0;
        watermarks.retain(|w| &*w.channel != channel);
        watermarks.push(Watermark {
            channel: channel.into(),
            offset,
        });
    }

    /// Replay `channel` after `since` (docs/REFERENCE.md §5). The session is already subscribed in the
    /// hub, so live frames queue in its outbox meanwhile; they are written after the replay,
    /// minus those the replay already covered (see [`Watermark`]). An offset that cannot be
    /// resumed from gets `history_gone`, and the channel continues live.
    async fn recover<T: Transport>(
        &mut self,
        t: &mut T,
        channel: &str,
        since: Offset,
        id: Option<&RawValue>,
    ) -> Result<(), End> {
        let limit = self.node.config.history.max_replay;
        // The replay is held in memory until written: it counts against the session's
        // bounded queue.
        let budget = self.node.config.limits.send_queue_bytes;
        let read = match self.node.bus.history(channel, &since, limit, budget).await {
            Ok(History::Replay(entries)) => Ok(entries),
            Ok(History::Gone(why)) => Err(why),
            Err(e) => Err(format!("history could not be read: {e}")),
        };
        let entries = match read {
            Ok(entries) => entries,
            Err(why) => {
                t.forget(channel);
                let frame = protocol::error_frame("history_gone", &why, Some(channel), id);
                return self.send(t, frame).await;
            }
        };
        let last = match entries.last() {
            Some((offset, _)) => Offset::parse(offset).unwrap_or(since),
            None => since,
        };
        let write = async {
            for (offset, payload) in &entries {
                let frame = protocol::message_frame(channel, payload, Some(offset));
                t.feed(Frame::new(frame, Instant::now())).await?;
            }
            t.flush().await
        };
        self.guarded(write).await?;
        self.watermark(channel, last);
        Ok(())
    }

    /// Drop live frames that a replay already delivered; forget a channel's watermark at its
    /// first newer frame.
    fn drop_replayed(&mut self, batch: &mut VecDeque<Frame>) {
        let Some(Watermarks(watermarks)) = self.recovered.as_deref_mut() else {
            return;
        };
        batch.retain(|frame| {
            let Some((channel, offset)) = protocol::message_identity(frame.text()) else {
                return true;
            };
            let Some(i) = watermarks.iter().position(|w| &*w.channel == channel) else {
                return true;
            };
            let mark = &watermarks[i].offset;
            match Offset::parse(offset) {
                Some(o) if o.epoch == mark.epoch && o.id <= mark.id => false,
                _ => {
                    watermarks.swap_remove(i);
                    true
                }
            }
        });
        if watermarks.is_empty() {
            self.recovered = None;
        }
    }

    /// The steady state: one select loop until the session ends. Its future lives as long as
    /// the connection, so it stays small: everything rare (client frames, pings, the start
    /// and the close) runs in a boxed future that exists only while it runs.
    async fn serve<T: Transport>(&mut self, t: &mut T) -> End {
        loop {
            let welcomed = !self.awaiting_welcome();
            // The steady state (nothing to hold back, filter or order): the hub writes to the
            // socket itself while the session waits. Whatever wakes the session turns that
            // off first, so the session's own frames and the queue keep their order.
            let steady = welcomed && self.pending.is_none() && self.recovered.is_none();
            self.outbox.set_direct(steady);
            tokio::select! {
                // First: a channel that became live is answered before its queued messages.
                biased;
                live = next_live(&mut self.pending) => {
                    self.outbox.set_direct(false);
                    if let Err(end) = Box::pin(self.on_live(t, live)).await {
                        return end;
                    }
                }
                _ = self.outbox.ready() => {
                    self.outbox.set_direct(false);
                    let signals = self.outbox.take_signals();
                    if signals != 0 {
                        if let Err(end) = Box::pin(self.on_signals(t, signals)).await {
                            return end;
                        }
                    }
                    if !welcomed {
                        // Queued frames wait for the welcome (`on_live` writes them).
                        continue;
                    }
                    // Boxed: a backlog is the slow path (a waiting session's frames are
                    // written by the fan-out itself), and the write's future would otherwise
                    // be part of every idle session's memory.
                    if let Err(end) = Box::pin(self.write_queued(t)).await {
                        return end;
                    }
                }
                msg = t.recv(), if welcomed => {
                    self.outbox.set_direct(false);
                    let text = match self.on_message(msg) {
                        Ok(Some(text)) => text,
                        Ok(None) => continue,
                        Err(end) => return end,
                    };
                    if let Err(end) = Box::pin(self.on_text(t, text.as_str())).await {
                        return end;
                    }
                }
            }
        }
    }

    /// Write what the outbox queued (and what the fan-out left owed), in order, after
    /// answering subscribes that became live and dropping what a replay covered.
    async fn write_queued<T: Transport>(&mut self, t: &mut T) -> Result<(), End> {
        let mut batch = VecDeque::new();
        if !self.outbox.take(&mut batch) {
            return Err(End::Close(close::SLOW_CONSUMER, reason::SLOW_CONSUMER));
        }
        if self.pending.is_some() {
            self.before_joined(t, &mut batch).await?;
        }
        self.write_batch(t, &mut batch).await
    }

    /// Act on the node's signals: drain (1001), or heartbeat (ping, or 4001 when the client
    /// has been silent for `ping_timeout_ms`).
    async fn on_signals<T: Transport>(&mut self, t: &mut T, signals: u8) -> Result<(), End> {
        if signals & signal::SHUTDOWN != 0 {
            return Err(End::Close(close::GOING_AWAY, reason::SHUTDOWN));
        }
        if signals & signal::COMMAND != 0 {
            self.on_commands(t).await?;
        }
        if signals & signal::BEAT != 0 {
            if self.awaiting_welcome() {
                // Client frames (pongs included) are not read until the welcome: only the
                // token's expiry holds meanwhile.
                self.check_expiry()?;
            } else {
                self.check_heartbeat()?;
            }
            self.guarded(t.ping()).await?;
            if T::PING_PROVES_LIFE {
                self.last_seen = now_ms();
            }
        }
        Ok(())
    }

    /// The session's deadlines, checked on every node heartbeat: the client's silence
    /// (4001) and the token's expiry (4401).
    fn check_heartbeat(&self) -> Result<(), End> {
        let silent = Duration::from_millis(now_ms().saturating_sub(self.last_seen));
        if silent >= self.node.config.ping_timeout() {
            return Err(End::Close(
                close::HEARTBEAT_TIMEOUT,
                reason::HEARTBEAT_TIMEOUT,
            ));
        }
        self.check_expiry()
    }

    /// 4401 once the token has expired. Checked on each heartbeat and each client frame (no
    /// timer per session), so a session outlives its token by at most
    /// `heartbeat.ping_interval_ms`, and never acts on an expired one.
    fn check_expiry(&self) -> Result<(), End> {
        if self.exp != 0 && auth::now_secs() >= self.exp {
            Err(End::Close(close::UNAUTHORIZED, reason::TOKEN_EXPIRED))
        } else {
            Ok(())
        }
    }

    /// Write one batch of queued frames: feed them all, flush once.
    async fn write_batch<T: Transport>(
        &mut self,
        t: &mut T,
        batch: &mut VecDeque<Frame>,
    ) -> Result<(), End> {
        self.drop_replayed(batch);
        let write = async {
            for frame in batch.iter() {
                t.feed(frame.clone()).await?;
            }
            t.flush().await
        };
        self.guarded(write).await?;
        let now = Instant::now();
        for frame in batch.drain(..) {
            self.node
                .metrics
                .delivery_latency
                .observe(now.saturating_duration_since(frame.born).as_secs_f64());
        }
        Ok(())
    }

    /// Run a write, interrupted by outbox overflow, shutdown or the heartbeat deadline
    /// (checked on each node heartbeat, so a session owns no timer).
    async fn guarded(&mut self, write: impl Future<Output = Result<(), End>>) -> Result<(), End> {
        tokio::pin!(write);
        loop {
            tokio::select! {
                r = &mut write => return r,
                _ = self.outbox.interrupted() => {
                    if self.outbox.overflowed() {
                        return Err(End::Close(close::SLOW_CONSUMER, reason::SLOW_CONSUMER));
                    }
                    let signals = self.outbox.take_signals();
                    if signals & signal::SHUTDOWN != 0 {
                        return Err(End::Close(close::GOING_AWAY, reason::SHUTDOWN));
                    }
                    if signals & signal::COMMAND != 0 {
                        // Acted on once the write is done (the loop's next wake-up).
                        self.outbox.restore_signals(signal::COMMAND);
                    }
                    // A heartbeat while blocked: no ping (the client is not reading anyway),
                    // but the deadline holds.
                    self.check_heartbeat()?;
                }
            }
        }
    }

    async fn send<T: Transport>(&mut self, t: &mut T, text: String) -> Result<(), End> {
        self.guarded(t.send(Frame::new(text, Instant::now()))).await
    }

    fn client_id(&self) -> &str {
        &self.personal[protocol::PERSONAL_PREFIX.len()..]
    }

    /// Classify what the socket gave: a text frame to handle, nothing to do, or the end.
    fn on_message(&mut self, msg: Inbound) -> Result<Option<Utf8Bytes>, End> {
        if let Inbound::Lost(end) = msg {
            return Err(end);
        }
        self.last_seen = now_ms();
        self.check_expiry()?;
        match msg {
            Inbound::Text(text) => Ok(Some(text)),
            Inbound::Seen => Ok(None),
            Inbound::Refused(end) | Inbound::Lost(end) => Err(end),
        }
    }

    /// Handle one client frame; Err ends the session.
    async fn on_text<T: Transport>(&mut self, t: &mut T, text: &str) -> Result<(), End> {
        let frames = &self.node.metrics.client_frames;
        let frame = match protocol::parse_client_frame(text) {
            Ok(frame) => frame,
            Err(e) => {
                frames.with_label_values(&[frame_type::INVALID]).inc();
                self.charge()?;
                let reply = protocol::error_frame(
                    e.code(),
                    &e.to_string(),
                    None,
                    protocol::salvage_id(text),
                );
                return self.send(t, reply).await;
            }
        };
        let reply = match frame {
            ClientFrame::Subscribe { channel, id, since } => {
                frames.with_label_values(&[frame_type::SUBSCRIBE]).inc();
                return self.on_subscribe(t, channel, id, since).await;
            }
            ClientFrame::Unsubscribe { channel, id } => {
                frames.with_label_values(&[frame_type::UNSUBSCRIBE]).inc();
                if *channel != *self.personal {
                    t.forget(&channel);
                }
                for reply in self.on_unsubscribe(&channel, id) {
                    self.send(t, reply).await?;
                }
                None
            }
            ClientFrame::Publish { channel, data, id } => {
                frames.with_label_values(&[frame_type::PUBLISH]).inc();
                self.on_publish(&channel, data, id).await?
            }
            ClientFrame::Ping { id } => {
                frames.with_label_values(&[frame_type::PING]).inc();
                Some(protocol::pong_frame(id))
            }
            ClientFrame::Refresh { token, id } => {
                frames.with_label_values(&[frame_type::REFRESH]).inc();
                Some(self.on_refresh(&token, id)?)
            }
            ClientFrame::Presence { channel, id } => {
                frames.with_label_values(&[frame_type::PRESENCE]).inc();
                Some(self.on_presence(&channel, id).await?)
            }
        };
        match reply {
            Some(reply) => self.send(t, reply).await,
            None => Ok(()),
        }
    }

    /// Spend a token for a publish or a refused frame; a client that keeps going with an
    /// empty bucket is closed with 4029.
    fn charge(&mut self) -> Result<bool, End> {
        let limits = &self.node.config.limits;
        // A bucket made now is as full as one made at connect and never used.
        let bucket = self.bucket.get_or_insert_with(|| {
            Box::new(Bucket::new(limits.publish_rate, limits.publish_burst))
        });
        if bucket.take() {
            return Ok(true);
        }
        if bucket.strikes > limits.publish_burst {
            return Err(End::Close(close::RATE_LIMITED, reason::RATE_LIMITED));
        }
        Ok(false)
    }

    /// A new token for the same client: the session lives until its `exp`, under its claims
    /// (for what the session does next; subscriptions already made stay). A bad one gets
    /// `bad_token` and changes nothing: the session still ends at the old `exp`.
    fn on_refresh(&mut self, token: &str, id: Option<&RawValue>) -> Result<String, End> {
        // Verifying costs a signature check: refreshes are rate limited like publishes.
        if !self.charge()? {
            return Ok(protocol::error_frame(
                "rate_limited",
                "refresh rate limit exceeded; slow down",
                None,
                id,
            ));
        }
        let Some(verifier) = &self.node.verifier else {
            return Ok(protocol::error_frame(
                "bad_token",
                "authentication is not enabled on this node",
                None,
                id,
            ));
        };
        match verifier.verify(token) {
            Ok(grant) if grant.sub == self.client_id() => {
                self.exp = grant.exp;
                self.permissions = grant.permissions;
                Ok(protocol::refreshed_frame(id))
            }
            Ok(_) => Ok(protocol::error_frame(
                "bad_token",
                "the token is for another client (`sub`)",
                None,
                id,
            )),
            Err(e) => Ok(protocol::error_frame("bad_token", &e.to_string(), None, id)),
        }
    }

    /// Whether this session may subscribe to `channel` at all.
    fn check_subscribe(&self, channel: &str) -> Result<(), (&'static str, String)> {
        if !protocol::valid_channel(channel) {
            return Err((
                "bad_channel",
                "invalid channel name: 1-128 chars of A-Z a-z 0-9 _ - . : @".to_owned(),
            ));
        }
        if *channel == *self.personal {
            return Ok(());
        }
        if channel.starts_with(protocol::PERSONAL_PREFIX) {
            return Err(("forbidden", format!("cannot subscribe to {channel}")));
        }
        let allowed = self
            .permissions
            .as_ref()
            .and_then(|p| p.channels.as_deref());
        if allowed.is_some_and(|patterns| !auth::allowed(patterns, channel)) {
            return Err((
                "forbidden",
                format!("the token does not allow subscribing to {channel}"),
            ));
        }
        Ok(())
    }

    /// Subscribe in the hub (and through the bus when first on this node). Ok(false) when
    /// the session already had the channel.
    fn add_channel(&mut self, channel: Arc<str>) -> Result<bool, (&'static str, String)> {
        if self.channels.contains(&channel) {
            return Ok(false);
        }
        let max = self.node.config.limits.max_subscriptions;
        // The personal channel does not count against the limit.
        if *channel != *self.personal && self.channels.len() > max {
            return Err((
                "too_many_subscriptions",
                format!("at most {max} subscriptions per session"),
            ));
        }
        if self.node.hub.subscribe(&channel, self.id, &self.outbox) == Subscribed::First {
            self.node.bus.want(&channel);
        }
        self.node
            .presence
            .join(&channel, self.uuid, self.client_id());
        self.channels.push(channel);
        Ok(true)
    }

    /// Who is in a presence channel: for a session subscribed to it, or whose token's
    /// `channels` claim allows it (docs/REFERENCE.md §8).
    async fn on_presence(&mut self, channel: &str, id: Option<&RawValue>) -> Result<String, End> {
        // Each answer costs a Redis read: rate limited like publishes.
        if !self.charge()? {
            let message = "presence rate limit exceeded; slow down";
            return Ok(protocol::error_frame(
                "rate_limited",
                message,
                Some(channel),
                id,
            ));
        }
        if !self.node.presence.applies(channel) {
            let message = format!("{channel} is not a presence channel (presence_channels)");
            return Ok(protocol::error_frame(
                "not_presence",
                &message,
                Some(channel),
                id,
            ));
        }
        let subscribed = self.channels.iter().any(|c| &**c == channel);
        let claimed = self
            .permissions
            .as_ref()
            .and_then(|p| p.channels.as_deref())
            .is_some_and(|patterns| auth::allowed(patterns, channel));
        if !subscribed && !claimed {
            let message = format!("subscribe to {channel} to see who is in it");
            return Ok(protocol::error_frame(
                "forbidden",
                &message,
                Some(channel),
                id,
            ));
        }
        Ok(match self.node.presence.list(channel).await {
            Ok(clients) => protocol::presence_frame(channel, &clients, id),
            Err(e) => {
                tracing::debug!(error = %e, "presence read failed");
                let message = "presence could not be read: the message bus (Redis) is unavailable; try again later";
                protocol::error_frame("presence_failed", message, Some(channel), id)
            }
        })
    }

    /// Commands the node queued for this session (the server API's, through `control`).
    async fn on_commands<T: Transport>(&mut self, t: &mut T) -> Result<(), End> {
        let commands = self.node.take_commands(self.id);
        if commands.contains(&SessionCommand::Disconnect) {
            return Err(End::Close(close::DISCONNECTED, reason::DISCONNECTED));
        }
        if self.awaiting_welcome() {
            // Nothing but the welcome may come first: unsubscribes wait for it (`on_live`).
            self.node.requeue_commands(self.id, commands);
            return Ok(());
        }
        for command in commands {
            if let SessionCommand::Unsubscribe(channel) = command {
                let waiting = self
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.waits.iter().any(|w| w.channel == channel));
                let subscribed = self.channels.iter().any(|c| **c == *channel);
                if (subscribed || waiting) && *channel != *self.personal {
                    t.forget(&channel);
                    for reply in self.on_unsubscribe(&channel, None) {
                        self.send(t, reply).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Subscribe, answer `subscribed` (or an error), then replay from `since` if given.
    async fn on_subscribe<T: Transport>(
        &mut self,
        t: &mut T,
        channel: String,
        id: Option<&RawValue>,
        since: Option<String>,
    ) -> Result<(), End> {
        // The memory bus keeps no history: `since` is ignored there.
        let since = since.filter(|_| self.node.bus.keeps_history());
        let offset = match since.as_deref().map(|s| Offset::parse(s).ok_or(s)) {
            None => None,
            Some(Ok(offset)) => Some(offset),
            Some(Err(bad)) => {
                self.charge()?;
                let message = format!(
                    "`since` must be an offset from a message frame, got `{}`",
                    bad.chars().take(64).collect::<String>()
                );
                let frame = protocol::error_frame("bad_since", &message, Some(&channel), id);
                return self.send(t, frame).await;
            }
        };
        let added = self
            .check_subscribe(&channel)
            .and_then(|()| self.add_channel(channel.as_str().into()));
        let added = match added {
            Ok(added) => added,
            Err((code, message)) => {
                let frame = protocol::error_frame(code, &message, Some(&channel), id);
                return self.send(t, frame).await;
            }
        };
        // Already subscribed: it is live (or will be), and what a replay would hold was
        // already delivered.
        let since = offset.filter(|_| added);
        let Some(live) = self.node.bus.live(&channel) else {
            self.send(t, protocol::ack_frame("subscribed", &channel, id))
                .await?;
            return match since {
                Some(since) => self.recover(t, &channel, since, id).await,
                None => Ok(()),
            };
        };
        // Not live on this node yet (Redis unreachable, or being caught up): answer when it
        // is, and serve the session meanwhile.
        let pending = self.pending.get_or_insert_with(Default::default);
        if pending.waits.len() > self.node.config.limits.max_subscriptions {
            let message = "too many subscriptions waiting for the bus";
            let frame =
                protocol::error_frame("too_many_subscriptions", message, Some(&channel), id);
            return self.send(t, frame).await;
        }
        pending.waits.push(Wait {
            channel: channel.into(),
            live,
            then: Then::Subscribe {
                id: id.map(ToOwned::to_owned),
                since,
                joined: added,
            },
        });
        Ok(())
    }

    /// Leave `channel`; the replies, in order.
    fn on_unsubscribe(&mut self, channel: &str, id: Option<&RawValue>) -> Vec<String> {
        if *channel == *self.personal {
            return vec![protocol::error_frame(
                "forbidden",
                "the personal channel cannot be unsubscribed",
                Some(channel),
                id,
            )];
        }
        if let Some(i) = self.channels.iter().position(|c| &**c == channel) {
            self.channels.swap_remove(i);
            self.remove_from_hub(channel);
        }
        // A subscribe still waiting for the bus ends here: it is answered `unsubscribed`.
        let mut replies = Vec::new();
        if let Some(pending) = self.pending.as_deref_mut() {
            pending.waits.retain_mut(|w| {
                if &*w.channel != channel {
                    return true;
                }
                if let Then::Subscribe { id, .. } = &w.then {
                    replies.push(protocol::ack_frame("unsubscribed", channel, id.as_deref()));
                }
                false
            });
            if pending.waits.is_empty() && pending.welcome.is_none() {
                self.pending = None;
            }
        }
        if let Some(Watermarks(watermarks)) = self.recovered.as_deref_mut() {
            watermarks.retain(|w| &*w.channel != channel);
            if watermarks.is_empty() {
                self.recovered = None;
            }
        }
        replies.push(protocol::ack_frame("unsubscribed", channel, id));
        replies
    }

    fn remove_from_hub(&self, channel: &str) {
        self.node
            .presence
            .leave(channel, self.uuid, self.client_id());
        if self.node.hub.unsubscribe(channel, self.id) == Unsubscribed::Last {
            self.node.bus.release(channel);
        }
    }

    async fn on_publish(
        &mut self,
        channel: &str,
        data: &RawValue,
        id: Option<&RawValue>,
    ) -> Result<Option<String>, End> {
        if !self.charge()? {
            return Ok(Some(protocol::error_frame(
                "rate_limited",
                "publish rate limit exceeded; slow down",
                Some(channel),
                id,
            )));
        }
        // A token's `publish` claim replaces `client_publish` for its session (auth.rs).
        let permitted = match self.permissions.as_ref().and_then(|p| p.publish.as_deref()) {
            Some(patterns) => auth::allowed(patterns, channel),
            None => protocol::any_matches(&self.node.config.client_publish, channel),
        };
        if !permitted {
            return Ok(Some(protocol::error_frame(
                "forbidden",
                &format!("clients may not publish to {channel}"),
                Some(channel),
                id,
            )));
        }
        Ok(
            match self.node.bus.publish(channel, data.get().as_bytes()).await {
                // Acknowledge only requests that carry an id: nobody waits for the others.
                Ok(()) => id.map(|id| protocol::published_frame(channel, Some(id))),
                Err(e) => Some(protocol::error_frame(
                    "publish_failed",
                    publish_failure(&e),
                    Some(channel),
                    id,
                )),
            },
        )
    }

    fn cleanup(&mut self) {
        self.node.unregister(self.id);
        let dropped = self.outbox.close();
        if dropped > 0 {
            self.node
                .metrics
                .messages_dropped
                .with_label_values(&[reason::SESSION_CLOSED])
                .inc_by(dropped as u64);
        }
        for channel in std::mem::take(&mut self.channels) {
            self.remove_from_hub(&channel);
        }
    }
}

/// What a client is told when its publish failed, in the product's words: the bus error's own
/// text comes from the Redis client or its pool and means nothing to a client.
fn publish_failure(e: &BusError) -> &'static str {
    match e {
        BusError::Unavailable(_) => {
            "not published: the message bus (Redis) is unavailable; try again later"
        }
        BusError::Timeout => {
            "the message bus (Redis) did not answer in time; the message may not have been published"
        }
    }
}

/// The first of the session's waits whose channel became live: its index and the node's
/// position then. Never completes for a session that waits for nothing. Cancel-safe.
fn next_live(
    pending: &mut Option<Box<Pending>>,
) -> impl Future<Output = (usize, Option<Offset>)> + '_ {
    std::future::poll_fn(move |cx| {
        let Some(pending) = pending.as_deref_mut() else {
            return std::task::Poll::Pending;
        };
        for (i, wait) in pending.waits.iter_mut().enumerate() {
            if let std::task::Poll::Ready(live) = std::pin::Pin::new(&mut wait.live).poll(cx) {
                // A dropped sender (the bus is shutting down) ends the wait too.
                return std::task::Poll::Ready((i, live.ok().and_then(|Live(at)| at)));
            }
        }
        std::task::Poll::Pending
    })
}

/// A wait whose channel is live already, as [`next_live`] would complete with it, without
/// waiting.
fn ready_live(pending: &mut Option<Box<Pending>>) -> Option<(usize, Option<Offset>)> {
    use tokio::sync::oneshot::error::TryRecvError;
    let pending = pending.as_deref_mut()?;
    pending
        .waits
        .iter_mut()
        .enumerate()
        .find_map(|(i, wait)| match wait.live.try_recv() {
            Ok(Live(at)) => Some((i, at)),
            Err(TryRecvError::Closed) => Some((i, None)),
            Err(TryRecvError::Empty) => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use crate::config::Config;
    use crate::hub::Hub;
    use crate::metrics::Metrics;
    use crate::session::ws::Ws;
    use tokio_util::sync::CancellationToken;

    /// An idle session is its task: the future tokio keeps for it, in a cell with tokio's
    /// header and trailer (104 bytes) rounded up to a multiple of 128. Up to 408 bytes the
    /// cell is 512 bytes; 8 more and every session pays 640 (measured with heaptrack). A local
    /// variable that lives across an `.await` of `run_session` is enough to cross the line.
    #[tokio::test]
    async fn an_idle_sessions_future_fits_a_512_byte_task_cell() {
        let config = Config::default();
        let metrics = Metrics::new();
        let hub = Arc::new(Hub::new(metrics.clone()));
        let bus = Bus::start(
            &config,
            hub.clone(),
            metrics.clone(),
            CancellationToken::new(),
        );
        let node = Arc::new(Node::new(
            config,
            "n".into(),
            hub,
            bus,
            metrics,
            None,
            String::new(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let socket = listener.accept().await.unwrap().0;
        let ws = Ws::new(socket, Vec::new(), Default::default(), 1 << 20);
        let params = Box::new(Params {
            uuid: uuid::Uuid::new_v4(),
            client_id: "c".into(),
            channels: Vec::new(),
            peer: "127.0.0.1:1".parse().unwrap(),
            since: None,
            grant: None,
        });
        let future = run(ws, node, params);
        let size = std::mem::size_of_val(&future);
        assert!(size <= 408, "the session future grew to {size} bytes");
    }
}
