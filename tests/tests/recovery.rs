//! A node's own recovery (docs/REFERENCE.md §5): when its pub/sub connection is
//! replaced — killed, refused for a while, or silently partitioned — every session keeps its
//! connection and receives every message that has history exactly once, in order, or a
//! `history_gone`; never a duplicate, never a silent gap.
//!
//! The outages are real: the gateways log in to Redis as their own user, which the test cuts
//! off (`ACL SETUSER … off` + `CLIENT KILL USER …`: new connections are refused) while the
//! publisher, as another user, goes on publishing. The silent partition runs Redis in a
//! network namespace and takes the link down (no RST: only the PING can tell).

use std::time::Duration;
use tests::Frames;

use serde_json::json;
use tests::{
    bin_path, eventually, expect_error, expect_quiet, expect_sequence, http_request, publish,
    redis, Cluster, GatewayNode, NetNs, PublisherNode, RedisServer, WsClient,
};

const USER: &str = "gw";

/// One node that notices a lost connection fast and reconnects fast, logging in as [`USER`].
async fn cluster(env: &[(&str, &str)]) -> Cluster {
    let mut builder = Cluster::builder()
        .nodes(1)
        .redis_user(USER)
        .env("GATEWAY__REDIS__PING_INTERVAL_MS", "200")
        .env("GATEWAY__REDIS__TIMEOUT_MS", "1000")
        .env("GATEWAY__REDIS__BACKOFF_MIN_MS", "50")
        .env("GATEWAY__REDIS__BACKOFF_MAX_MS", "200");
    for (key, value) in env {
        builder = builder.env(key, value);
    }
    builder.start().await
}

async fn publisher(cluster: &Cluster) -> PublisherNode {
    PublisherNode::start(&cluster.redis, &[("PUBLISHER__TICK__ENABLED", "false")]).await
}

/// Cut the node off from Redis and wait until it knows.
async fn outage(cluster: &Cluster) {
    cluster.redis.cut_off(USER);
    cluster.nodes[0].await_ready(503).await;
}

async fn back(cluster: &Cluster) {
    cluster.redis.let_in(USER);
    cluster.nodes[0].await_ready(200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_channels_are_caught_up_after_a_reconnect() {
    let cluster = cluster(&[]).await;
    let publisher = publisher(&cluster).await;
    let node = &cluster.nodes[0];
    // A has received nothing on its channel yet; B has.
    let (mut a, _) = WsClient::connect_welcomed(&node.ws_url("channels=q:news")).await;
    let (mut b, _) = WsClient::connect_welcomed(&node.ws_url("channels=q:news2")).await;
    publish(publisher.port, "q:news2", 1).await;
    expect_sequence(&mut b, "q:news2", 1, 1).await;

    outage(&cluster).await;
    publish(publisher.port, "q:news", 1).await;
    publish(publisher.port, "q:news2", 2).await;
    back(&cluster).await;

    expect_sequence(&mut a, "q:news", 1, 1).await;
    expect_sequence(&mut b, "q:news2", 2, 2).await;
    publish(publisher.port, "q:news", 2).await;
    expect_sequence(&mut a, "q:news", 2, 2).await;
    expect_quiet(&mut a, "q:news").await;
    expect_quiet(&mut b, "q:news2").await;
    assert_eq!(cluster.redis.numsub("q:news"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_since_resume_during_an_outage_waits_for_the_subscription_and_misses_nothing() {
    let cluster = cluster(&[]).await;
    let publisher = publisher(&cluster).await;
    let node = &cluster.nodes[0];
    let first = publish(publisher.port, "r:news", 1).await;
    publish(publisher.port, "r:news", 2).await;

    outage(&cluster).await;
    let mut client =
        WsClient::connect(&node.ws_url(&format!("channels=r:news&since=r:news@{first}"))).await;
    // No welcome while the node cannot receive the channel: it would be a promise it cannot
    // keep.
    if let Some(early) = client.next_within(Duration::from_millis(500)).await {
        panic!("the session was answered before its subscription was in place: {early:?}");
    }
    publish(publisher.port, "r:news", 3).await;
    back(&cluster).await;

    let welcome = client.expect_type("welcome").await;
    assert_eq!(welcome["channels"], json!(["r:news"]));
    expect_sequence(&mut client, "r:news", 2, 3).await;
    publish(publisher.port, "r:news", 4).await;
    expect_sequence(&mut client, "r:news", 4, 4).await;
    expect_quiet(&mut client, "r:news").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_during_an_outage_is_answered_once_live_and_the_session_stays_responsive() {
    let cluster = cluster(&[]).await;
    let publisher = publisher(&cluster).await;
    let (mut client, _) =
        WsClient::connect_welcomed(&cluster.nodes[0].ws_url("channels=w:a")).await;
    outage(&cluster).await;
    client
        .send_json(json!({"type": "subscribe", "channel": "w:b", "id": 1}))
        .await;
    // The session answers other frames meanwhile.
    let pong = client.request(json!({"type": "ping", "id": 2})).await;
    assert_eq!(pong["type"], "pong", "{pong}");
    // A subscribe cancelled before it was in place is answered `unsubscribed`.
    client
        .send_json(json!({"type": "subscribe", "channel": "w:c", "id": 3}))
        .await;
    client
        .send_json(json!({"type": "unsubscribe", "channel": "w:c", "id": 4}))
        .await;
    for id in [3, 4] {
        let frame = client.expect_type("unsubscribed").await;
        assert_eq!(frame["id"], id, "{frame}");
    }
    back(&cluster).await;
    let ack = client.expect_type("subscribed").await;
    assert_eq!(ack["id"], 1);
    publish(publisher.port, "w:b", 1).await;
    expect_sequence(&mut client, "w:b", 1, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_during_resubscription_never_leave_a_gap_or_a_duplicate() {
    // Many channels and small batches, so that resubscribing takes many round trips and the
    // kills below land while it is under way.
    let cluster = cluster(&[
        ("GATEWAY__LIMITS__MAX_SUBSCRIPTIONS", "6000"),
        ("GATEWAY__REDIS__RESUBSCRIBE_BATCH", "10"),
    ])
    .await;
    let publisher = publisher(&cluster).await;
    let node = &cluster.nodes[0];
    let (mut filler, _) = WsClient::connect_welcomed(&node.ws_url("channels=k:0")).await;
    for i in 1..5000 {
        filler
            .send_json(json!({"type": "subscribe", "channel": format!("k:{i}")}))
            .await;
    }
    for _ in 1..5000 {
        filler.expect_type("subscribed").await;
    }
    let (mut client, _) = WsClient::connect_welcomed(&node.ws_url("channels=k:x")).await;
    let mut n = 1;
    publish(publisher.port, "k:x", n).await;

    for delay_ms in [0, 5, 20, 60] {
        outage(&cluster).await;
        n += 1;
        publish(publisher.port, "k:x", n).await; // missed: only history has it
        cluster.redis.let_in(USER);
        // Published while the node resubscribes or catches up (held), then killed again.
        eventually("the node reconnects", async || {
            (node.metrics().await.get("gateway_redis_connected") == 1.0).then_some(())
        })
        .await;
        n += 1;
        publish(publisher.port, "k:x", n).await;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        cluster.redis.cli(&["CLIENT", "KILL", "USER", USER]);
        n += 1;
        publish(publisher.port, "k:x", n).await;
    }
    node.await_ready(200).await;
    n += 1;
    publish(publisher.port, "k:x", n).await;
    expect_sequence(&mut client, "k:x", 1, n).await;
    expect_quiet(&mut client, "k:x").await;
    assert_eq!(cluster.redis.numsub("k:x"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_whose_history_read_fails_is_told_never_skipped() {
    let cluster = cluster(&[]).await;
    let publisher = publisher(&cluster).await;
    let (mut client, _) =
        WsClient::connect_welcomed(&cluster.nodes[0].ws_url("channels=f:x")).await;
    publish(publisher.port, "f:x", 1).await;
    expect_sequence(&mut client, "f:x", 1, 1).await;

    outage(&cluster).await;
    publish(publisher.port, "f:x", 2).await;
    // Back, but unable to read history (pub/sub and publishing still allowed).
    let (user, forbid) = (USER, ["-@scripting", "-xrange", "-get", "-exec"]);
    let mut args = vec!["ACL", "SETUSER", user];
    args.extend(forbid);
    cluster.redis.cli(&args);
    back(&cluster).await;
    publish(publisher.port, "f:x", 3).await;
    // Every channel of the session is told, its personal one included; find this one's.
    while expect_error(&mut client, "history_gone").await["channel"] != "f:x" {}
    let next = client.until_message("f:x").await;
    assert_eq!(next["data"]["n"], 3, "{next}");

    // Readable again: the next outage is caught up as usual.
    cluster.redis.cli(&["ACL", "SETUSER", user, "+@all"]);
    outage(&cluster).await;
    publish(publisher.port, "f:x", 4).await;
    back(&cluster).await;
    expect_sequence(&mut client, "f:x", 4, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_subscriber_is_never_caught_up_from_before_it_subscribed() {
    let cluster = cluster(&[("GATEWAY__REDIS__UNSUBSCRIBE_DELAY_MS", "20")]).await;
    let publisher = publisher(&cluster).await;
    let node = &cluster.nodes[0];
    // Messages still in flight when the channel is released must not leave a position
    // behind: publish fast from several producers while the node unsubscribes.
    let (mut a, _) = WsClient::connect_welcomed(&node.ws_url("channels=s:other")).await;
    a.request(json!({"type": "subscribe", "channel": "s:x"}))
        .await;
    let bursts: Vec<_> = (0..4)
        .map(|i| tests::publish_in_background(publisher.port, "s:x", i * 100 + 1..=i * 100 + 100))
        .collect();
    for _ in 0..10 {
        a.until_message("s:x").await;
    }
    a.request(json!({"type": "unsubscribe", "channel": "s:x"}))
        .await;
    eventually("the node unsubscribes", async || {
        (cluster.redis.numsub("s:x") == 0).then_some(())
    })
    .await;
    for burst in bursts {
        burst.await.unwrap();
    }

    // A new subscriber that receives nothing before the node's connection is replaced: what
    // it gets after is what was published after it subscribed, nothing older.
    let (mut b, _) = WsClient::connect_welcomed(&node.ws_url("channels=s:x")).await;
    outage(&cluster).await;
    publish(publisher.port, "s:x", 1000).await;
    back(&cluster).await;
    publish(publisher.port, "s:x", 1001).await;
    expect_sequence(&mut b, "s:x", 1000, 1001).await;
    expect_quiet(&mut b, "s:x").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_that_cannot_replay_tells_the_sessions_history_gone() {
    let cluster = cluster(&[("GATEWAY__HISTORY__MAX_REPLAY", "3")]).await;
    let publisher = publisher(&cluster).await;
    let (mut client, _) =
        WsClient::connect_welcomed(&cluster.nodes[0].ws_url("channels=g:x")).await;
    publish(publisher.port, "g:x", 1).await;
    expect_sequence(&mut client, "g:x", 1, 1).await;
    outage(&cluster).await;
    for n in 2..=6 {
        publish(publisher.port, "g:x", n).await;
    }
    back(&cluster).await;
    let gone = expect_error(&mut client, "history_gone").await;
    assert_eq!(gone["channel"], "g:x");
    publish(publisher.port, "g:x", 7).await;
    let next = client.until_message("g:x").await;
    assert_eq!(next["data"]["n"], 7, "{next}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_with_since_on_a_channel_already_held_replays_nothing() {
    let cluster = cluster(&[]).await;
    let publisher = publisher(&cluster).await;
    let (mut client, _) =
        WsClient::connect_welcomed(&cluster.nodes[0].ws_url("channels=d:x")).await;
    let first = publish(publisher.port, "d:x", 1).await;
    publish(publisher.port, "d:x", 2).await;
    expect_sequence(&mut client, "d:x", 1, 2).await;
    let ack = client
        .request(json!({"type": "subscribe", "channel": "d:x", "since": first, "id": 9}))
        .await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    expect_quiet(&mut client, "d:x").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_larger_than_the_send_queue_is_history_gone_not_a_cut_off() {
    let cluster = cluster(&[("GATEWAY__LIMITS__SEND_QUEUE_BYTES", "4096")]).await;
    let publisher = publisher(&cluster).await;
    let big = "x".repeat(1000);
    let mut first = String::new();
    for n in 0..8 {
        let body = json!({"channel": "b:x", "data": {"n": n, "pad": big}}).to_string();
        let headers = [("Content-Type", "application/json")];
        let (status, reply) = http_request(publisher.port, "POST", "/publish", &headers, &body)
            .await
            .unwrap();
        assert_eq!(status, 200, "{reply}");
        if n == 0 {
            let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
            first = reply["offset"].as_str().unwrap().to_owned();
        }
    }
    let url = cluster.nodes[0].ws_url(&format!("channels=b:x&since=b:x@{first}"));
    let (mut client, _) = WsClient::connect_welcomed(&url).await;
    let gone = expect_error(&mut client, "history_gone").await;
    assert!(
        gone["message"]
            .as_str()
            .unwrap()
            .contains("send_queue_bytes"),
        "{gone}"
    );
    publish(publisher.port, "b:x", 100).await;
    assert_eq!(client.until_message("b:x").await["data"]["n"], 100);
}

/// `publisher publish` run inside the namespace, against Redis on its loopback: it publishes
/// whatever the state of the link.
fn publish_inside(ns: &NetNs, redis: &RedisServer, channel: &str, n: u64) {
    let out = ns
        .command(bin_path("publisher-node"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "PUBLISHER__REDIS__URL",
            format!("redis://127.0.0.1:{}", redis.port),
        )
        .args(["publish", channel, &json!({ "n": n }).to_string()])
        .output()
        .expect("run publisher-node inside the namespace");
    assert!(
        out.status.success(),
        "publish {n}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_partition_is_detected_and_leaves_one_subscription_and_no_duplicates() {
    let ns = match NetNs::create() {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("SKIPPED: this test needs network namespaces (run as root): {e}");
            return;
        }
    };
    let redis = RedisServer::start_in(&ns);
    let env: Vec<(String, String)> = [
        ("GATEWAY__REDIS__URL", redis.url().as_str()),
        ("GATEWAY__REDIS__PING_INTERVAL_MS", "300"),
        ("GATEWAY__REDIS__TIMEOUT_MS", "500"),
        ("GATEWAY__REDIS__BACKOFF_MIN_MS", "100"),
        ("GATEWAY__REDIS__BACKOFF_MAX_MS", "300"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let node = GatewayNode::start("gw-1", &env).await;
    node.await_ready(200).await;
    let (mut client, _) = WsClient::connect_welcomed(&node.ws_url("channels=p:a")).await;
    // More sessions: one also on a live-only channel (plain PUBLISH), one on nothing at all.
    let (mut both, _) = WsClient::connect_welcomed(&node.ws_url("channels=p:a,p:plain")).await;
    let (mut idle, _) = WsClient::connect_welcomed(&node.ws_url("channels=p:idle")).await;
    publish_inside(&ns, &redis, "p:a", 1);
    expect_sequence(&mut client, "p:a", 1, 1).await;
    expect_sequence(&mut both, "p:a", 1, 1).await;

    let cut = std::time::Instant::now();
    ns.partition();
    node.await_ready(503).await;
    let detected = cut.elapsed();
    publish_inside(&ns, &redis, "p:a", 2);
    publish_inside(&ns, &redis, "p:a", 3);
    // Live only: no node is subscribed while the link is down, so nobody gets this one.
    redis.cli(&["PUBLISH", "p:plain", "\"during\""]);
    // Every session stays open and answers meanwhile; liveness never follows Redis.
    for session in [&mut client, &mut both, &mut idle] {
        let pong = session.request(json!({"type": "ping", "id": 1})).await;
        assert_eq!(pong["type"], "pong", "{pong}");
    }
    assert_eq!(node.admin_get("/healthz").await.0, 200);
    // Let the node try (and fail) to reconnect across the dead link for a while.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ns.heal();
    let healed = std::time::Instant::now();
    node.await_ready(200).await;
    let recovered = healed.elapsed();
    for n in 4..=6 {
        publish_inside(&ns, &redis, "p:a", n);
    }
    expect_sequence(&mut client, "p:a", 2, 6).await;
    expect_sequence(&mut both, "p:a", 2, 6).await;
    redis.cli(&["PUBLISH", "p:plain", "\"after\""]);
    assert_eq!(both.until_message("p:plain").await["data"], "after");
    // Nobody was closed.
    let metrics = node.metrics().await;
    assert_eq!(metrics.get("gateway_connections"), 3.0);
    let closed: f64 = metrics
        .series
        .iter()
        .filter(|(k, _)| k.starts_with("gateway_disconnects_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(closed, 0.0, "sessions were closed during the partition");
    // Found by the PING (every 300 ms, 500 ms to answer), not by an error.
    assert!(
        detected < Duration::from_millis(300 + 500 + 1000),
        "the partition was noticed after {detected:?}"
    );
    eprintln!(
        "measured: partition noticed (/readyz 503) after {} ms with ping_interval 300 ms and timeout 500 ms; ready {} ms after the link came back",
        detected.as_millis(),
        recovered.as_millis()
    );
    // The connection declared dead was closed: once the link is back, Redis drops it.
    eventually("one subscription for the node", async || {
        (redis.numsub("p:a") == 1).then_some(())
    })
    .await;
    for n in 7..=8 {
        publish_inside(&ns, &redis, "p:a", n);
    }
    expect_sequence(&mut client, "p:a", 7, 8).await;
    expect_quiet(&mut client, "p:a").await;
    expect_sequence(&mut both, "p:a", 7, 8).await;
    expect_quiet(&mut both, "p:a").await;
    expect_quiet(&mut idle, "p:idle").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_with_since_during_a_catch_up_gets_its_replay_once_after_subscribed() {
    let cluster = cluster(&[]).await;
    let publisher = publisher(&cluster).await;
    let node = &cluster.nodes[0];
    let (mut stays, _) = WsClient::connect_welcomed(&node.ws_url("channels=j:x")).await;
    let mut joiners = Vec::new();
    for _ in 0..4 {
        joiners.push(
            WsClient::connect_welcomed(&node.ws_url("channels=j:other"))
                .await
                .0,
        );
    }
    let first = publish(publisher.port, "j:x", 1).await;
    expect_sequence(&mut stays, "j:x", 1, 1).await;

    // Enough missed that handing the catch-up to the hub takes a while.
    outage(&cluster).await;
    for n in 2..=40 {
        publish(publisher.port, "j:x", n).await;
    }
    // Back, but the catch-up cannot read yet: Redis takes exactly one more client (the
    // node's pub/sub connection), so the connection the history read needs is refused and
    // the read is retried, while the channel waits to be live again.
    let mut admin = cluster.redis.connection().await;
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query_async(&mut admin)
        .await
        .unwrap();
    let clients: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("connected_clients");
    let set_max = |n: u64| {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("SET").arg("maxclients").arg(n);
        cmd
    };
    let () = set_max(clients + 1).query_async(&mut admin).await.unwrap();
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(USER)
        .arg("on")
        .query_async(&mut admin)
        .await
        .unwrap();
    eventually("the node's pub/sub connection", async || {
        (node.metrics().await.get("gateway_redis_connected") == 1.0).then_some(())
    })
    .await;
    // Sessions resume the channel meanwhile, from before the outage.
    for joins in &mut joiners {
        joins
            .send_json(json!({"type": "subscribe", "channel": "j:x", "id": 7, "since": first}))
            .await;
    }
    for n in 41..=43 {
        publish(publisher.port, "j:x", n).await;
    }
    let () = set_max(10_000).query_async(&mut admin).await.unwrap();

    // What the node caught up for its other sessions is not this one's: `subscribed` first,
    // then its own replay, each message once.
    for joins in &mut joiners {
        let ack = joins.frame().await;
        assert_eq!(
            (&ack["type"], &ack["id"]),
            (&json!("subscribed"), &json!(7)),
            "a frame of the channel before `subscribed`: {ack}"
        );
    }
    node.await_ready(200).await;
    publish(publisher.port, "j:x", 44).await;
    for joins in &mut joiners {
        expect_sequence(joins, "j:x", 2, 44).await;
        expect_quiet(joins, "j:x").await;
    }
    expect_sequence(&mut stays, "j:x", 2, 44).await;
    expect_quiet(&mut stays, "j:x").await;
}
