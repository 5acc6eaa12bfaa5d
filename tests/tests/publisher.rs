//! The publisher as producers and operators use it: the real `publisher` program (this crate's
//! `publisher-node` binary) against a real redis-server, observed by Redis subscribers and, end
//! to end, by a WebSocket client of a real gateway.
//!
//! Intervals are short (ticks every 200 ms, a 1 s lease) so that leader changes are quick; every
//! wait is bounded by `tests::TIMEOUT`, and every process is killed when its owner is dropped.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tests::Frames;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tests::{
    assert_slots_unique_and_ordered, eventually, free_port, http_get, leader_of, publisher_command,
    redis, tick_fields, Cluster, GatewayNode, PublisherNode, RedisServer, TempDir, WsClient,
    TIMEOUT,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::mpsc;

const INTERVAL_MS: u64 = tests::PUBLISHER_TICK_MS;
const LEASE_MS: u64 = tests::PUBLISHER_LEASE_MS;

/// HTTP headers, or environment variables: name/value pairs.
type Headers<'a> = &'a [(&'a str, &'a str)];

// === a Redis subscriber ===

/// A plain Redis pub/sub subscriber, as any consumer of the bus would be.
struct Subscriber {
    rx: mpsc::UnboundedReceiver<(String, String, u64)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Subscriber {
    /// Subscribed (confirmed by Redis) to `channels` when this returns.
    async fn channels(redis: &RedisServer, channels: &[&str]) -> Subscriber {
        Self::start(redis, channels, false).await
    }

    /// Subscribed to everything (`PSUBSCRIBE *`).
    async fn everything(redis: &RedisServer) -> Subscriber {
        Self::start(redis, &["*"], true).await
    }

    async fn start(redis: &RedisServer, names: &[&str], pattern: bool) -> Subscriber {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut pubsub = client.get_async_pubsub().await.expect("pubsub connection");
        for name in names {
            if pattern {
                pubsub.psubscribe(*name).await.expect("psubscribe");
            } else {
                pubsub.subscribe(*name).await.expect("subscribe");
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                let channel = message.get_channel_name().to_owned();
                let payload = String::from_utf8_lossy(message.get_payload_bytes()).into_owned();
                // The publisher's envelope (docs/REFERENCE.md §5): NUL, the offset, a newline, the
                // payload.
                let payload = match payload.strip_prefix('\0').and_then(|e| e.split_once('\n')) {
                    Some((offset, payload)) if offset.contains(':') => payload.to_owned(),
                    _ => panic!("publisher message without an offset envelope: {payload:?}"),
                };
                if tx.send((channel, payload, unix_ms_now())).is_err() {
                    break;
                }
            }
        });
        Subscriber { rx, task }
    }

    /// The next message: (channel, payload parsed as JSON, local receipt time in Unix ms).
    async fn next(&mut self) -> (String, Value, u64) {
        let (channel, payload, at) = tokio::time::timeout(TIMEOUT, self.rx.recv())
            .await
            .expect("a message within the timeout")
            .expect("subscriber running");
        let value = serde_json::from_str(&payload)
            .unwrap_or_else(|e| panic!("non-JSON payload {payload:?} on {channel}: {e}"));
        (channel, value, at)
    }

    /// The next message on `channel`, skipping others.
    async fn next_on(&mut self, channel: &str) -> Value {
        loop {
            let (on, value, _) = self.next().await;
            if on == channel {
                return value;
            }
        }
    }
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Collects `n` ticks: (unix_ms, seq, receipt time).
async fn collect_ticks(sub: &mut Subscriber, n: usize) -> Vec<(u64, u64, u64)> {
    let mut ticks = Vec::with_capacity(n);
    while ticks.len() < n {
        let (channel, tick, at) = sub.next().await;
        if channel == "ticks" {
            let (slot, seq) = tick_fields(&tick);
            ticks.push((slot, seq, at));
        }
    }
    ticks
}

// === ticks and the lease ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_arrive_every_second_on_time_with_seq_increasing_by_one() {
    let redis = RedisServer::start();
    let mut sub = Subscriber::channels(&redis, &["ticks"]).await;
    // Production settings: one tick a second.
    let _node = PublisherNode::start(&redis, &[("PUBLISHER__TICK__INTERVAL_MS", "1000")]).await;

    let mut ticks = Vec::new();
    while ticks.len() < 3 {
        let (_, tick, at) = sub.next().await;
        let (slot, seq) = tick_fields(&tick);
        assert_eq!(slot % 1000, 0, "aligned to the second: {tick}");
        assert!(
            at + 50 >= slot && at <= slot + 500,
            "tick for {slot} received at {at}: not on time"
        );
        ticks.push((slot, seq));
    }
    for pair in ticks.windows(2) {
        assert_eq!(
            pair[1].0,
            pair[0].0 + 1000,
            "one tick per second: {ticks:?}"
        );
        assert_eq!(pair[1].1, pair[0].1 + 1, "seq increases by one: {ticks:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_replicas_only_the_lease_holder_ticks() {
    let redis = RedisServer::start();
    let a = PublisherNode::start(&redis, &[]).await;
    let b = PublisherNode::start(&redis, &[]).await;
    let leader = leader_of(&[&a, &b]).await;
    let mut sub = Subscriber::channels(&redis, &["ticks"]).await;

    let ticks = collect_ticks(&mut sub, 10).await;
    assert_slots_unique_and_ordered(&ticks);
    for pair in ticks.windows(2) {
        assert_eq!(pair[1].1, pair[0].1 + 1, "seq increases by one: {ticks:?}");
    }

    let (ma, mb) = (a.metrics().await, b.metrics().await);
    let (leader_m, follower_m) = if leader == 0 { (&ma, &mb) } else { (&mb, &ma) };
    assert_eq!(leader_m.get("publisher_leader"), 1.0);
    assert_eq!(follower_m.get("publisher_leader"), 0.0);
    assert!(leader_m.get("publisher_ticks_total") >= 10.0);
    assert_eq!(
        follower_m.get("publisher_ticks_total"),
        0.0,
        "the follower never ticked"
    );
    assert_eq!(
        follower_m.get(r#"publisher_published_total{channel="ticks"}"#),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_within_the_lease_ttl_without_a_slot_twice() {
    let redis = RedisServer::start();
    let mut nodes = [
        PublisherNode::start(&redis, &[]).await,
        PublisherNode::start(&redis, &[]).await,
    ];
    let leader = leader_of(&[&nodes[0], &nodes[1]]).await;
    let mut sub = Subscriber::channels(&redis, &["ticks"]).await;
    let mut ticks = collect_ticks(&mut sub, 3).await;

    let killed_at = unix_ms_now();
    nodes[leader].sigkill().await;
    // Ticks keep coming: the first one sent after the kill marks the handover.
    let handover = loop {
        let tick = collect_ticks(&mut sub, 1).await[0];
        ticks.push(tick);
        if tick.2 > killed_at && tick.0 > killed_at {
            break tick;
        }
    };
    let gap = handover.2 - killed_at;
    assert!(
        gap <= LEASE_MS + 2 * INTERVAL_MS + 300,
        "ticks resumed {gap} ms after the leader died; the lease TTL is {LEASE_MS} ms"
    );
    ticks.extend(collect_ticks(&mut sub, 5).await);
    assert_slots_unique_and_ordered(&ticks);
    let after: Vec<_> = ticks.iter().filter(|t| t.0 >= handover.0).collect();
    for pair in after.windows(2) {
        assert_eq!(
            pair[1].1,
            pair[0].1 + 1,
            "the new leader's seq grows by one: {ticks:?}"
        );
    }
    assert!(nodes[1 - leader].is_leader().await);
}

/// A tick as a WebSocket client receives it: (unix_ms, seq, from the publisher). The
/// publisher's ticks carry a history offset; a gateway's are live-only.
async fn next_client_tick(client: &mut WsClient) -> (u64, u64, bool) {
    let frame = client.until_message("ticks").await;
    let (slot, seq) = tick_fields(&frame["data"]);
    (slot, seq, frame.get("offset").is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticking_gateway_and_publishers_share_the_lease_so_each_tick_arrives_once() {
    // README's order: a gateway that ticks on Redis, then a publisher on the same Redis.
    let redis = RedisServer::start();
    let gateway_env = |ticks: &str| {
        vec![
            ("GATEWAY__REDIS__URL".to_owned(), redis.url()),
            ("GATEWAY__TICKS".to_owned(), ticks.to_owned()),
            (
                "GATEWAY__TICK_INTERVAL_MS".to_owned(),
                INTERVAL_MS.to_string(),
            ),
            (
                "GATEWAY__TICK_LEASE_TTL_MS".to_owned(),
                LEASE_MS.to_string(),
            ),
        ]
    };
    let mut ticker = GatewayNode::start("gw-ticks", &gateway_env("true")).await;
    let edge = GatewayNode::start("gw-edge", &gateway_env("false")).await;
    edge.await_ready(200).await;
    let (mut client, _) = WsClient::connect_welcomed(&edge.ws_url("channels=ticks")).await;
    let mut ticks = Vec::new();
    // The gateway ticks (live-only ticks: no offset).
    while ticks.len() < 3 {
        ticks.push(next_client_tick(&mut client).await);
    }
    assert!(
        ticks.iter().all(|t| !t.2),
        "the gateway ticks alone: {ticks:?}"
    );

    // A publisher joins: the gateway holds the lease, so the publisher does not tick.
    let mut publisher = PublisherNode::start(&redis, &[]).await;
    for _ in 0..10 {
        ticks.push(next_client_tick(&mut client).await);
    }
    assert!(!publisher.is_leader().await, "the gateway keeps the lease");
    let m = publisher.metrics().await;
    assert_eq!(m.get("publisher_ticks_total"), 0.0, "{ticks:?}");
    assert!(
        ticks.iter().all(|t| !t.2),
        "one ticker, the gateway: {ticks:?}"
    );

    // The gateway dies: the publisher takes over within the lease TTL, seq continuing.
    ticker.kill();
    loop {
        let tick = next_client_tick(&mut client).await;
        ticks.push(tick);
        if tick.2 {
            break;
        }
    }
    for _ in 0..5 {
        ticks.push(next_client_tick(&mut client).await);
    }
    assert!(publisher.is_leader().await);

    // A ticking gateway that starts while the publisher leads does not tick either.
    let _late = GatewayNode::start("gw-late", &gateway_env("true")).await;
    for _ in 0..10 {
        ticks.push(next_client_tick(&mut client).await);
    }
    let last = &ticks[ticks.len() - 10..];
    assert!(
        last.iter().all(|t| t.2),
        "one ticker, the publisher: {last:?}"
    );

    // What the client saw, across both handovers: each slot once, in order, and one `seq`
    // counter, growing by one except where the killed gateway's last claim went unsent.
    for pair in ticks.windows(2) {
        let ((slot_a, seq_a, _), (slot_b, seq_b, _)) = (pair[0], pair[1]);
        assert!(slot_b > slot_a, "slot {slot_b} after {slot_a}: {ticks:?}");
        assert!(seq_b > seq_a, "seq {seq_b} after {seq_a}: {ticks:?}");
        if pair[0].2 == pair[1].2 {
            assert_eq!(seq_b, seq_a + 1, "one ticker, one counter: {ticks:?}");
        }
    }
    publisher.sigterm();
    assert!(publisher.wait_exit(TIMEOUT).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_leader_releases_the_lease_exits_0_and_seq_continues() {
    let redis = RedisServer::start();
    let mut nodes = [
        PublisherNode::start(&redis, &[]).await,
        PublisherNode::start(&redis, &[]).await,
    ];
    let leader = leader_of(&[&nodes[0], &nodes[1]]).await;
    let mut sub = Subscriber::channels(&redis, &["ticks"]).await;
    let mut ticks = collect_ticks(&mut sub, 3).await;

    let stopped_at = unix_ms_now();
    nodes[leader].sigterm();
    let status = nodes[leader].wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "SIGTERM exits 0, got {status}");

    ticks.extend(collect_ticks(&mut sub, 5).await);
    assert_slots_unique_and_ordered(&ticks);
    for pair in ticks.windows(2) {
        assert_eq!(
            pair[1].1,
            pair[0].1 + 1,
            "seq continues across the handover: {ticks:?}"
        );
    }
    // Released, not expired: the other replica took over well within the TTL.
    let &(_, _, at) = ticks
        .iter()
        .find(|t| t.0 > stopped_at)
        .expect("ticks after the stop");
    assert!(
        at - stopped_at < LEASE_MS,
        "handover took {} ms",
        at - stopped_at
    );
    assert!(nodes[1 - leader].is_leader().await);
}

// === alerts and the publish API ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_from_http_and_cli_and_published_data_reach_subscribers() {
    let redis = RedisServer::start();
    let node = PublisherNode::start(&redis, &[("PUBLISHER__TICK__ENABLED", "false")]).await;
    let mut sub = Subscriber::channels(&redis, &["alerts", "chat:lobby", "room:1"]).await;

    let (status, body) = node
        .post(
            "/alerts",
            r#"{"level":"critical","title":"Fire","text":"Fire in building 3"}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["published"], 1);
    let alert = sub.next_on("alerts").await;
    assert_eq!(
        body["alert"], alert,
        "the response shows what was published"
    );
    assert_eq!(alert["level"], "critical");
    assert_eq!(alert["title"], "Fire");
    assert_eq!(alert["text"], "Fire in building 3");
    let at = alert["at"].as_str().unwrap();
    assert!(
        at.len() == 24 && at.ends_with('Z'),
        "RFC 3339 with ms: {at}"
    );
    assert_eq!(
        alert.as_object().unwrap().len(),
        4,
        "level, title, text, at: {alert}"
    );

    let url = redis.url();
    let env = [("PUBLISHER__REDIS__URL", url.as_str())];
    let (status, stdout, stderr) = tests::publisher_cli(
        &env,
        &["alert", "--level", "warning", "Disk", "91%", "full"],
    )
    .await;
    assert!(status.success(), "{stderr}");
    let alert = sub.next_on("alerts").await;
    assert_eq!(alert["level"], "warning");
    assert_eq!(alert["text"], "Disk 91% full");
    assert_eq!(alert["title"], Value::Null);
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap(), alert);

    let (status, _, stderr) =
        tests::publisher_cli(&env, &["publish", "chat:lobby", r#"{"text": "hi"}"#]).await;
    assert!(status.success(), "{stderr}");
    assert_eq!(sub.next_on("chat:lobby").await, json!({"text": "hi"}));
    let (status, _, stderr) =
        tests::publisher_cli(&env, &["publish", "chat:lobby", "plain words"]).await;
    assert!(status.success(), "{stderr}");
    assert_eq!(sub.next_on("chat:lobby").await, json!("plain words"));

    let (status, body) = node
        .post(
            "/publish",
            r#"{"channel":"room:1","data":{"n":1.50,"s":"x"}}"#,
        )
        .await;
    assert_eq!((status, &body["published"]), (200, &json!(1)), "{body}");
    assert!(body["offset"].is_string(), "{body}");
    assert_eq!(sub.next_on("room:1").await, json!({"n": 1.5, "s": "x"}));

    let (status, body) = node
        .post(
            "/broadcast",
            r#"{"channels":["room:1","chat:lobby","room:1"],"data":"both"}"#,
        )
        .await;
    assert_eq!((status, &body["published"]), (200, &json!(2)), "{body}");
    assert_eq!(body["offsets"].as_array().map(Vec::len), Some(2), "{body}");
    let mut got = [sub.next().await, sub.next().await];
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got[0].0, "chat:lobby");
    assert_eq!(got[1].0, "room:1");
    assert!(got.iter().all(|m| m.1 == json!("both")));

    let m = node.metrics().await;
    assert_eq!(m.get("publisher_alerts_total"), 1.0);
    assert_eq!(m.get(r#"publisher_published_total{channel="alerts"}"#), 1.0);
    assert_eq!(m.get(r#"publisher_published_total{channel="other"}"#), 3.0);
    assert_eq!(
        m.get("publisher_leader"),
        0.0,
        "tick.enabled=false never leads"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_a_4xx_json_error_and_publishes_nothing() {
    let redis = RedisServer::start();
    let node = PublisherNode::start(&redis, &[("PUBLISHER__TICK__ENABLED", "false")]).await;
    let mut sub = Subscriber::everything(&redis).await;

    let json_ct = [("Content-Type", "application/json")];
    let big = format!(r#"{{"channel":"x","data":"{}"}}"#, "a".repeat(70 * 1024));
    let too_many: Vec<String> = (0..101).map(|i| format!("c{i}")).collect();
    let too_many = json!({"channels": too_many, "data": 1}).to_string();
    let cases: Vec<(&str, &str, Headers, &str, u16, &str)> = vec![
        (
            "POST",
            "/alerts",
            &json_ct,
            r#"{"level":"info","text":"#,
            400,
            "invalid_json",
        ),
        ("POST", "/alerts", &json_ct, "not json", 400, "invalid_json"),
        (
            "POST",
            "/alerts",
            &json_ct,
            r#"{"level":"fatal","text":"x"}"#,
            400,
            "invalid_level",
        ),
        (
            "POST",
            "/alerts",
            &json_ct,
            r#"{"level":"info"}"#,
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/alerts",
            &json_ct,
            r#"{"level":"info","text":"  "}"#,
            400,
            "invalid_text",
        ),
        (
            "POST",
            "/alerts",
            &json_ct,
            r#"{"level":"info","text":"x","x":1}"#,
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/alerts",
            &json_ct,
            r#"{"level":1,"text":"x"}"#,
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/alerts",
            &[],
            r#"{"level":"info","text":"x"}"#,
            415,
            "unsupported_media_type",
        ),
        (
            "POST",
            "/publish",
            &json_ct,
            r#"{"channel":"a b","data":1}"#,
            400,
            "invalid_channel",
        ),
        (
            "POST",
            "/publish",
            &json_ct,
            r#"{"channel":"","data":1}"#,
            400,
            "invalid_channel",
        ),
        (
            "POST",
            "/publish",
            &json_ct,
            r#"{"channel":"x"}"#,
            400,
            "invalid_body",
        ),
        ("POST", "/publish", &json_ct, &big, 413, "payload_too_large"),
        (
            "POST",
            "/broadcast",
            &json_ct,
            r#"{"channels":["ok","no/pe"],"data":1}"#,
            400,
            "invalid_channel",
        ),
        (
            "POST",
            "/broadcast",
            &json_ct,
            r#"{"channels":[],"data":1}"#,
            400,
            "invalid_channels",
        ),
        (
            "POST",
            "/broadcast",
            &json_ct,
            &too_many,
            400,
            "invalid_channels",
        ),
        ("GET", "/alerts", &[], "", 405, "method_not_allowed"),
        ("POST", "/nope", &json_ct, "{}", 404, "not_found"),
    ];
    for (method, path, headers, body, status, code) in cases {
        let (got, reply) = node.request(method, path, headers, body).await;
        assert_eq!(got, status, "{method} {path} {body:.60}: {reply}");
        assert_eq!(reply["error"], code, "{method} {path} {body:.60}: {reply}");
        assert!(
            reply["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{reply}"
        );
    }

    // Nothing was published: the first message anyone sees is this one.
    let (status, _) = node
        .post("/publish", r#"{"channel":"sentinel","data":1}"#)
        .await;
    assert_eq!(status, 200);
    let (channel, data, _) = sub.next().await;
    assert_eq!((channel.as_str(), data), ("sentinel", json!(1)));
    let m = node.metrics().await;
    assert_eq!(m.get(r#"publisher_published_total{channel="other"}"#), 1.0);
    assert_eq!(m.get("publisher_alerts_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_is_required_when_set() {
    let redis = RedisServer::start();
    // A comma in the key: environment values are never split into lists.
    let key = "s3cret,with,commas";
    let node = PublisherNode::start(
        &redis,
        &[
            ("PUBLISHER__TICK__ENABLED", "false"),
            ("PUBLISHER__API_KEY", key),
        ],
    )
    .await;
    let mut sub = Subscriber::everything(&redis).await;
    let body = r#"{"channel":"guarded","data":"x"}"#;
    let ct = ("Content-Type", "application/json");
    let good = format!("Bearer {key}");

    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer s3cret"),
        Some("Basic czNjcmV0"),
    ] {
        let mut headers = vec![ct];
        headers.extend(auth.map(|a| ("Authorization", a)));
        for path in ["/publish", "/alerts", "/broadcast"] {
            let (status, reply) = node.request("POST", path, &headers, body).await;
            assert_eq!(status, 401, "{path} with {auth:?}: {reply}");
            assert_eq!(reply["error"], "unauthorized");
        }
    }
    for path in ["/healthz", "/readyz"] {
        let (status, _) = node.request("GET", path, &[], "").await;
        assert_eq!(status, 200, "{path} needs no key");
    }
    assert_eq!(http_get(node.port, "/metrics").await.unwrap().0, 200);

    let (status, reply) = node
        .request("POST", "/publish", &[ct, ("Authorization", &good)], body)
        .await;
    assert_eq!(status, 200, "{reply}");
    let (channel, data, _) = sub.next().await;
    assert_eq!((channel.as_str(), data), ("guarded", json!("x")));
}

// === operations ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_publishing_follow_redis() {
    let mut redis = RedisServer::start();
    let node = PublisherNode::start(&redis, &[]).await;
    let (status, ready) = node.request("GET", "/readyz", &[], "").await;
    assert_eq!((status, ready), (200, json!({"status": "ready"})));
    let m = node.metrics().await;
    for name in [
        "publisher_ticks_total",
        "publisher_alerts_total",
        "publisher_published_total",
        "publisher_publish_errors_total",
        "publisher_leader",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(m.has(name), "missing metric {name}");
    }

    redis.kill();
    eventually("/readyz 503 without Redis", async || {
        let (status, _) = node.request("GET", "/readyz", &[], "").await;
        (status == 503).then_some(())
    })
    .await;
    let (status, reply) = node.post("/publish", r#"{"channel":"x","data":1}"#).await;
    assert_eq!(status, 503, "{reply}");
    assert_eq!(reply["error"], "redis_unavailable");
    assert!(node.metrics().await.get("publisher_publish_errors_total") >= 1.0);
    eventually("the leader to step down", async || {
        (!node.is_leader().await).then_some(())
    })
    .await;

    redis.restart();
    eventually("/readyz 200 with Redis back", async || {
        let (status, _) = node.request("GET", "/readyz", &[], "").await;
        (status == 200).then_some(())
    })
    .await;
    // The lease went with Redis' data; the node takes it again and ticks.
    let mut sub = Subscriber::channels(&redis, &["ticks"]).await;
    let ticks = collect_ticks(&mut sub, 2).await;
    assert_slots_unique_and_ordered(&ticks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_errors_exit_2_naming_the_key() {
    let dir = TempDir::new("config");
    let file = dir.path().join("publisher.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\n[redis]\nbogus = 1\n").unwrap();
    let file = file.to_str().unwrap();

    let cases: [(Headers, &[&str], &str); 8] = [
        (&[("PUBLISHER__TICK__BOGUS", "1")], &["run"], "tick.bogus"),
        (&[("PUBLISHER__NOPE", "1")], &[], "nope"),
        (
            &[("PUBLISHER__LEASE__TTL_MS", "soon")],
            &["run"],
            "lease.ttl_ms",
        ),
        (
            &[("PUBLISHER__TICK__INTERVAL_MS", "0")],
            &["run"],
            "tick.interval_ms",
        ),
        (
            &[("PUBLISHER__ALERTS__CHANNEL", "a b")],
            &["alert", "--level", "info", "x"],
            "alerts.channel",
        ),
        (&[], &["--config", file, "run"], "redis.bogus"),
        (&[], &["run", "--set", "tick.bogus=1"], "tick.bogus"),
        (&[], &["--listen", "nowhere"], "listen"),
    ];
    for (env, args, key) in cases {
        let (status, _, stderr) = tests::publisher_cli(env, args).await;
        assert_eq!(status.code(), Some(2), "{env:?} {args:?}: {stderr}");
        assert!(
            stderr.contains(key),
            "{env:?} {args:?} should name {key}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_commands_fail_fast_without_redis() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let env = [("PUBLISHER__REDIS__URL", url.as_str())];
    let dir = TempDir::new("noredis");
    let log = dir.path().join("app.log");
    std::fs::write(&log, "").unwrap();
    for args in [
        vec!["alert", "--level", "critical", "Fire"],
        vec!["publish", "chat:lobby", "hi"],
        vec!["tail", log.to_str().unwrap(), "--channel", "logs"],
    ] {
        let started = Instant::now();
        let (status, _, stderr) = tests::publisher_cli(&env, &args).await;
        assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("cannot reach Redis"), "{args:?}: {stderr}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{args:?} took too long"
        );
    }
}

// === tail ===

/// A `publisher tail` process whose log lines the test can wait for.
struct TailProcess {
    _child: Child,
    log: mpsc::UnboundedReceiver<String>,
}

impl TailProcess {
    async fn start(redis: &RedisServer, args: &[&str]) -> TailProcess {
        let mut child = publisher_command()
            .env("RUST_LOG", "info")
            .env("PUBLISHER__REDIS__URL", redis.url())
            .env("PUBLISHER__TAIL__POLL_INTERVAL_MS", "50")
            .arg("tail")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn publisher tail");
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut tail = TailProcess { _child: child, log };
        tail.wait_log("tailing").await;
        tail
    }

    async fn wait_log(&mut self, needle: &str) {
        loop {
            let line = tokio::time::timeout(TIMEOUT, self.log.recv())
                .await
                .unwrap_or_else(|_| panic!("no log line with {needle:?}"))
                .unwrap_or_else(|| panic!("tail exited before logging {needle:?}"));
            if line.contains(needle) {
                return;
            }
        }
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

async fn expect_lines(sub: &mut Subscriber, lines: impl IntoIterator<Item = String>) {
    for line in lines {
        let message = sub.next_on("logs").await;
        assert_eq!(message, json!({"line": line, "file": "app.log"}));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_publishes_new_lines_in_order_across_truncation_and_replacement() {
    let redis = RedisServer::start();
    let dir = TempDir::new("tail");
    let path = dir.path().join("app.log");
    append(&path, "old line 1\nold line 2\n");
    let mut sub = Subscriber::channels(&redis, &["logs"]).await;
    let _tail = TailProcess::start(&redis, &[path.to_str().unwrap(), "--channel", "logs"]).await;

    // A burst, written at once: every line, in order, and none of the old ones.
    let burst: Vec<String> = (0..300)
        .map(|i| format!("line {i:03} {}", "x".repeat(i % 50)))
        .collect();
    append(
        &path,
        &burst.iter().map(|l| format!("{l}\n")).collect::<String>(),
    );
    expect_lines(&mut sub, burst).await;

    // copytruncate: the file shrinks; reading restarts at its beginning.
    std::fs::File::create(&path).unwrap();
    append(&path, "after truncate 1\r\nafter truncate 2\n");
    expect_lines(
        &mut sub,
        ["after truncate 1".into(), "after truncate 2".into()],
    )
    .await;

    // rename and recreate: the old file's last lines first, then the new file from its start.
    append(&path, "last of the old file\n");
    std::fs::rename(&path, dir.path().join("app.log.1")).unwrap();
    append(&path, "new file 1\nnew file 2\n");
    expect_lines(
        &mut sub,
        [
            "last of the old file".into(),
            "new file 1".into(),
            "new file 2".into(),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_keeps_lines_written_to_the_old_file_by_an_application_that_reopens_late() {
    let redis = RedisServer::start();
    let dir = TempDir::new("tail-late");
    let path = dir.path().join("app.log");
    let rotated = dir.path().join("app.log.1");
    append(&path, "");
    let mut sub = Subscriber::channels(&redis, &["logs"]).await;
    let mut tail = TailProcess::start(&redis, &[path.to_str().unwrap(), "--channel", "logs"]).await;
    // The application holds its log open, as a logger does.
    let mut app = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    use std::io::Write;
    app.write_all(b"before rotation\n").unwrap();
    expect_lines(&mut sub, ["before rotation".into()]).await;

    // logrotate with `create`: rename, a new empty file; the application goes on writing to
    // the old one until its postrotate signal, after the tail already switched.
    std::fs::rename(&path, &rotated).unwrap();
    append(&path, "");
    tail.wait_log("file rotated").await;
    app.write_all(b"written late to the old file\n").unwrap();
    expect_lines(&mut sub, ["written late to the old file".into()]).await;
    // The signal: it reopens the path.
    drop(app);
    append(&path, "after reopening\n");
    expect_lines(&mut sub, ["after reopening".into()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_from_start_publishes_existing_lines_and_waits_for_line_ends() {
    let redis = RedisServer::start();
    let dir = TempDir::new("tail-start");
    let path = dir.path().join("app.log");
    append(&path, "first\nsecond\nthird without end");
    let mut sub = Subscriber::channels(&redis, &["logs"]).await;
    let _tail = TailProcess::start(
        &redis,
        &[path.to_str().unwrap(), "--channel", "logs", "--from-start"],
    )
    .await;
    expect_lines(&mut sub, ["first".into(), "second".into()]).await;
    append(&path, " yet\n");
    expect_lines(&mut sub, ["third without end yet".into()]).await;
}

// === end to end, through a gateway ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_and_alerts_reach_websocket_clients_through_a_gateway() {
    let cluster = Cluster::start(1).await;
    let node = PublisherNode::start(&cluster.redis, &[]).await;
    let (mut client, _) =
        WsClient::connect_welcomed(&cluster.nodes[0].ws_url("channels=ticks,alerts")).await;

    let first = client.until_message("ticks").await;
    let second = client.until_message("ticks").await;
    assert_eq!(
        second["data"]["seq"],
        first["data"]["seq"].as_u64().unwrap() + 1
    );

    let (status, _) = node
        .post(
            "/alerts",
            r#"{"level":"critical","text":"Fire in building 3"}"#,
        )
        .await;
    assert_eq!(status, 200);
    let alert = client.until_message("alerts").await;
    assert_eq!(alert["data"]["level"], "critical");
    assert_eq!(alert["data"]["text"], "Fire in building 3");

    let url = cluster.redis.url();
    let (status, _, stderr) = tests::publisher_cli(
        &[("PUBLISHER__REDIS__URL", url.as_str())],
        &["alert", "--level", "info", "--title", "Deploy", "v2 is out"],
    )
    .await;
    assert!(status.success(), "{stderr}");
    let alert = client.until_message("alerts").await;
    assert_eq!(alert["data"]["title"], "Deploy");
    assert_eq!(alert["data"]["text"], "v2 is out");
}

// === helpers ===
