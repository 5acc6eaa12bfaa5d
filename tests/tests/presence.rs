//! Presence and the server API (docs/REFERENCE.md §8) against real processes: two gateway
//! nodes and a real redis-server (and once a real Redis Cluster), the real publisher program
//! for the server API and its CLI, and WebSocket clients. Every wait is bounded by
//! `tests::TIMEOUT` or a stated deadline; nothing sleeps where a condition can be awaited.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::{eventually, Cluster, GatewayNode, PublisherNode, RedisCluster, WsClient, TIMEOUT};

const API_KEY: &str = "presence-test-key";
const BEARER: &str = "Bearer presence-test-key";
const SECRET: &str = "presence-test-secret-0123456789abcdef";

/// Skip frames until one satisfies `pred`; the frame.
async fn until(client: &mut WsClient, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.next_within(left).await {
            Some(tests::Received::Frame(frame)) if pred(&frame) => return frame,
            Some(tests::Received::Frame(_)) => continue,
            Some(tests::Received::Closed(code)) => panic!("closed ({code:?}) waiting for {what}"),
            None => panic!("no {what} within {TIMEOUT:?}"),
        }
    }
}

/// The next `join`/`leave` of `client_id` on `channel`.
async fn event(client: &mut WsClient, kind: &str, channel: &str, client_id: &str) -> Value {
    until(client, &format!("{kind} of {client_id}"), |f| {
        f["type"] == kind && f["channel"] == channel && f["client_id"] == client_id
    })
    .await
}

/// The `join`s or `leave`s of `client_id` on every one of `channels`, in whatever order they
/// come (on a Redis Cluster, channels of different shards arrive on different connections).
async fn events(client: &mut WsClient, kind: &str, channels: &[String], client_id: &str) {
    let mut missing: Vec<&String> = channels.iter().collect();
    while !missing.is_empty() {
        let frame = until(client, &format!("{kind}s of {client_id}"), |f| {
            f["type"] == kind && f["client_id"] == client_id
        })
        .await;
        missing.retain(|c| frame["channel"] != c.as_str());
    }
}

/// Ask for presence; the `(client_id, node)` pairs, sorted.
async fn presence(client: &mut WsClient, channel: &str) -> Vec<(String, String)> {
    client
        .send_json(json!({"type": "presence", "channel": channel, "id": "p"}))
        .await;
    let reply = until(client, "presence reply", |f| f["id"] == "p").await;
    assert_eq!(reply["type"], "presence", "{reply}");
    assert_eq!(reply["channel"], channel);
    pairs(&reply["clients"])
}

fn pairs(clients: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = clients
        .as_array()
        .unwrap_or_else(|| panic!("clients is not a list: {clients}"))
        .iter()
        .map(|c| {
            assert!(c["session"].as_str().is_some_and(|s| s.len() == 36), "{c}");
            (
                c["client_id"].as_str().unwrap().to_owned(),
                c["node"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

fn pair(client_id: &str, node: &str) -> (String, String) {
    (client_id.to_owned(), node.to_owned())
}

async fn connect(node: &GatewayNode, client_id: &str, channels: &str) -> (WsClient, String) {
    let (mut client, welcome) = WsClient::connect_welcomed(
        &node.ws_url(&format!("client_id={client_id}&channels={channels}")),
    )
    .await;
    client.presence_events = true;
    let session = welcome["session"].as_str().unwrap().to_owned();
    (client, session)
}

async fn api_get(publisher: &PublisherNode, path: &str) -> (u16, Value) {
    publisher
        .request("GET", path, &[("Authorization", BEARER)], "")
        .await
}

async fn api_post(publisher: &PublisherNode, path: &str, body: &str) -> (u16, Value) {
    let headers = [
        ("Authorization", BEARER),
        ("Content-Type", "application/json"),
    ];
    publisher.request("POST", path, &headers, body).await
}

async fn publisher(cluster: &Cluster) -> PublisherNode {
    PublisherNode::start(
        &cluster.redis,
        &[
            ("PUBLISHER__TICK__ENABLED", "false"),
            ("PUBLISHER__API_KEY", API_KEY),
        ],
    )
    .await
}

/// Runs a one-shot publisher command on `redis_url`: (success, stdout).
async fn cli(redis_url: &str, args: &[&str]) -> (bool, String) {
    let (status, stdout, stderr) =
        tests::publisher_cli(&[("PUBLISHER__REDIS__URL", redis_url)], args).await;
    assert!(status.success() || !stderr.is_empty(), "{args:?}");
    (status.success(), stdout)
}

// === presence across nodes ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_lists_both_nodes_and_join_leave_reach_both() {
    let cluster = Cluster::start(2).await;
    let (gw1, gw2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (mut alice, alice_session) = connect(gw1, "alice", "chat:room").await;
    event(&mut alice, "join", "chat:room", "alice").await;
    let (mut bob, bob_session) = connect(gw2, "bob", "chat:room").await;
    // Bob's join reaches alice on the other node, with his session.
    let join = event(&mut alice, "join", "chat:room", "bob").await;
    assert_eq!(join["session"], bob_session.as_str());
    let expected = vec![pair("alice", "gw-1"), pair("bob", "gw-2")];
    assert_eq!(presence(&mut alice, "chat:room").await, expected);
    assert_eq!(presence(&mut bob, "chat:room").await, expected);

    // A third session joins on gw-1: bob, on gw-2, hears it.
    let (mut carol, _) = connect(gw1, "carol", "chat:room").await;
    event(&mut bob, "join", "chat:room", "carol").await;

    // Unsubscribing leaves at once: the leave reaches both nodes and presence no longer
    // lists the session, as soon as the leave has arrived.
    alice
        .send_json(json!({"type": "unsubscribe", "channel": "chat:room", "id": "u"}))
        .await;
    let reply = until(&mut alice, "unsubscribed", |f| f["id"] == "u").await;
    assert_eq!(reply["type"], "unsubscribed");
    let leave = event(&mut bob, "leave", "chat:room", "alice").await;
    assert_eq!(leave["session"], alice_session.as_str());
    event(&mut carol, "leave", "chat:room", "alice").await;
    assert_eq!(
        presence(&mut bob, "chat:room").await,
        vec![pair("bob", "gw-2"), pair("carol", "gw-1")]
    );
    // Alice is no longer subscribed: she may not ask.
    alice
        .send_json(json!({"type": "presence", "channel": "chat:room", "id": 1}))
        .await;
    let refused = until(&mut alice, "refusal", |f| f["id"] == 1).await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["code"], "forbidden");

    // Closing leaves at once too.
    drop(carol);
    event(&mut bob, "leave", "chat:room", "carol").await;
    assert_eq!(
        presence(&mut bob, "chat:room").await,
        vec![pair("bob", "gw-2")]
    );
    let m = gw1.metrics().await;
    assert!(m.get("gateway_presence_entries_written_total") >= 2.0);
    assert_eq!(m.get("gateway_presence_entries"), 0.0);
    assert!(m.get(r#"gateway_presence_entries_removed_total{reason="leave"}"#) >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_entries_expire_within_the_ttl() {
    const TTL_MS: u64 = 1500;
    let mut cluster = Cluster::builder()
        .nodes(2)
        .env("GATEWAY__PRESENCE__TTL_MS", &TTL_MS.to_string())
        .start()
        .await;
    let (mut alice, _) = connect(&cluster.nodes[0], "alice", "chat:ttl").await;
    let (_bob, _) = connect(&cluster.nodes[1], "bob", "chat:ttl").await;
    event(&mut alice, "join", "chat:ttl", "bob").await;
    // Entries outlive several refresh periods while their node lives.
    let alive_until = Instant::now() + Duration::from_millis(2 * TTL_MS);
    while Instant::now() < alive_until {
        assert_eq!(presence(&mut alice, "chat:ttl").await.len(), 2);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let killed = Instant::now();
    cluster.nodes[1].kill();
    eventually("bob's entry expired", async || {
        (presence(&mut alice, "chat:ttl").await == vec![pair("alice", "gw-1")]).then_some(())
    })
    .await;
    let gone_after = killed.elapsed();
    assert!(
        gone_after <= Duration::from_millis(TTL_MS + 1000),
        "gone after {gone_after:?}"
    );
    let m = cluster.nodes[0].metrics().await;
    assert!(m.get(r#"gateway_presence_entries_removed_total{reason="expired"}"#) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_takes_its_entries_along_at_once() {
    // The default TTL (30 s) is longer than any wait here: only the drain can remove them.
    let mut cluster = Cluster::start(2).await;
    let (mut alice, _) = connect(&cluster.nodes[0], "alice", "chat:drain").await;
    let (_bob, _) = connect(&cluster.nodes[1], "bob", "chat:drain").await;
    event(&mut alice, "join", "chat:drain", "bob").await;
    cluster.nodes[1].sigterm();
    event(&mut alice, "leave", "chat:drain", "bob").await;
    assert_eq!(
        presence(&mut alice, "chat:drain").await,
        vec![pair("alice", "gw-1")]
    );
    assert!(cluster.nodes[1].wait_exit(TIMEOUT).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_works_on_the_memory_bus() {
    // No Redis at all: one node, its own sessions are the whole presence.
    let node = GatewayNode::start("solo", &[]).await;
    let (mut a, _) = connect(&node, "ann", "chat:solo").await;
    let (mut b, b_session) = connect(&node, "ben", "chat:solo").await;
    let join = event(&mut a, "join", "chat:solo", "ben").await;
    assert_eq!(join["session"], b_session.as_str());
    let both = vec![pair("ann", "solo"), pair("ben", "solo")];
    assert_eq!(presence(&mut a, "chat:solo").await, both);
    assert_eq!(presence(&mut b, "chat:solo").await, both);
    drop(b);
    event(&mut a, "leave", "chat:solo", "ben").await;
    assert_eq!(
        presence(&mut a, "chat:solo").await,
        vec![pair("ann", "solo")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_message_addressed_to_one_node_acts_there_only() {
    let cluster = Cluster::start(2).await;
    let (mut on1, _) = connect(&cluster.nodes[0], "kim", "news").await;
    let (mut on2, _) = connect(&cluster.nodes[1], "kim", "news").await;
    // As an operator (or another node) would send it, by hand, through Redis.
    let message = r#"{"kind":"disconnect","client_id":"kim","node":"gw-2"}"#;
    cluster.redis.cli(&["PUBLISH", "#control", message]);
    assert_eq!(on2.expect_close_frame().await.0, 4409);
    // gw-1 ignored it: its session still answers.
    let pong = on1.request(json!({"type": "ping", "id": 1})).await;
    assert_eq!(pong["type"], "pong");
    // Garbage on the control channel is counted and ignored.
    cluster.redis.cli(&["PUBLISH", "#control", "not json"]);
    eventually("the invalid control message counted", async || {
        let m = cluster.nodes[0].metrics().await;
        (m.get(r#"gateway_control_messages_total{kind="invalid"}"#) == 1.0).then_some(())
    })
    .await;
    let pong = on1.request(json!({"type": "ping", "id": 2})).await;
    assert_eq!(pong["type"], "pong");
    let m = cluster.nodes[0].metrics().await;
    assert_eq!(
        m.get(r#"gateway_control_messages_total{kind="disconnect"}"#),
        0.0
    );
}

// === who may ask ===

fn token(sub: &str, channels: &[&str]) -> String {
    tests::hs256_token(SECRET, sub, json!({ "channels": channels }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_ask_presence_of_a_channel_it_may_not_see() {
    let cluster = Cluster::builder()
        .nodes(1)
        .env("GATEWAY__AUTH__SECRET", SECRET)
        .start()
        .await;
    let node = &cluster.nodes[0];
    let url = |sub: &str, channels: &[&str], subscribe: &str| {
        node.ws_url(&format!(
            "token={}&channels={subscribe}",
            token(sub, channels)
        ))
    };
    // Subscribed to chat:a; its token allows chat:a and news only.
    let (mut a, _) =
        WsClient::connect_welcomed(&url("a", &["chat:a", "news"], "chat:a,news")).await;
    let ask = |channel: &str, id: u32| json!({"type": "presence", "channel": channel, "id": id});
    for (frame, code) in [
        // Not subscribed, and the token does not allow it.
        (ask("chat:b", 1), "forbidden"),
        // Not a presence channel.
        (ask("news", 2), "not_presence"),
        // Not a channel name at all (the control channel's name included).
        (ask("#control", 3), "bad_channel"),
        (ask("", 4), "bad_channel"),
    ] {
        a.send_json(frame.clone()).await;
        let reply = until(&mut a, "reply", |f| f["id"] == frame["id"]).await;
        assert_eq!(reply["type"], "error", "{frame} → {reply}");
        assert_eq!(reply["code"], code, "{frame} → {reply}");
        assert_eq!(reply["id"], frame["id"]);
    }
    a.send_json(json!({"type": "presence", "id": 5})).await;
    let reply = until(&mut a, "reply", |f| f["id"] == 5).await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("bad_frame"))
    );
    // Nobody can subscribe to, or publish on, the control channel.
    for kind in ["subscribe", "publish"] {
        a.send_json(json!({"type": kind, "channel": "#control", "data": 1, "id": 6}))
            .await;
        let reply = until(&mut a, "reply", |f| f["id"] == 6).await;
        assert_eq!(reply["code"], "bad_channel", "{kind}: {reply}");
    }
    // Subscribed: allowed.
    assert_eq!(presence(&mut a, "chat:a").await, vec![pair("a", "gw-1")]);

    // A token whose `channels` claim allows chat:* may look into a room it has not joined.
    let (mut b, _) = WsClient::connect_welcomed(&url("b", &["chat:*"], "chat:x")).await;
    assert_eq!(presence(&mut b, "chat:a").await, vec![pair("a", "gw-1")]);
}

// === the server API ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_api_answers_json_and_refuses_bad_input() {
    let cluster = Cluster::start(2).await;
    let api = publisher(&cluster).await;
    let (mut d1, _) = connect(&cluster.nodes[0], "dave", "chat:api").await;
    let (_d2, _) = connect(&cluster.nodes[1], "dave", "chat:api").await;
    let (_e, _) = connect(&cluster.nodes[1], "erin", "chat:api").await;
    event(&mut d1, "join", "chat:api", "erin").await;

    // The API key guards every endpoint.
    for (method, path) in [
        ("GET", "/presence/chat:api"),
        ("GET", "/presence/chat:api/stats"),
        ("GET", "/history/chat:api"),
        ("GET", "/channels"),
        ("POST", "/disconnect"),
        ("POST", "/unsubscribe"),
    ] {
        let (status, reply) = api.request(method, path, &[], "{}").await;
        assert_eq!(status, 401, "{method} {path}: {reply}");
        assert_eq!(reply["error"], "unauthorized");
    }

    let (status, reply) = api_get(&api, "/presence/chat:api").await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        pairs(&reply["clients"]),
        vec![
            pair("dave", "gw-1"),
            pair("dave", "gw-2"),
            pair("erin", "gw-2")
        ]
    );
    let (status, reply) = api_get(&api, "/presence/chat:api/stats").await;
    assert_eq!(status, 200);
    assert_eq!(reply, json!({"num_clients": 3, "num_users": 2}));
    let (status, reply) = api_get(&api, "/presence/chat:nobody").await;
    assert_eq!((status, reply), (200, json!({"clients": []})));
    let (status, reply) = api_get(&api, "/presence/bad%20name").await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (400, Some("invalid_channel"))
    );

    // History: oldest first, `since` exclusive, `limit` caps.
    let mut offsets = Vec::new();
    for i in 0..3 {
        let (status, reply) = api_post(
            &api,
            "/publish",
            &json!({"channel": "chat:api", "data": {"n": i}}).to_string(),
        )
        .await;
        assert_eq!(status, 200, "{reply}");
        offsets.push(reply["offset"].as_str().unwrap().to_owned());
    }
    let (status, page) = api_get(&api, "/history/chat:api").await;
    assert_eq!(status, 200, "{page}");
    let epoch = offsets[0].split(':').next().unwrap();
    assert_eq!(page["epoch"], epoch);
    let got: Vec<(&str, &Value)> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["offset"].as_str().unwrap(), &m["data"]))
        .collect();
    assert_eq!(got.len(), 3);
    for (i, (offset, data)) in got.iter().enumerate() {
        assert_eq!(*offset, offsets[i]);
        assert_eq!(**data, json!({"n": i}));
    }
    let (_, page) = api_get(&api, &format!("/history/chat:api?since={}", offsets[0])).await;
    let after: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_str().unwrap())
        .collect();
    assert_eq!(after, [offsets[1].as_str(), offsets[2].as_str()]);
    let (_, page) = api_get(
        &api,
        &format!("/history/chat:api?since={}&limit=1", offsets[0]),
    )
    .await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 1);
    assert_eq!(page["messages"][0]["offset"], offsets[1].as_str());
    let (status, page) = api_get(&api, "/history/chat:none").await;
    assert_eq!(
        (status, page),
        (200, json!({"messages": [], "epoch": null}))
    );
    for (query, status, code) in [
        ("since=garbage", 400, "invalid_since"),
        ("limit=0", 400, "invalid_limit"),
        ("limit=abc", 400, "invalid_limit"),
        ("limit=100000", 400, "invalid_limit"),
        ("since=zzzzzzzz:1-0", 410, "history_gone"),
    ] {
        let (got, reply) = api_get(&api, &format!("/history/chat:api?{query}")).await;
        assert_eq!(
            (got, reply["error"].as_str()),
            (status, Some(code)),
            "{query}: {reply}"
        );
        assert!(reply["message"].is_string());
    }

    // Channels the gateways are subscribed to; never the control channel.
    let (status, reply) = api_get(&api, "/channels").await;
    assert_eq!(status, 200);
    let channels: Vec<&str> = reply["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for wanted in ["chat:api", "user:dave", "user:erin"] {
        assert!(channels.contains(&wanted), "{wanted} in {channels:?}");
    }
    assert!(!channels.iter().any(|c| c.contains('#')), "{channels:?}");

    // Bad bodies.
    for (path, body, code) in [
        ("/disconnect", "{}", "invalid_body"),
        ("/disconnect", "not json", "invalid_json"),
        (
            "/disconnect",
            r#"{"client_id":"bad id"}"#,
            "invalid_client_id",
        ),
        (
            "/disconnect",
            r#"{"client_id":"x","extra":1}"#,
            "invalid_body",
        ),
        ("/unsubscribe", r#"{"client_id":"x"}"#, "invalid_body"),
        (
            "/unsubscribe",
            r##"{"client_id":"x","channel":"#control"}"##,
            "invalid_channel",
        ),
        (
            "/unsubscribe",
            r#"{"client_id":"x","channel":"user:x"}"#,
            "invalid_channel",
        ),
    ] {
        let (status, reply) = api_post(&api, path, body).await;
        assert_eq!(
            (status, reply["error"].as_str()),
            (400, Some(code)),
            "{path} {body}: {reply}"
        );
    }
    // No such client: still 2xx.
    let (status, _) = api_post(&api, "/disconnect", r#"{"client_id":"nobody"}"#).await;
    assert_eq!(status, 200);
    let (status, _) = api_post(
        &api,
        "/unsubscribe",
        r#"{"client_id":"nobody","channel":"chat:x"}"#,
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_and_unsubscribe_reach_every_node_through_the_api_and_the_cli() {
    let cluster = Cluster::start(2).await;
    let api = publisher(&cluster).await;
    let url = cluster.redis.url();
    let (mut g, _) = connect(&cluster.nodes[1], "grace", "chat:ctl").await;
    let (mut f1, _) = connect(&cluster.nodes[0], "frank", "chat:ctl,news").await;
    let (mut f2, _) = connect(&cluster.nodes[1], "frank", "chat:ctl").await;
    // Both of frank's sessions are in the room (one join each).
    event(&mut g, "join", "chat:ctl", "frank").await;
    event(&mut g, "join", "chat:ctl", "frank").await;

    // Unsubscribe through the API: each of frank's sessions is told, on both nodes, within a
    // second; grace keeps hers and sees frank leave.
    let sent = Instant::now();
    let (status, reply) = api_post(
        &api,
        "/unsubscribe",
        r#"{"client_id":"frank","channel":"chat:ctl"}"#,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    for f in [&mut f1, &mut f2] {
        let frame = until(f, "unsubscribed", |f| f["type"] == "unsubscribed").await;
        assert_eq!(frame["channel"], "chat:ctl");
    }
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "{:?}",
        sent.elapsed()
    );
    event(&mut g, "leave", "chat:ctl", "frank").await;
    event(&mut g, "leave", "chat:ctl", "frank").await;
    assert_eq!(
        presence(&mut g, "chat:ctl").await,
        vec![pair("grace", "gw-2")]
    );
    // Frank's other channel stayed: a message on it still reaches him.
    let (status, _) = api_post(
        &api,
        "/publish",
        r#"{"channel":"news","data":"still here"}"#,
    )
    .await;
    assert_eq!(status, 200);
    until(&mut f1, "news", |f| {
        f["type"] == "message" && f["channel"] == "news"
    })
    .await;

    // The CLI: presence, channels, unsubscribe.
    let (ok, out) = cli(&url, &["presence", "chat:ctl"]).await;
    assert!(ok);
    let listed: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 1, "{out}");
    assert_eq!(listed[0]["client_id"], "grace");
    let (ok, out) = cli(&url, &["channels"]).await;
    assert!(ok);
    assert!(out.lines().any(|l| l == "chat:ctl"), "{out}");
    assert!(!out.contains('#'), "{out}");
    let (ok, _) = cli(&url, &["disconnect", "bad id"]).await;
    assert!(!ok, "a bad client id is refused");

    // Disconnect through the API: both of frank's sessions close with 4409 within a second.
    let sent = Instant::now();
    let (status, _) = api_post(&api, "/disconnect", r#"{"client_id":"frank"}"#).await;
    assert_eq!(status, 200);
    for f in [&mut f1, &mut f2] {
        let (code, reason) = f.expect_close_frame().await;
        assert_eq!(code, 4409, "{reason}");
    }
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "{:?}",
        sent.elapsed()
    );

    // Disconnect through the CLI: grace's session closes with 4409.
    let (ok, _) = cli(&url, &["disconnect", "grace"]).await;
    assert!(ok);
    let (code, _) = g.expect_close_frame().await;
    assert_eq!(code, 4409);
    let m = cluster.nodes[1].metrics().await;
    assert_eq!(
        m.get(r#"gateway_disconnects_total{reason="disconnected"}"#),
        2.0
    );
    assert_eq!(
        m.get(r#"gateway_control_messages_total{kind="disconnect"}"#),
        2.0
    );
    assert_eq!(
        m.get(r#"gateway_control_messages_total{kind="unsubscribe"}"#),
        1.0
    );
    eventually("presence empty", async || {
        let (_, reply) = api_get(&api, "/presence/chat:ctl").await;
        (reply["clients"] == json!([])).then_some(())
    })
    .await;
}

// === Redis Cluster ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_disconnect_work_on_a_redis_cluster() {
    let redis = RedisCluster::start();
    let env: Vec<(String, String)> = vec![("GATEWAY__REDIS__CLUSTER_NODES".into(), redis.seeds())];
    let gw1 = GatewayNode::start("gw-1", &env).await;
    let gw2 = GatewayNode::start("gw-2", &env).await;
    gw1.await_ready(200).await;
    gw2.await_ready(200).await;
    let api = PublisherNode::start_on_cluster(
        &redis,
        &[
            ("PUBLISHER__TICK__ENABLED", "false"),
            ("PUBLISHER__API_KEY", API_KEY),
        ],
    )
    .await;
    // Rooms on every shard.
    let rooms: Vec<String> = redis
        .one_channel_per_shard("chat:c")
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    let joined = rooms.join(",");
    let (mut h, _) = connect(&gw1, "heidi", &joined).await;
    let (mut i, _) = connect(&gw2, "ivan", &joined).await;
    events(&mut h, "join", &rooms, "ivan").await;
    for room in &rooms {
        let expected = vec![pair("heidi", "gw-1"), pair("ivan", "gw-2")];
        assert_eq!(presence(&mut i, room).await, expected, "{room}");
        let (status, reply) = api_get(&api, &format!("/presence/{room}")).await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(pairs(&reply["clients"]), expected, "{room}");
    }
    let (_, reply) = api_get(&api, "/channels").await;
    for room in &rooms {
        assert!(
            reply["channels"].as_array().unwrap().contains(&json!(room)),
            "{reply}"
        );
    }
    let (status, _) = api_post(&api, "/disconnect", r#"{"client_id":"ivan"}"#).await;
    assert_eq!(status, 200);
    assert_eq!(i.expect_close_frame().await.0, 4409);
    events(&mut h, "leave", &rooms, "ivan").await;
    for room in &rooms {
        assert_eq!(presence(&mut h, room).await, vec![pair("heidi", "gw-1")]);
    }
}
