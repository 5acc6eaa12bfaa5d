//! Reliability under real faults (RELIABILITY.md): a tick leader whose network path to Redis
//! silently drops everything, and Redis restarts with and without persistence. What is
//! asserted is what a WebSocket client of a real gateway receives.
//!
//! The partition is a real one: the leader runs in its own network namespace, joined to
//! Redis by a veth pair whose end is taken down (no RST, no error: packets vanish). Where the
//! kernel refuses namespaces (not root), those tests say `SKIPPED:` and pass; CI runs as root.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tests::Frames;

use serde_json::{json, Value};
use tests::{
    eventually, http_request, publish, Cluster, GatewayNode, NetNs, PublisherNode, Received,
    RedisServer, WsClient, PUBLISHER_LEASE_MS, PUBLISHER_TICK_MS,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A namespace, or None (and a `SKIPPED:` line) where the kernel refuses one.
fn namespace_or_skip(test: &str) -> Option<NetNs> {
    match NetNs::create() {
        Ok(ns) => Some(ns),
        Err(e) => {
            eprintln!("SKIPPED: {test} needs network namespaces (run as root): {e}");
            None
        }
    }
}

// === who emitted which tick ===

/// `redis-cli MONITOR`: for every tick the publishers send (the append-and-publish script
/// whose payload has `unix_ms`), the address of the connection it came from. This observes
/// emission at Redis itself, independently of the publisher's own bookkeeping.
struct Emissions {
    rx: mpsc::UnboundedReceiver<(u64, String)>,
    /// slot → the addresses that published it.
    by_slot: HashMap<u64, Vec<String>>,
    _monitor: tokio::process::Child,
}

impl Emissions {
    async fn start(redis: &RedisServer) -> Emissions {
        let mut monitor = tokio::process::Command::from(redis.cli_command(&["MONITOR"]))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("run redis-cli MONITOR");
        let mut lines = BufReader::new(monitor.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(tests::TIMEOUT, lines.next_line())
            .await
            .expect("MONITOR answers")
            .expect("read MONITOR");
        assert_eq!(first.as_deref(), Some("OK"), "MONITOR refused");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(emitted) = parse_monitor_tick(&line) {
                    if tx.send(emitted).is_err() {
                        break;
                    }
                }
            }
        });
        Emissions {
            rx,
            by_slot: HashMap::new(),
            _monitor: monitor,
        }
    }

    fn drain(&mut self) {
        while let Ok((slot, addr)) = self.rx.try_recv() {
            self.by_slot.entry(slot).or_default().push(addr);
        }
    }

    /// Who published `slot` (waiting for MONITOR's line, which Redis writes before it runs
    /// the script, so it is at most a moment behind the tick itself).
    async fn emitter(&mut self, slot: u64) -> String {
        eventually(&format!("MONITOR to show slot {slot}"), async || {
            self.drain();
            self.by_slot.get(&slot).map(|a| a[0].clone())
        })
        .await
    }
}

/// `1700000000.123456 [0 10.201.0.2:43210] "EVAL" "…" … "{\"time\":…,\"unix_ms\":N,…}" …`
/// → (N, "10.201.0.2"); None for other commands and for the script's own calls (`[0 lua]`).
fn parse_monitor_tick(line: &str) -> Option<(u64, String)> {
    let (_, rest) = line.split_once('[')?;
    let (client, rest) = rest.split_once(']')?;
    let addr = client.split_whitespace().nth(1)?;
    if addr == "lua" || !rest.trim_start().starts_with("\"EVAL") {
        return None;
    }
    let key = "unix_ms\\\":";
    let at = rest.find(key)? + key.len();
    let digits: String = rest[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let ip = addr.rsplit_once(':').map_or(addr, |(ip, _)| ip);
    Some((digits.parse().ok()?, ip.to_owned()))
}

/// A tick as a client received it: (slot, seq).
async fn next_tick(client: &mut WsClient) -> (u64, u64) {
    let frame = client.until_message("ticks").await;
    let slot = frame["data"]["unix_ms"].as_u64().expect("unix_ms");
    let seq = frame["data"]["seq"].as_u64().expect("seq");
    (slot, seq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_stops_ticking_and_its_successor_never_repeats_a_slot() {
    let Some(ns) = namespace_or_skip("a_partitioned_leader_stops_ticking") else {
        return;
    };
    let redis = RedisServer::start_for(&ns);
    let node = GatewayNode::start("gw-1", &[("GATEWAY__REDIS__URL".into(), redis.url())]).await;
    node.await_ready(200).await;
    let mut emissions = Emissions::start(&redis).await;

    // The replica inside the namespace leads; the other one, beside Redis, follows.
    let old = PublisherNode::start_in(&ns, &redis.url_from(&ns), &[]).await;
    eventually("the replica in the namespace to lead", async || {
        old.is_leader().await.then_some(())
    })
    .await;
    let new = PublisherNode::start(&redis, &[]).await;
    let old_ip = ns.ns_ip.clone();
    let (mut client, _) = WsClient::connect_welcomed(&node.ws_url("channels=ticks")).await;

    // (slot, seq, emitter) in the order the client received them.
    let mut ticks: Vec<(u64, u64, String)> = Vec::new();
    while ticks.len() < 3 {
        let (slot, seq) = next_tick(&mut client).await;
        ticks.push((slot, seq, emissions.emitter(slot).await));
    }
    assert!(ticks.iter().all(|t| t.2 == old_ip), "{ticks:?}");

    let cut_ms = unix_ms_now();
    let cut = Instant::now();
    ns.partition_inside();
    // The follower takes over once the lease has expired in Redis.
    let takeover = loop {
        let (slot, seq) = next_tick(&mut client).await;
        let emitter = emissions.emitter(slot).await;
        ticks.push((slot, seq, emitter.clone()));
        if emitter != old_ip {
            break cut.elapsed();
        }
    };
    // Stay cut off longer than a slot claim lives (2 × lease), so that anything the old
    // leader still had in flight would find its slots free once it lands.
    let heal_at = cut + Duration::from_millis(3 * PUBLISHER_LEASE_MS);
    let mut healed = false;
    // And after the heal, long enough for TCP to retransmit what was queued meanwhile.
    let end = heal_at + Duration::from_millis(4 * PUBLISHER_LEASE_MS);
    while Instant::now() < end {
        if !healed && Instant::now() >= heal_at {
            ns.heal();
            healed = true;
        }
        match client.next_within(Duration::from_millis(50)).await {
            None => {}
            Some(Received::Frame(frame)) if frame["channel"] == "ticks" => {
                let slot = frame["data"]["unix_ms"].as_u64().unwrap();
                let seq = frame["data"]["seq"].as_u64().unwrap();
                ticks.push((slot, seq, emissions.emitter(slot).await));
            }
            Some(Received::Frame(_)) => {}
            Some(Received::Closed(code)) => panic!("the client was closed ({code:?})"),
        }
    }
    // The old leader is reachable again and knows it does not lead; the new one does.
    eventually(
        "the cut-off replica to report it does not lead",
        async || (!old.is_leader().await).then_some(()),
    )
    .await;
    assert!(new.is_leader().await, "the successor still leads");

    // What the client received: every slot once, in order, seq increasing.
    for pair in ticks.windows(2) {
        let ((slot_a, seq_a, _), (slot_b, seq_b, _)) = (&pair[0], &pair[1]);
        assert!(slot_b > slot_a, "slot {slot_b} after {slot_a}: {ticks:?}");
        assert!(seq_b > seq_a, "seq {seq_b} after {seq_a}: {ticks:?}");
    }
    // The old leader emitted nothing after its lease was gone, and nothing once the
    // successor had started, not even with the link back.
    let first_new = ticks.iter().position(|t| t.2 != old_ip).unwrap();
    assert!(
        ticks[first_new..].iter().all(|t| t.2 != old_ip),
        "the cut-off leader ticked after its successor: {ticks:?}"
    );
    emissions.drain();
    for (slot, emitters) in &emissions.by_slot {
        // One replica per slot. The same replica may show twice: MONITOR logs an EVALSHA that
        // was answered NOSCRIPT and the EVAL the publisher then sends (one script run).
        let mut replicas = emitters.clone();
        replicas.sort();
        replicas.dedup();
        assert_eq!(replicas.len(), 1, "slot {slot} emitted by {emitters:?}");
        if emitters[0] == old_ip {
            assert!(
                *slot <= cut_ms + PUBLISHER_LEASE_MS,
                "slot {slot} emitted by the cut-off leader {} ms after the cut",
                slot - cut_ms
            );
        }
    }
    // The successor's seq grows by one: the cut-off leader claimed no slot in between, even
    // when what it had sent during the partition reached Redis after the heal.
    for pair in ticks[first_new..].windows(2) {
        assert_eq!(pair[1].1, pair[0].1 + 1, "seq skipped: {ticks:?}");
    }
    assert!(
        takeover <= Duration::from_millis(PUBLISHER_LEASE_MS + 2 * PUBLISHER_TICK_MS + 500),
        "ticks resumed {takeover:?} after the cut; the lease is {PUBLISHER_LEASE_MS} ms"
    );
    eprintln!(
        "measured: ticks resumed from the successor {} ms after the leader was cut off (lease {} ms, ticks every {} ms)",
        takeover.as_millis(),
        PUBLISHER_LEASE_MS,
        PUBLISHER_TICK_MS
    );
}

// === Redis restarts ===

/// Every next frame is a `message` on `channel` with `n` = `first..=last` in order: no
/// `history_gone`, no other frame. Returns the last offset.
async fn expect_only(client: &mut WsClient, channel: &str, first: u64, last: u64) -> String {
    let mut offset = String::new();
    for n in first..=last {
        let frame = client.frame().await;
        assert!(
            frame["type"] == "message" && frame["channel"] == channel && frame["data"]["n"] == n,
            "expected message {n} on {channel}, got {frame}"
        );
        offset = frame["offset"].as_str().expect("an offset").to_owned();
    }
    offset
}

fn epoch(offset: &str) -> &str {
    offset.split_once(':').expect("epoch:id").0
}

/// `publish`, retried until the publisher can reach Redis again (it answers 503 before).
async fn publish_when_up(publisher: &PublisherNode, channel: &str, n: u64) -> String {
    eventually("the publisher to publish again", async || {
        let body = json!({"channel": channel, "data": {"n": n}}).to_string();
        let headers = [("Content-Type", "application/json")];
        match http_request(publisher.port, "POST", "/publish", &headers, &body).await {
            Ok((200, text)) => serde_json::from_str::<Value>(&text).ok(),
            _ => None,
        }
    })
    .await["offset"]
        .as_str()
        .expect("an offset")
        .to_owned()
}

/// Two nodes that reconnect quickly, a publisher without ticks, and two sessions on `channel`:
/// one that stays connected through what follows (node 1) and one that leaves after
/// receiving 1..=3 (node 2). Returns the staying session and the leaver's last offset.
async fn two_readers(
    cluster: &Cluster,
    publisher: &PublisherNode,
    channel: &str,
) -> (WsClient, String) {
    let query = format!("channels={channel}");
    let (mut stays, _) = WsClient::connect_welcomed(&cluster.nodes[0].ws_url(&query)).await;
    let (mut leaves, _) = WsClient::connect_welcomed(&cluster.nodes[1].ws_url(&query)).await;
    for n in 1..=3 {
        publish(publisher.port, channel, n).await;
    }
    expect_only(&mut stays, channel, 1, 3).await;
    let last = expect_only(&mut leaves, channel, 1, 3).await;
    (stays, last)
}

async fn restart_cluster(aof: bool) -> (Cluster, PublisherNode) {
    let mut builder = Cluster::builder()
        .nodes(2)
        .env("GATEWAY__REDIS__BACKOFF_MIN_MS", "50")
        .env("GATEWAY__REDIS__BACKOFF_MAX_MS", "200");
    if aof {
        builder = builder.redis_aof();
    }
    let cluster = builder.start().await;
    let publisher =
        PublisherNode::start(&cluster.redis, &[("PUBLISHER__TICK__ENABLED", "false")]).await;
    (cluster, publisher)
}

/// Kill Redis (SIGKILL), see both nodes notice, check that nothing is accepted meanwhile, and
/// start it again; returns when it answers.
async fn crash_and_restart(cluster: &mut Cluster, publisher: &PublisherNode, channel: &str) {
    cluster.redis.kill();
    for node in &cluster.nodes {
        node.await_ready(503).await;
    }
    let body = json!({"channel": channel, "data": {"n": 0}}).to_string();
    let (status, reply) = publisher.post("/publish", &body).await;
    assert_eq!(status, 503, "a publish while Redis is down: {reply}");
    cluster.redis.start_again();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_aof_a_redis_restart_keeps_history_so_every_reader_gets_everything_once() {
    let (mut cluster, publisher) = restart_cluster(true).await;
    let (mut stays, last) = two_readers(&cluster, &publisher, "a:x").await;

    crash_and_restart(&mut cluster, &publisher, "a:x").await;
    let up = Instant::now();
    // Published the moment Redis takes it, racing the nodes' reconnects and catch-ups.
    let offset = publish_when_up(&publisher, "a:x", 4).await;
    assert_eq!(
        epoch(&offset),
        epoch(&last),
        "the epoch survived the restart"
    );
    for n in 5..=6 {
        publish(publisher.port, "a:x", n).await;
    }
    for node in &cluster.nodes {
        node.await_ready(200).await;
    }
    let ready = up.elapsed();

    // The session that stayed: the node caught it up from its position, exactly once.
    expect_only(&mut stays, "a:x", 4, 6).await;
    let delivered = up.elapsed();
    // The one that left resumes with `since`, on the other node.
    let url = cluster.nodes[1].ws_url(&format!("channels=a:x&since=a:x@{last}"));
    let (mut back, _) = WsClient::connect_welcomed(&url).await;
    expect_only(&mut back, "a:x", 4, 6).await;

    publish(publisher.port, "a:x", 7).await;
    expect_only(&mut stays, "a:x", 7, 7).await;
    expect_only(&mut back, "a:x", 7, 7).await;
    tests::expect_quiet(&mut stays, "a:x").await;
    tests::expect_quiet(&mut back, "a:x").await;
    eprintln!(
        "measured: after a Redis restart with AOF, nodes ready {} ms and the missed messages delivered {} ms after Redis answered",
        ready.as_millis(),
        delivered.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_persistence_a_redis_restart_is_history_gone_never_a_silent_gap() {
    let (mut cluster, publisher) = restart_cluster(false).await;
    let (mut stays, last) = two_readers(&cluster, &publisher, "n:x").await;

    crash_and_restart(&mut cluster, &publisher, "n:x").await;
    let up = Instant::now();
    let offset = publish_when_up(&publisher, "n:x", 4).await;
    assert_ne!(epoch(&offset), epoch(&last), "a new stream, a new epoch");
    publish(publisher.port, "n:x", 5).await;
    for node in &cluster.nodes {
        node.await_ready(200).await;
    }
    let ready = up.elapsed();
    publish(publisher.port, "n:x", 6).await;

    // The session that stayed: its node cannot know what it missed, and says so before
    // anything newer; then the channel goes on live with no hole.
    let gone = stays.frame().await;
    assert_eq!(
        (&gone["type"], &gone["code"], &gone["channel"]),
        (&json!("error"), &json!("history_gone"), &json!("n:x")),
        "{gone}"
    );
    let told = up.elapsed();
    let first = stays.until_message("n:x").await["data"]["n"]
        .as_u64()
        .unwrap();
    assert!(
        (4..=6).contains(&first),
        "first after history_gone: {first}"
    );
    if first < 6 {
        expect_only(&mut stays, "n:x", first + 1, 6).await;
    }
    // The one that left gets history_gone for its offset, then live.
    let url = cluster.nodes[1].ws_url(&format!("channels=n:x&since=n:x@{last}"));
    let (mut back, _) = WsClient::connect_welcomed(&url).await;
    let gone = back.frame().await;
    assert_eq!(gone["code"], "history_gone", "{gone}");
    publish(publisher.port, "n:x", 7).await;
    expect_only(&mut stays, "n:x", 7, 7).await;
    expect_only(&mut back, "n:x", 7, 7).await;
    eprintln!(
        "measured: after a Redis restart without persistence, nodes ready {} ms and history_gone sent {} ms after Redis answered",
        ready.as_millis(),
        told.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_still_loading_its_data_is_waited_for_not_taken_for_lost_history() {
    // Loading takes a few seconds (10 ms per key, a Redis debug setting, and 300 keys), and
    // Redis answers clients meanwhile (-LOADING), as it does while loading a large dataset.
    let mut cluster = Cluster::builder()
        .nodes(1)
        .redis_aof()
        .redis_args(&["--key-load-delay", "10000"])
        .redis_args(&["--loading-process-events-interval-bytes", "1024"])
        .env("GATEWAY__REDIS__BACKOFF_MIN_MS", "50")
        .env("GATEWAY__REDIS__BACKOFF_MAX_MS", "200")
        .start()
        .await;
    let publisher =
        PublisherNode::start(&cluster.redis, &[("PUBLISHER__TICK__ENABLED", "false")]).await;
    let node = &cluster.nodes[0];
    let (mut stays, _) = WsClient::connect_welcomed(&node.ws_url("channels=l:x")).await;
    let (mut leaves, _) = WsClient::connect_welcomed(&node.ws_url("channels=l:x")).await;
    for n in 1..=3 {
        publish(publisher.port, "l:x", n).await;
    }
    expect_only(&mut stays, "l:x", 1, 3).await;
    let last = expect_only(&mut leaves, "l:x", 1, 3).await;
    drop(leaves);
    // Values of 1 KiB: Redis serves clients between two of them.
    let mut fill = vec!["MSET".to_owned()];
    for i in 0..300 {
        fill.extend([format!("filler:{i}"), "x".repeat(1024)]);
    }
    cluster
        .redis
        .cli(&fill.iter().map(String::as_str).collect::<Vec<_>>());
    // Into the AOF's base file, which is what the delay slows down.
    cluster.redis.cli(&["BGREWRITEAOF"]);
    eventually("the AOF rewrite", async || {
        let info = cluster.redis.cli(&["INFO", "persistence"]);
        (info.contains("aof_rewrite_in_progress:0") && info.contains("aof_rewrite_scheduled:0"))
            .then_some(())
    })
    .await;

    cluster.redis.kill();
    node.await_ready(503).await;
    // A client resumes while Redis is down, then loading: it waits for its welcome.
    let url = node.ws_url(&format!("channels=l:x&since=l:x@{last}"));
    let mut back = WsClient::connect(&url).await;
    let loading = Instant::now();
    // Returns once Redis answers PING, i.e. has loaded its data; the node tried meanwhile.
    tokio::task::block_in_place(|| cluster.redis.start_again());
    assert!(
        loading.elapsed() > Duration::from_secs(2),
        "Redis loaded too fast to test anything"
    );
    publish_when_up(&publisher, "l:x", 4).await;

    // Neither the node's catch-up nor the resume took "loading" for lost history.
    expect_only(&mut stays, "l:x", 4, 4).await;
    back.expect_type("welcome").await;
    expect_only(&mut back, "l:x", 4, 4).await;
    node.await_ready(200).await;
}
