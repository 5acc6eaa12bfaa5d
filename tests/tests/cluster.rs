//! Cross-node delivery: two real gateway nodes sharing one real redis-server.

use std::time::Duration;
use tests::Frames;

use serde_json::json;
use tests::{eventually, Cluster, Received, WsClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_publish_and_client_publish_reach_both_nodes() {
    let cluster = Cluster::start(2).await;
    let (mut a, welcome_a) =
        WsClient::connect_welcomed(&cluster.nodes[0].ws_url("channels=alerts,chat:lobby")).await;
    let (mut b, welcome_b) =
        WsClient::connect_welcomed(&cluster.nodes[1].ws_url("channels=alerts,chat:lobby")).await;
    assert_eq!(welcome_a["node"], "gw-1");
    assert_eq!(welcome_b["node"], "gw-2");
    assert_eq!(welcome_a["channels"], json!(["alerts", "chat:lobby"]));
    assert!(welcome_a["session"].as_str().is_some_and(|s| s.len() == 36));

    // The real redis-cli, as an operator would.
    let alert = r#"{"level":"critical","text":"Fire in building 3"}"#;
    assert_eq!(
        cluster.redis.cli(&["PUBLISH", "alerts", alert]),
        "2",
        "one subscriber per node"
    );
    for client in [&mut a, &mut b] {
        let msg = client.expect_type("message").await;
        assert_eq!(msg["channel"], "alerts");
        assert_eq!(
            msg["data"],
            json!({"level": "critical", "text": "Fire in building 3"})
        );
        assert!(
            msg.get("offset").is_none(),
            "plain PUBLISH carries no offset"
        );
    }

    // A non-JSON payload arrives as a JSON string.
    cluster.redis.cli(&["PUBLISH", "alerts", "plain words"]);
    for client in [&mut a, &mut b] {
        assert_eq!(client.expect_type("message").await["data"], "plain words");
    }

    // A client publish on node A reaches node B (and A itself).
    let ack = a
        .request(
            json!({"type": "publish", "channel": "chat:lobby", "data": {"text": "hi"}, "id": 11}),
        )
        .await;
    assert_eq!(
        ack,
        json!({"type": "published", "channel": "chat:lobby", "id": 11})
    );
    for client in [&mut a, &mut b] {
        let msg = client.until_message("chat:lobby").await;
        assert_eq!(msg["data"], json!({"text": "hi"}));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_subscribes_to_redis_only_while_a_local_session_wants_the_channel() {
    let cluster = Cluster::builder()
        .nodes(2)
        .env("GATEWAY__REDIS__UNSUBSCRIBE_DELAY_MS", "300")
        .start()
        .await;
    let redis = &cluster.redis;
    assert_eq!(redis.numsub("room:1"), 0);

    let (mut a1, _) = WsClient::connect_welcomed(&cluster.nodes[0].ws_url("channels=room:1")).await;
    // The welcome is sent once the node's subscription is in place.
    assert_eq!(redis.numsub("room:1"), 1);
    let (mut a2, _) = WsClient::connect_welcomed(&cluster.nodes[0].ws_url("channels=room:1")).await;
    assert_eq!(
        redis.numsub("room:1"),
        1,
        "one Redis subscription per node, however many sessions"
    );
    let (mut b1, _) = WsClient::connect_welcomed(&cluster.nodes[1].ws_url("channels=ticks")).await;
    b1.subscribe("room:1").await;
    assert_eq!(redis.numsub("room:1"), 2);
    assert!(redis
        .cli(&["PUBSUB", "CHANNELS", "room:*"])
        .contains("room:1"));

    // One of two local sessions leaving keeps the node subscribed.
    a1.ws.close(None).await.unwrap();
    assert!(matches!(a1.next().await, Received::Closed(_)));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(redis.numsub("room:1"), 2);

    // The last local session leaving unsubscribes the node after the delay.
    let reply = a2
        .request(json!({"type": "unsubscribe", "channel": "room:1", "id": "u"}))
        .await;
    assert_eq!(
        reply,
        json!({"type": "unsubscribed", "channel": "room:1", "id": "u"})
    );
    eventually("node 1 to unsubscribe room:1", async || {
        (redis.numsub("room:1") == 1).then_some(())
    })
    .await;

    // Node 2 still delivers; node 1's remaining session does not get room:1 any more.
    redis.cli(&["PUBLISH", "room:1", "still here"]);
    assert_eq!(b1.until_message("room:1").await["data"], "still here");
    a2.subscribe("marker").await;
    redis.cli(&["PUBLISH", "marker", "m"]);
    assert_eq!(a2.expect_type("message").await["channel"], "marker");

    // Node-level gauge follows.
    let m = cluster.nodes[1].metrics().await;
    assert!(m.get("gateway_channels") >= 2.0, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_channel_reaches_every_session_of_that_client_and_nobody_else() {
    let cluster = Cluster::start(2).await;
    let (mut u1a, w) =
        WsClient::connect_welcomed(&cluster.nodes[0].ws_url("client_id=u1&channels=x")).await;
    assert_eq!(w["client_id"], "u1");
    let (mut u1b, _) =
        WsClient::connect_welcomed(&cluster.nodes[1].ws_url("client_id=u1&channels=x")).await;
    let (mut u2, _) =
        WsClient::connect_welcomed(&cluster.nodes[0].ws_url("client_id=u2&channels=x")).await;

    cluster
        .redis
        .cli(&["PUBLISH", "user:u1", r#"{"note":"for u1"}"#]);
    for client in [&mut u1a, &mut u1b] {
        let msg = client.expect_type("message").await;
        assert_eq!(msg["channel"], "user:u1");
        assert_eq!(msg["data"]["note"], "for u1");
    }
    // u2 got nothing: its next frame is the marker published after.
    cluster.redis.cli(&["PUBLISH", "user:u2", "marker"]);
    let next = u2.expect_type("message").await;
    assert_eq!(next["channel"], "user:u2");

    // Nobody can subscribe to another client's personal channel, nor publish there.
    let refused = u2
        .request(json!({"type": "subscribe", "channel": "user:u1", "id": 9}))
        .await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["code"], "forbidden");
    assert_eq!(refused["id"], 9);
    let refused = u2
        .request(json!({"type": "publish", "channel": "user:u1", "data": "x", "id": 10}))
        .await;
    assert_eq!(refused["code"], "forbidden");
    // Subscribing to one's own is a no-op that succeeds.
    u2.subscribe("user:u2").await;
}
