//! Bad and abusive client input against a real node: every case gets its error frame or its
//! close code, and the node keeps serving everyone else.

use std::time::Duration;
use tests::Frames;

use serde_json::json;
use tests::{Cluster, Received, WsClient};
use tokio_tungstenite::tungstenite::protocol::frame::{coding::Data, coding::OpCode, Frame};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_forbidden_frames_get_error_frames_and_the_session_stays() {
    let cluster = Cluster::start(1).await;
    let node = &cluster.nodes[0];
    let (mut c, _) = WsClient::connect_welcomed(&node.ws_url("channels=alerts")).await;
    let (mut bystander, _) = WsClient::connect_welcomed(&node.ws_url("channels=alerts")).await;

    let long = "x".repeat(129);
    let cases: Vec<(String, &str)> = vec![
        ("message to send".into(), "bad_json"), // the seed page's plain text
        ("{\"type\":".into(), "bad_json"),
        ("[1,2,3]".into(), "bad_json"),
        (json!({"channel": "a"}).to_string(), "bad_frame"),
        (json!({"type": "shout"}).to_string(), "unknown_type"),
        (json!({"type": "subscribe"}).to_string(), "bad_frame"),
        (
            json!({"type": "subscribe", "channel": "bad name"}).to_string(),
            "bad_channel",
        ),
        (
            json!({"type": "subscribe", "channel": ""}).to_string(),
            "bad_channel",
        ),
        (
            json!({"type": "subscribe", "channel": long}).to_string(),
            "bad_channel",
        ),
        (
            json!({"type": "subscribe", "channel": "a/b"}).to_string(),
            "bad_channel",
        ),
        (
            json!({"type": "subscribe", "channel": "user:someone-else"}).to_string(),
            "forbidden",
        ),
        (
            json!({"type": "publish", "channel": "alerts", "data": 1}).to_string(),
            "forbidden",
        ),
        (
            json!({"type": "publish", "channel": "chat:x"}).to_string(),
            "bad_frame",
        ),
        (
            json!({"type": "ping", "id": {"nested": true}}).to_string(),
            "bad_frame",
        ),
    ];
    for (frame, code) in &cases {
        c.send(Message::text(frame.clone())).await;
        let reply = c.frame().await;
        assert_eq!(reply["type"], "error", "{frame} → {reply}");
        assert_eq!(reply["code"], *code, "{frame} → {reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }

    // Request ids are echoed, also on errors.
    let reply = c
        .request(json!({"type": "subscribe", "channel": "no spaces", "id": "r1"}))
        .await;
    assert_eq!(reply["id"], "r1");
    let pong = c.request(json!({"type": "ping", "id": 10})).await;
    assert_eq!(pong, json!({"type": "pong", "id": 10}));

    // The session still works, and so does everyone else's.
    cluster.redis.cli(&["PUBLISH", "alerts", "ok"]);
    assert_eq!(c.expect_type("message").await["data"], "ok");
    assert_eq!(bystander.expect_type("message").await["data"], "ok");

    let m = node.metrics().await;
    assert!(m.get(r#"gateway_client_frames_total{type="invalid"}"#) >= 6.0);
    assert!(m.get(r#"gateway_client_frames_total{type="ping"}"#) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_connect_parameters_are_closed_4400_after_the_upgrade() {
    let cluster = Cluster::start(1).await;
    let node = &cluster.nodes[0];
    let long = "x".repeat(124);
    let cases = [
        ("client_id=bad%20id&channels=alerts", "bad client_id: "),
        ("Id=a/b&channels=alerts", "bad client_id: "),
        (
            &*format!("client_id={long}&channels=alerts"),
            "bad client_id: ",
        ),
        (
            "client_id=a&client_id=b&channels=alerts",
            "bad query string: ",
        ),
    ];
    for (query, reason) in cases {
        // The upgrade succeeds, so that a browser can read the close code and its reason.
        let mut c = WsClient::connect(&node.ws_url(query)).await;
        let (code, why) = c.expect_close_frame().await;
        assert_eq!(code, 4400, "{query}");
        assert!(why.starts_with(reason), "{query}: {why:?}");
        assert!(!why.contains("Failed to deserialize"), "{query}: {why:?}");
    }
    let m = node.metrics().await;
    assert_eq!(
        m.get(r#"gateway_disconnects_total{reason="bad_request"}"#),
        cases.len() as f64
    );
    // Refused before any subscription.
    assert_eq!(m.get("gateway_subscriptions"), 0.0);
    assert_eq!(cluster.redis.numsub("alerts"), 0);
    // A good client id on the same node is welcomed.
    let (_c, welcome) = WsClient::connect_welcomed(&node.ws_url("client_id=a.b-c_d:e@f")).await;
    assert_eq!(welcome["client_id"], "a.b-c_d:e@f");
}

/// Send one frame on a fresh connection and return the close code it earns.
async fn close_code_for(url: &str, msg: Message) -> Option<u16> {
    let (mut c, _) = WsClient::connect_welcomed(url).await;
    c.send(msg).await;
    c.expect_close().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_get_their_close_codes() {
    let cluster = Cluster::builder()
        .nodes(1)
        .env("GATEWAY__LIMITS__MAX_MESSAGE_BYTES", "1024")
        .start()
        .await;
    let url = cluster.nodes[0].ws_url("channels=alerts");
    let (mut bystander, _) = WsClient::connect_welcomed(&url).await;

    assert_eq!(
        close_code_for(&url, Message::binary(vec![1, 2, 3])).await,
        Some(1003)
    );
    let big = json!({"type": "publish", "channel": "chat:a", "data": "x".repeat(2000)}).to_string();
    assert_eq!(close_code_for(&url, Message::text(big)).await, Some(1009));
    let not_utf8 = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    assert_eq!(
        close_code_for(&url, Message::Frame(not_utf8)).await,
        Some(1007)
    );
    // A message larger than the limit in total, split into small fragments.
    let (mut c, _) = WsClient::connect_welcomed(&url).await;
    c.send(Message::Frame(Frame::message(
        vec![b'a'; 600],
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    c.send(Message::Frame(Frame::message(
        vec![b'a'; 600],
        OpCode::Data(Data::Continue),
        true,
    )))
    .await;
    assert_eq!(c.expect_close().await, Some(1009));

    // The node keeps serving.
    cluster.redis.cli(&["PUBLISH", "alerts", "still up"]);
    assert_eq!(bystander.expect_type("message").await["data"], "still up");
    let m = cluster.nodes[0].metrics().await;
    assert_eq!(
        m.get(r#"gateway_disconnects_total{reason="binary_frame"}"#),
        1.0
    );
    assert_eq!(
        m.get(r#"gateway_disconnects_total{reason="message_too_big"}"#),
        2.0
    );
    assert_eq!(
        m.get(r#"gateway_disconnects_total{reason="invalid_utf8"}"#),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_subscriptions_connections_and_publish_rate() {
    let cluster = Cluster::builder()
        .nodes(1)
        .env("GATEWAY__LIMITS__MAX_SUBSCRIPTIONS", "3")
        .env("GATEWAY__LIMITS__MAX_CONNECTIONS", "3")
        .env("GATEWAY__LIMITS__PUBLISH_RATE", "5")
        .env("GATEWAY__LIMITS__PUBLISH_BURST", "10")
        .start()
        .await;
    let node = &cluster.nodes[0];

    // max_subscriptions: the personal channel does not count.
    let (mut c, _) = WsClient::connect_welcomed(&node.ws_url("channels=a,b")).await;
    c.subscribe("c").await;
    let refused = c
        .request(json!({"type": "subscribe", "channel": "d", "id": 4}))
        .await;
    assert_eq!(refused["code"], "too_many_subscriptions", "{refused}");
    c.subscribe("b").await; // already subscribed: still fine

    // max_connections: the fourth connection is closed with 1013.
    let (_c2, _) = WsClient::connect_welcomed(&node.ws_url("")).await;
    let (mut rate, _) = WsClient::connect_welcomed(&node.ws_url("channels=chat:r")).await;
    let mut over = WsClient::connect(&node.ws_url("")).await;
    assert_eq!(over.expect_close().await, Some(1013));

    // Publish rate: the burst passes, then rate_limited errors, then 4029 for a client
    // that keeps going.
    let mut limited = 0;
    let mut published = 0;
    let code = loop {
        rate.send_json(json!({"type": "publish", "channel": "chat:r", "data": "spam", "id": 1}))
            .await;
        match rate.next().await {
            Received::Frame(f) if f["type"] == "published" => published += 1,
            Received::Frame(f) if f["type"] == "message" => {}
            Received::Frame(f) if f["code"] == "rate_limited" => limited += 1,
            Received::Frame(f) => panic!("unexpected {f}"),
            Received::Closed(code) => break code,
        }
        assert!(published + limited < 200, "never closed");
    };
    assert_eq!(code, Some(4029));
    assert!(published >= 10, "the burst passes: {published}");
    assert!(limited >= 10, "errors before the close: {limited}");

    // A closed session frees its slot (once its close handshake is over).
    let url = node.ws_url("");
    tests::eventually("a free connection slot", async || {
        let mut again = WsClient::connect(&url).await;
        match again.next().await {
            Received::Frame(f) if f["type"] == "welcome" => Some(again),
            _ => None,
        }
    })
    .await;
    let m = node.metrics().await;
    assert!(m.get(r#"gateway_disconnects_total{reason="max_connections"}"#) >= 1.0);
    assert_eq!(
        m.get(r#"gateway_disconnects_total{reason="rate_limited"}"#),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_with_4001() {
    let cluster = Cluster::builder()
        .nodes(1)
        .env("GATEWAY__HEARTBEAT__PING_INTERVAL_MS", "200")
        .env("GATEWAY__HEARTBEAT__PING_TIMEOUT_MS", "600")
        .start()
        .await;
    let url = cluster.nodes[0].ws_url("");
    // A live client answers the server's pings (tungstenite does it while reading) and stays.
    let (mut live, _) = WsClient::connect_welcomed(&url).await;
    let (mut silent, _) = WsClient::connect_welcomed(&url).await;
    assert!(
        live.next_within(Duration::from_millis(1500))
            .await
            .is_none(),
        "live client stays open"
    );
    // The silent one never read, so it never answered a ping.
    assert_eq!(silent.expect_close().await, Some(4001));
    let pong = live.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "pong");
}
