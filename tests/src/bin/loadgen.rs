//! `loadgen`: a load generator for gateway clusters, loopback only, bounded in count and time.
//!
//! Opens N WebSocket connections spread over the given gateway URLs (connection i subscribes
//! to `bench-{i % K}` through the `channels` query), publishes R messages/s in total to Redis
//! round-robin over the K channels for S seconds, and reports what arrived: lost, duplicated,
//! latency percentiles (publish → receive), and for the given PIDs their RSS and the CPU
//! seconds they used while publishing, from which it derives deliveries per CPU-second.
//!
//! The client side is a minimal WebSocket reader (raw TCP, no tungstenite) so that the load
//! generator spends as little of the shared machine's CPU as possible per delivery. With
//! `--sse` the same sessions are opened over Server-Sent Events instead (`ws://host/ws` →
//! `GET http://host/sse`), read by an equally minimal event-stream reader.
//!
//! ```text
//! loadgen --url ws://127.0.0.1:8080/ws,ws://127.0.0.1:8081/ws --redis redis://127.0.0.1:6379 \
//!         --connections 2000 --channels 20 --rate 2000 --duration 10 --payload 100 --pids 123,456
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::json;
use tests::{parse_server_frame, redis};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser, Clone)]
#[command(
    name = "loadgen",
    about = "Load generator for gateway clusters (loopback only)"
)]
struct Args {
    /// Gateway WebSocket URLs, comma-separated (ws://127.0.0.1:PORT/ws).
    #[arg(long, value_delimiter = ',', required = true)]
    url: Vec<String>,
    /// Redis to publish to; with `--cluster`, the seed nodes of a Redis Cluster,
    /// comma-separated. Their CPU time is reported too.
    #[arg(long, value_delimiter = ',', default_value = "redis://127.0.0.1:6379")]
    redis: Vec<String>,
    /// Publish with SPUBLISH through a Redis Cluster client (the gateways' cluster mode).
    #[arg(long)]
    cluster: bool,
    /// Redis channel prefix the gateways use.
    #[arg(long, default_value = "")]
    prefix: String,
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Number of channels (`bench-0` … `bench-{K-1}`).
    #[arg(long, default_value_t = 10)]
    channels: usize,
    /// Messages per second in total; 0 = only connect (idle memory measurement).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of publishing (at most 300).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Payload size in bytes (padding added to reach it).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Concurrent connection attempts.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// PIDs (gateway processes) to measure RSS and CPU of, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// Seconds to hold idle connections before measuring RSS (with --rate 0).
    #[arg(long, default_value_t = 2)]
    settle: u64,
    /// How long to wait after publishing for stragglers, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    drain_ms: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Open the sessions over Server-Sent Events (`/sse` of the same hosts) instead of
    /// WebSocket.
    #[arg(long)]
    sse: bool,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// Per-connection results, merged at the end.
#[derive(Default)]
struct ConnStats {
    received: u64,
    duplicates: u64,
    out_of_order: u64,
    /// Close code the server sent, if it closed us.
    closed_with: Option<u16>,
}

struct Shared {
    latency: Mutex<Histogram<u64>>,
    received: AtomicU64,
    stats: Mutex<Vec<ConnStats>>,
    closes: Mutex<HashMap<String, u64>>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.duration <= 300, "--duration is bounded to 300 s");
    for url in &args.url {
        let host = url
            .trim_start_matches("ws://")
            .split(['/', ':'])
            .next()
            .unwrap_or_default();
        anyhow::ensure!(
            host == "localhost" || host.starts_with("127.") || host == "[" || host == "[::1]",
            "loadgen only targets loopback addresses, not {url}"
        );
    }
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let shared = Arc::new(Shared {
        latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        received: AtomicU64::new(0),
        stats: Mutex::new(Vec::new()),
        closes: Mutex::new(HashMap::new()),
    });
    let rss_before: Vec<u64> = args.pids.iter().map(|p| rss_kib(*p)).collect();

    // Connect.
    let connect_started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency));
    let mut connecting = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let url = args.url[i % args.url.len()].clone();
        let channel = format!("bench-{}", i % args.channels.max(1));
        let gate = gate.clone();
        let sse = args.sse;
        connecting.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.ok()?;
            let t = Instant::now();
            let conn =
                tokio::time::timeout(Duration::from_secs(10), Conn::connect(&url, &channel, sse))
                    .await;
            match conn {
                Ok(Ok(conn)) => Some((conn, t.elapsed())),
                _ => None,
            }
        }));
    }
    let mut conns = Vec::new();
    let mut connect_times = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut failed = 0usize;
    for c in connecting {
        match c.await.ok().flatten() {
            Some((conn, took)) => {
                connect_times.record(took.as_micros().max(1) as u64).ok();
                conns.push(conn);
            }
            None => failed += 1,
        }
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    let made = conns.len();
    eprintln!("loadgen: {made} connected, {failed} failed in {connect_secs:.1} s");

    // Every connection's welcome frame means its subscription is in place.
    let stop = CancellationToken::new();
    let mut readers = Vec::with_capacity(made);
    for conn in conns {
        let shared = shared.clone();
        let stop = stop.clone();
        readers.push(tokio::spawn(conn.read_loop(shared, stop)));
    }
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let rss_connected: Vec<u64> = args.pids.iter().map(|p| rss_kib(*p)).collect();

    let mut published = 0u64;
    let redis_cpu_before = redis_cpu_secs(&args.redis).await;
    let cpu_before: Vec<f64> = args.pids.iter().map(|p| cpu_secs(*p)).collect();
    let publish_started = Instant::now();
    if args.rate > 0 {
        // The publisher gets its own thread and runtime, so that thousands of busy reader
        // tasks cannot make it fall behind its rate.
        let publish_args = args.clone();
        published = tokio::task::spawn_blocking(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(publish(&publish_args))
        })
        .await??;
    }
    let publish_secs = publish_started.elapsed().as_secs_f64();
    // Wait for in-flight deliveries.
    let expected = expected_deliveries(&args, made, published);
    let drain_deadline = Instant::now() + Duration::from_millis(args.drain_ms);
    while shared.received.load(Ordering::Relaxed) < expected && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu_after: Vec<f64> = args.pids.iter().map(|p| cpu_secs(*p)).collect();
    let redis_cpu = redis_cpu_secs(&args.redis).await - redis_cpu_before;
    let window_secs = publish_started.elapsed().as_secs_f64();
    let rss_after: Vec<u64> = args.pids.iter().map(|p| rss_kib(*p)).collect();
    stop.cancel();
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
    }

    let stats = std::mem::take(&mut *shared.stats.lock().unwrap());
    let received: u64 = stats.iter().map(|s| s.received).sum();
    let duplicates: u64 = stats.iter().map(|s| s.duplicates).sum();
    let out_of_order: u64 = stats.iter().map(|s| s.out_of_order).sum();
    let closed: u64 = stats.iter().filter(|s| s.closed_with.is_some()).count() as u64;
    let unique = received - duplicates;
    let lost = expected.saturating_sub(unique);
    let hist = shared.latency.lock().unwrap().clone();
    let cpu: Vec<f64> = cpu_after
        .iter()
        .zip(&cpu_before)
        .map(|(a, b)| a - b)
        .collect();
    let cpu_total: f64 = cpu.iter().sum();
    let ms = |v: u64| v as f64 / 1000.0;
    let report = json!({
        "connections": {"requested": args.connections, "made": made, "failed": failed,
            "transport": if args.sse { "sse" } else { "ws" },
            "connect_secs": connect_secs,
            "connect_ms_p50": ms(connect_times.value_at_quantile(0.5)),
            "connect_ms_p99": ms(connect_times.value_at_quantile(0.99)),
            "closed_by_server": closed,
            "close_codes": *shared.closes.lock().unwrap()},
        "publish": {"rate": args.rate, "seconds": publish_secs, "published": published,
            "channels": args.channels, "payload_bytes": args.payload},
        "deliveries": {"expected": expected, "received": received, "lost": lost,
            "duplicates": duplicates, "out_of_order": out_of_order,
            "per_second": received as f64 / window_secs.max(0.001)},
        "latency_ms": {"p50": ms(hist.value_at_quantile(0.5)), "p90": ms(hist.value_at_quantile(0.9)),
            "p99": ms(hist.value_at_quantile(0.99)), "p999": ms(hist.value_at_quantile(0.999)),
            "max": ms(hist.max()), "samples": hist.len()},
        "gateways": {"pids": args.pids, "rss_kib_before": rss_before, "rss_kib_connected": rss_connected,
            "rss_kib_after": rss_after,
            "rss_per_connection_bytes": per_connection_bytes(&rss_before, &rss_connected, made),
            "cpu_secs": cpu, "cpu_secs_total": cpu_total, "window_secs": window_secs,
            "deliveries_per_cpu_sec": if cpu_total > 0.0 { received as f64 / cpu_total } else { 0.0 }},
        "redis": {"nodes": args.redis.len(), "cluster": args.cluster, "cpu_secs": redis_cpu,
            "cpu_us_per_message": if published > 0 { redis_cpu * 1e6 / published as f64 } else { 0.0 }},
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&report);
    }
    Ok(())
}

fn per_connection_bytes(before: &[u64], after: &[u64], conns: usize) -> f64 {
    if conns == 0 {
        return 0.0;
    }
    let delta: i64 = after
        .iter()
        .zip(before)
        .map(|(a, b)| *a as i64 - *b as i64)
        .sum();
    delta as f64 * 1024.0 / conns as f64
}

fn expected_deliveries(args: &Args, made: usize, published: u64) -> u64 {
    // Channel c gets published/K (± 1) messages and has ceil((made - c) / K) subscribers.
    let k = args.channels.max(1) as u64;
    (0..k)
        .map(|c| {
            let msgs = published / k + u64::from(c < published % k);
            let subs = (made as u64).saturating_sub(c).div_ceil(k);
            msgs * subs
        })
        .sum()
}

/// The CPU time (user + system, seconds) the Redis servers at `urls` have used, from their
/// `INFO CPU`; servers that cannot be asked count 0.
async fn redis_cpu_secs(urls: &[String]) -> f64 {
    let mut total = 0.0;
    for url in urls {
        let Ok(client) = redis::Client::open(url.as_str()) else {
            continue;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            continue;
        };
        let info: String = redis::cmd("INFO")
            .arg("CPU")
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        total += info
            .lines()
            .filter(|l| l.starts_with("used_cpu_sys:") || l.starts_with("used_cpu_user:"))
            .filter_map(|l| l.split_once(':')?.1.trim().parse::<f64>().ok())
            .sum::<f64>();
    }
    total
}

/// Where the publisher sends: one Redis (pipelined PUBLISH) or a cluster (SPUBLISH, each
/// routed to its channel's shard, concurrently).
enum Sink {
    One(redis::aio::MultiplexedConnection),
    /// The cluster connection, and the primary (host, port) that owns each channel, so that
    /// each tick sends one pipeline per shard, as batched as the single Redis's.
    Cluster(redis::cluster_async::ClusterConnection, Vec<(String, u16)>),
}

/// The primary that owns each of `channels`, from `CLUSTER SLOTS` and `CLUSTER KEYSLOT`.
async fn owners(
    conn: &mut redis::cluster_async::ClusterConnection,
    channels: &[String],
) -> anyhow::Result<Vec<(String, u16)>> {
    use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
    let random = || RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
    let slots = conn
        .route_command(redis::cmd("CLUSTER").arg("SLOTS").clone(), random())
        .await?;
    let redis::Value::Array(ranges) = slots else {
        anyhow::bail!("unexpected CLUSTER SLOTS reply");
    };
    let mut table = Vec::new();
    for range in ranges {
        let redis::Value::Array(fields) = range else {
            continue;
        };
        let int = |v: &redis::Value| match v {
            redis::Value::Int(i) => Some(*i),
            _ => None,
        };
        let (Some(start), Some(end)) = (int(&fields[0]), int(&fields[1])) else {
            continue;
        };
        let redis::Value::Array(owner) = &fields[2] else {
            continue;
        };
        let host = match &owner[0] {
            redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            _ => continue,
        };
        let Some(port) = int(&owner[1]) else { continue };
        table.push((start, end, host, port as u16));
    }
    let mut out = Vec::with_capacity(channels.len());
    for channel in channels {
        let slot = conn
            .route_command(
                redis::cmd("CLUSTER").arg("KEYSLOT").arg(channel).clone(),
                random(),
            )
            .await?;
        let redis::Value::Int(slot) = slot else {
            anyhow::bail!("unexpected CLUSTER KEYSLOT reply");
        };
        let (_, _, host, port) = table
            .iter()
            .find(|(a, b, _, _)| *a <= slot && slot <= *b)
            .ok_or_else(|| anyhow::anyhow!("no owner for slot {slot}"))?;
        out.push((host.clone(), *port));
    }
    Ok(out)
}

async fn publish(args: &Args) -> anyhow::Result<u64> {
    let mut sink = if args.cluster {
        let client = redis::cluster::ClusterClient::new(args.redis.clone())?;
        let mut conn = client.get_async_connection().await?;
        let names: Vec<String> = (0..args.channels.max(1))
            .map(|c| format!("{}bench-{c}", args.prefix))
            .collect();
        let owners = owners(&mut conn, &names).await?;
        Sink::Cluster(conn, owners)
    } else {
        let client = redis::Client::open(args.redis[0].as_str())?;
        Sink::One(client.get_multiplexed_async_connection().await?)
    };
    let k = args.channels.max(1);
    let mut seqs = vec![0u64; k];
    let tick = Duration::from_millis(5);
    let per_tick = args.rate as f64 * tick.as_secs_f64();
    let started = tokio::time::Instant::now();
    let end = started + Duration::from_secs(args.duration);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0u64;
    let mut owed = 0f64;
    let mut channel = 0usize;
    while tokio::time::Instant::now() < end {
        interval.tick().await;
        owed += per_tick;
        let n = owed.floor() as u64;
        owed -= n as f64;
        if n == 0 {
            continue;
        }
        let mut messages = Vec::with_capacity(n as usize);
        for _ in 0..n {
            seqs[channel] += 1;
            let head = format!(r#"{{"seq":{},"t":{},"p":""#, seqs[channel], now_us());
            let pad = "x".repeat(args.payload.saturating_sub(head.len() + 2));
            messages.push((
                channel,
                format!("{}bench-{channel}", args.prefix),
                format!("{head}{pad}\"}}"),
            ));
            channel = (channel + 1) % k;
        }
        match &mut sink {
            Sink::One(conn) => {
                let mut pipe = redis::pipe();
                for (_, key, payload) in &messages {
                    pipe.cmd("PUBLISH").arg(key).arg(payload).ignore();
                }
                pipe.query_async::<()>(conn).await?;
            }
            Sink::Cluster(conn, owners) => {
                // One pipeline per shard, sent to its primary, concurrently.
                let mut per_node: HashMap<(String, u16), redis::Pipeline> = HashMap::new();
                let mut counts: HashMap<(String, u16), usize> = HashMap::new();
                for (c, key, payload) in &messages {
                    let owner = owners[*c].clone();
                    per_node
                        .entry(owner.clone())
                        .or_default()
                        .cmd("SPUBLISH")
                        .arg(key)
                        .arg(payload);
                    *counts.entry(owner).or_default() += 1;
                }
                let sends = per_node.into_iter().map(|(owner, pipe)| {
                    let mut conn = conn.clone();
                    let count = counts[&owner];
                    async move {
                        let (host, port) = owner;
                        conn.route_pipeline(
                            pipe,
                            0,
                            count,
                            redis::cluster_routing::SingleNodeRoutingInfo::ByAddress { host, port },
                        )
                        .await
                    }
                });
                for result in futures_util::future::join_all(sends).await {
                    result?;
                }
            }
        }
        sent += n;
    }
    Ok(sent)
}

// === the two transports ===

enum Conn {
    Ws(WsConn),
    Sse(SseConn),
}

impl Conn {
    async fn connect(url: &str, channel: &str, sse: bool) -> anyhow::Result<Conn> {
        Ok(match sse {
            false => Conn::Ws(WsConn::connect(url, channel).await?),
            true => Conn::Sse(SseConn::connect(url, channel).await?),
        })
    }

    async fn read_loop(self, shared: Arc<Shared>, stop: CancellationToken) {
        match self {
            Conn::Ws(c) => c.read_loop(shared, stop).await,
            Conn::Sse(c) => c.read_loop(shared, stop).await,
        }
    }
}

/// Count one message frame's text: received, duplicate or out of order, and its latency.
fn count(frame: &[u8], stats: &mut ConnStats, last_seq: &mut u64, latencies: &mut Vec<u64>) {
    if let Some((seq, t)) = seq_and_time(frame) {
        stats.received += 1;
        latencies.push(now_us().saturating_sub(t).max(1));
        if seq <= *last_seq {
            stats.duplicates += 1;
        } else {
            if seq != *last_seq + 1 && *last_seq != 0 {
                stats.out_of_order += 1;
            }
            *last_seq = seq;
        }
    }
}

fn finish_conn(shared: &Shared, stats: ConnStats, latencies: &mut Vec<u64>) {
    flush_latencies(shared, latencies);
    if let Some(code) = stats.closed_with {
        *shared
            .closes
            .lock()
            .unwrap()
            .entry(code.to_string())
            .or_default() += 1;
    }
    shared.stats.lock().unwrap().push(stats);
}

// === a minimal SSE client ===

struct SseConn {
    stream: TcpStream,
    /// Raw (chunked) body bytes read past the welcome.
    leftover: Vec<u8>,
}

/// Decode the complete chunks at the start of `raw` into `body`; returns the bytes consumed,
/// and whether the last chunk (size 0) was seen.
fn dechunk(raw: &[u8], body: &mut Vec<u8>) -> (usize, bool) {
    let mut at = 0;
    loop {
        let Some(line) = raw[at..].windows(2).position(|w| w == b"\r\n") else {
            return (at, false);
        };
        let size = std::str::from_utf8(&raw[at..at + line])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 {
            return (raw.len(), true);
        }
        let start = at + line + 2;
        if raw.len() < start + size + 2 {
            return (at, false);
        }
        body.extend_from_slice(&raw[start..start + size]);
        at = start + size + 2;
    }
}

impl SseConn {
    async fn connect(url: &str, channel: &str) -> anyhow::Result<SseConn> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| anyhow::anyhow!("ws:// URLs only (their hosts get /sse)"))?;
        let authority = rest.split_once('/').map_or(rest, |(a, _)| a);
        let mut stream = TcpStream::connect(authority).await?;
        stream.set_nodelay(true)?;
        let request = format!("GET /sse?channels={channel} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        let mut body = Vec::new();
        loop {
            let n = stream.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "closed before the welcome");
            buf.extend_from_slice(&chunk[..n]);
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            anyhow::ensure!(buf.starts_with(b"HTTP/1.1 200"), "stream refused");
            let mut raw = buf.split_off(end + 4);
            // Wait for the welcome event (the subscription is then in place).
            loop {
                let (used, ended) = dechunk(&raw, &mut body);
                raw.drain(..used);
                anyhow::ensure!(!ended, "stream ended before the welcome");
                if let Some(e) = body.windows(2).position(|w| w == b"\n\n") {
                    let event = std::str::from_utf8(&body[..e])?;
                    anyhow::ensure!(
                        event.contains(r#""type":"welcome""#),
                        "expected welcome, got {event}"
                    );
                    // Events after the welcome are not expected before the publishing starts.
                    return Ok(SseConn {
                        stream,
                        leftover: raw,
                    });
                }
                let n = stream.read(&mut chunk).await?;
                anyhow::ensure!(n > 0, "closed before the welcome");
                raw.extend_from_slice(&chunk[..n]);
            }
        }
    }

    async fn read_loop(mut self, shared: Arc<Shared>, stop: CancellationToken) {
        let mut stats = ConnStats::default();
        let mut last_seq = 0u64;
        let mut reported = 0u64;
        let mut latencies: Vec<u64> = Vec::new();
        let mut raw = std::mem::take(&mut self.leftover);
        let mut body: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        'outer: loop {
            let (used, ended) = dechunk(&raw, &mut body);
            raw.drain(..used);
            let mut at = 0;
            while let Some(end) = body[at..].windows(2).position(|w| w == b"\n\n") {
                let event = &body[at..at + end];
                if event.starts_with(b"event: close") {
                    stats.closed_with = seq_after(event, b"\"code\":").map(|c| c as u16);
                    break 'outer;
                }
                count(event, &mut stats, &mut last_seq, &mut latencies);
                at += end + 2;
            }
            body.drain(..at);
            if ended {
                break;
            }
            shared
                .received
                .fetch_add(stats.received - reported, Ordering::Relaxed);
            reported = stats.received;
            if latencies.len() >= 4096 {
                flush_latencies(&shared, &mut latencies);
            }
            let n = tokio::select! {
                r = self.stream.read(&mut chunk) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
                _ = stop.cancelled() => break,
            };
            raw.extend_from_slice(&chunk[..n]);
        }
        shared
            .received
            .fetch_add(stats.received - reported, Ordering::Relaxed);
        finish_conn(&shared, stats, &mut latencies);
    }
}

/// The number after `key` in `text`.
fn seq_after(text: &[u8], key: &[u8]) -> Option<u64> {
    let at = text.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = text[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&text[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

// === a minimal WebSocket client ===

struct WsConn {
    stream: TcpStream,
    /// Bytes read past the handshake.
    leftover: Vec<u8>,
}

impl WsConn {
    async fn connect(url: &str, channel: &str) -> anyhow::Result<WsConn> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| anyhow::anyhow!("ws:// URLs only"))?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut stream = TcpStream::connect(authority).await?;
        stream.set_nodelay(true)?;
        let request = format!(
            "GET /{path}?channels={channel} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        // Read the 101 head and the welcome frame.
        loop {
            let n = stream.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "closed during handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                anyhow::ensure!(buf.starts_with(b"HTTP/1.1 101"), "upgrade refused");
                let mut rest = buf.split_off(end + 4);
                // Wait for the welcome frame (the subscription is then in place).
                while parse_server_frame(&rest).is_none() {
                    let n = stream.read(&mut chunk).await?;
                    anyhow::ensure!(n > 0, "closed before welcome");
                    rest.extend_from_slice(&chunk[..n]);
                }
                let (frame_len, opcode, payload) = parse_server_frame(&rest).unwrap();
                anyhow::ensure!(opcode == 1, "expected a text frame");
                let text = std::str::from_utf8(payload)?;
                anyhow::ensure!(
                    text.contains(r#""type":"welcome""#),
                    "expected welcome, got {text}"
                );
                rest.drain(..frame_len);
                return Ok(WsConn {
                    stream,
                    leftover: rest,
                });
            }
        }
    }

    async fn read_loop(mut self, shared: Arc<Shared>, stop: CancellationToken) {
        let mut stats = ConnStats::default();
        let mut last_seq = 0u64;
        let mut reported = 0u64;
        let mut latencies: Vec<u64> = Vec::new();
        let mut buf = std::mem::take(&mut self.leftover);
        let mut chunk = vec![0u8; 16 * 1024];
        'outer: loop {
            // Consume complete frames.
            let mut at = 0;
            while let Some((len, opcode, payload)) = parse_server_frame(&buf[at..]) {
                match opcode {
                    1 => count(payload, &mut stats, &mut last_seq, &mut latencies),
                    8 => {
                        let code = (payload.len() >= 2)
                            .then(|| u16::from_be_bytes([payload[0], payload[1]]));
                        stats.closed_with = Some(code.unwrap_or(1005));
                        break 'outer;
                    }
                    9 => {
                        // Ping: answer with a masked pong carrying the same payload.
                        let pong = masked_frame(0xA, payload);
                        if self.stream.write_all(&pong).await.is_err() {
                            break 'outer;
                        }
                    }
                    _ => {}
                }
                at += len;
            }
            buf.drain(..at);
            // Progress for the drain wait.
            shared
                .received
                .fetch_add(stats.received - reported, Ordering::Relaxed);
            reported = stats.received;
            if latencies.len() >= 4096 {
                flush_latencies(&shared, &mut latencies);
            }
            let n = tokio::select! {
                r = self.stream.read(&mut chunk) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
                _ = stop.cancelled() => break,
            };
            buf.extend_from_slice(&chunk[..n]);
        }
        finish_conn(&shared, stats, &mut latencies);
    }
}

fn flush_latencies(shared: &Shared, latencies: &mut Vec<u64>) {
    let mut h = shared.latency.lock().unwrap();
    for l in latencies.drain(..) {
        let _ = h.record(l);
    }
}

fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut out = vec![0x80 | opcode, 0x80 | payload.len().min(125) as u8];
    out.extend_from_slice(&mask);
    out.extend(
        payload
            .iter()
            .take(125)
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4]),
    );
    out
}

/// Pull `"seq":N` and `"t":N` out of a message frame without a JSON parser.
fn seq_and_time(frame: &[u8]) -> Option<(u64, u64)> {
    Some((seq_after(frame, b"\"seq\":")?, seq_after(frame, b"\"t\":")?))
}

// === /proc readings ===

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 here.
    (ticks(11) + ticks(12)) / 100.0
}

fn print_human(r: &serde_json::Value) {
    let c = &r["connections"];
    let d = &r["deliveries"];
    let l = &r["latency_ms"];
    let g = &r["gateways"];
    println!(
        "connections: {} made, {} failed, {:.1} s (connect p50 {} ms, p99 {} ms), closed by server: {} {}",
        c["made"], c["failed"], c["connect_secs"].as_f64().unwrap_or(0.0), c["connect_ms_p50"], c["connect_ms_p99"],
        c["closed_by_server"], c["close_codes"]
    );
    println!(
        "published: {} in {:.1} s; deliveries expected {}, received {}, lost {}, duplicates {}, out of order {}",
        r["publish"]["published"], r["publish"]["seconds"].as_f64().unwrap_or(0.0), d["expected"], d["received"],
        d["lost"], d["duplicates"], d["out_of_order"]
    );
    println!(
        "delivered/s: {:.0}",
        d["per_second"].as_f64().unwrap_or(0.0)
    );
    println!(
        "latency ms: p50 {} p90 {} p99 {} p99.9 {} max {}",
        l["p50"], l["p90"], l["p99"], l["p999"], l["max"]
    );
    println!(
        "gateways: rss KiB before {} connected {} after {}; {:.0} B/connection; cpu s {} ({:.2} total) → {:.0} deliveries per CPU-second",
        g["rss_kib_before"], g["rss_kib_connected"], g["rss_kib_after"],
        g["rss_per_connection_bytes"].as_f64().unwrap_or(0.0), g["cpu_secs"],
        g["cpu_secs_total"].as_f64().unwrap_or(0.0), g["deliveries_per_cpu_sec"].as_f64().unwrap_or(0.0)
    );
    let redis = &r["redis"];
    println!(
        "redis: {} node(s){}; cpu s {:.2} → {:.1} µs per published message",
        redis["nodes"],
        if redis["cluster"] == true {
            " (cluster)"
        } else {
            ""
        },
        redis["cpu_secs"].as_f64().unwrap_or(0.0),
        redis["cpu_us_per_message"].as_f64().unwrap_or(0.0)
    );
}
