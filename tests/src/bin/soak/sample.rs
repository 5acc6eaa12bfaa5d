//! Readings of the running processes (from their own `/metrics`, as an operator sees them)
//! and of Redis (`CLIENT LIST TYPE pubsub`), and the Redis restarts.

use std::time::{Duration, Instant};

use tests::{http_request_to, redis, Metrics};

/// One reading of one process's `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Process {
    pub rss_bytes: f64,
    pub fds: f64,
    pub connections: f64,
    pub subscriptions: f64,
    pub channels: f64,
}

/// Redis's own view of the pub/sub connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedisSubs {
    /// Connections in pub/sub mode (one per gateway node, when all is well).
    pub clients: u64,
    /// Channel subscriptions over all of them.
    pub subscriptions: u64,
}

/// Everything read at one moment; None for what did not answer.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at_secs: f64,
    pub nodes: Vec<Option<Process>>,
    pub publishers: Vec<Option<Process>>,
    pub redis: Option<RedisSubs>,
}

fn host_port(addr: &str) -> (&str, u16) {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    (host, port.parse().expect("a port"))
}

pub async fn metrics(addr: &str) -> Option<Metrics> {
    let (host, port) = host_port(addr);
    match http_request_to(host, port, "GET", "/metrics", &[], "").await {
        Ok((200, body)) => Some(Metrics::parse(&body)),
        _ => None,
    }
}

pub async fn ready(addr: &str) -> bool {
    let (host, port) = host_port(addr);
    matches!(
        http_request_to(host, port, "GET", "/readyz", &[], "").await,
        Ok((200, _))
    )
}

pub async fn process(addr: &str) -> Option<Process> {
    let m = metrics(addr).await?;
    Some(Process {
        rss_bytes: m.get("process_resident_memory_bytes"),
        fds: m.get("process_open_fds"),
        connections: m.get("gateway_connections"),
        subscriptions: m.get("gateway_subscriptions"),
        channels: m.get("gateway_channels"),
    })
}

pub async fn redis_subs(url: &str) -> Option<RedisSubs> {
    let client = redis::Client::open(url).ok()?;
    let query = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("pubsub")
            .query_async::<String>(&mut conn)
            .await
    };
    let list = tokio::time::timeout(Duration::from_secs(2), query)
        .await
        .ok()?
        .ok()?;
    let mut subs = RedisSubs::default();
    for line in list.lines().filter(|l| !l.is_empty()) {
        subs.clients += 1;
        subs.subscriptions += line
            .split_whitespace()
            .find_map(|field| field.strip_prefix("sub="))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(subs)
}

pub async fn sample(
    started: Instant,
    nodes: &[String],
    publishers: &[String],
    redis_url: &str,
) -> Sample {
    let mut sample = Sample {
        at_secs: started.elapsed().as_secs_f64(),
        nodes: Vec::new(),
        publishers: Vec::new(),
        redis: redis_subs(redis_url).await,
    };
    for node in nodes {
        sample.nodes.push(process(node).await);
    }
    for publisher in publishers {
        sample.publishers.push(process(publisher).await);
    }
    sample
}

// === Redis restarts ===

/// How long one restart took to heal.
#[derive(Debug, Clone)]
pub struct Restart {
    pub at_secs: f64,
    /// SIGKILL → the new Redis answers (the supervisor's pause, then start-up).
    pub down: Duration,
    /// It answers → it has loaded its AOF (`loading:0`).
    pub loading: Duration,
    /// Loaded → every node's `/readyz` is 200 (resubscribed and caught up).
    pub nodes_ready: Duration,
    /// Loaded → the publisher accepts a message again.
    pub publisher_ok: Duration,
}

/// `INFO` (answered even while Redis loads its data): (process id, still loading).
async fn redis_info(url: &str) -> Option<(u32, bool)> {
    let client = redis::Client::open(url).ok()?;
    let query = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("INFO").query_async::<String>(&mut conn).await
    };
    let info = tokio::time::timeout(Duration::from_secs(2), query)
        .await
        .ok()?
        .ok()?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
    };
    Some((
        field("process_id:")?.parse().ok()?,
        field("loading:")? == "1",
    ))
}

/// SIGKILL the Redis that `tests/bench/soak.sh` runs under its supervisor loop (which starts
/// it again on the same port and AOF directory), then time the recovery.
pub async fn restart_redis(
    started: Instant,
    redis_url: &str,
    nodes: &[String],
    publish_ok: impl AsyncFn() -> bool,
) -> anyhow::Result<Restart> {
    let at_secs = started.elapsed().as_secs_f64();
    let (pid, _) = redis_info(redis_url)
        .await
        .ok_or_else(|| anyhow::anyhow!("Redis does not answer INFO"))?;
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    anyhow::ensure!(killed.success(), "kill -KILL {pid} failed");
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(60);
    let mut answered = None;
    let up = loop {
        match redis_info(redis_url).await {
            Some((new, loading)) if new != pid => {
                answered.get_or_insert_with(Instant::now);
                if !loading {
                    break Instant::now();
                }
            }
            _ => {}
        }
        anyhow::ensure!(Instant::now() < deadline, "Redis did not come back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let answered = answered.unwrap_or(up);
    let (mut nodes_ready, mut publisher_ok) = (None, None);
    while nodes_ready.is_none() || publisher_ok.is_none() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "not recovered within 60 s of the kill"
        );
        if nodes_ready.is_none() {
            let mut all = true;
            for node in nodes {
                all &= ready(node).await;
            }
            if all {
                nodes_ready = Some(up.elapsed());
            }
        }
        if publisher_ok.is_none() && publish_ok().await {
            publisher_ok = Some(up.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Restart {
        at_secs,
        down: answered - t0,
        loading: up - answered,
        nodes_ready: nodes_ready.unwrap_or_default(),
        publisher_ok: publisher_ok.unwrap_or_default(),
    })
}
