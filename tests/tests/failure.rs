//! Correctness under failure: a slow consumer, Redis dying and coming back, and shutdown.

use std::time::Duration;
use tests::Frames;

use serde_json::json;
use tests::{eventually, redis, Cluster, GatewayNode, WsClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_with_4000_and_others_get_everything() {
    slow_consumer_on_write_path(&[]).await;
}

/// The same with `io_uring = false`: the fan-out's fallback write path (one vectored write per
/// socket, for kernels and sandboxes that refuse io_uring) keeps the same guarantees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_io_uring_a_client_that_stops_reading_is_closed_with_4000_and_others_get_everything(
) {
    slow_consumer_on_write_path(&[("GATEWAY__IO_URING", "false")]).await;
}

/// The same with `write_delay_ms`: frames held for the next flush are bounded too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_write_delay_a_client_that_stops_reading_is_closed_with_4000_and_others_get_everything(
) {
    slow_consumer_on_write_path(&[("GATEWAY__WRITE_DELAY_MS", "20")]).await;
}

async fn slow_consumer_on_write_path(env: &[(&str, &str)]) {
    let mut builder = Cluster::builder()
        .nodes(1)
        .env("GATEWAY__LIMITS__SEND_QUEUE_BYTES", "65536");
    for (key, value) in env {
        builder = builder.env(key, value);
    }
    let cluster = builder.start().await;
    let node = &cluster.nodes[0];
    let (mut healthy, _) = WsClient::connect_welcomed(&node.ws_url("channels=flood")).await;
    let (mut stalled, _) = WsClient::connect_welcomed(&node.ws_url("channels=flood")).await;

    // Publish in rounds of 40 KB (less than the 64 KiB queue, so a client that reads keeps
    // up); the healthy client reads each round completely before the next, the stalled one
    // reads nothing. Stop once the node has cut the stalled one off.
    let mut redis = cluster.redis.connection().await;
    let body = "x".repeat(2000);
    let mut seq = 0u64;
    let mut cut_off = false;
    for _round in 0..600 {
        let mut pipe = redis::pipe();
        for _ in 0..20 {
            seq += 1;
            pipe.cmd("PUBLISH")
                .arg("flood")
                .arg(json!({"seq": seq, "body": body}).to_string());
        }
        let _: Vec<i64> = pipe.query_async(&mut redis).await.unwrap();
        for expected in seq - 19..=seq {
            let msg = healthy.expect_type("message").await;
            assert_eq!(
                msg["data"]["seq"], expected,
                "healthy client lost or reordered a message"
            );
        }
        let m = node.metrics().await;
        if m.get(r#"gateway_disconnects_total{reason="slow_consumer"}"#) >= 1.0 {
            cut_off = true;
            break;
        }
    }
    assert!(
        cut_off,
        "the stalled client was never closed after {seq} messages"
    );
    let m = node.metrics().await;
    assert!(m.get(r#"gateway_messages_dropped_total{reason="slow_consumer"}"#) >= 1.0);

    // Once it reads again it finds what was already on the wire, then the 4000 close.
    assert_eq!(stalled.expect_close().await, Some(4000));

    // The healthy client keeps receiving.
    cluster
        .redis
        .cli(&["PUBLISH", "flood", r#"{"seq":"after"}"#]);
    assert_eq!(healthy.expect_type("message").await["data"]["seq"], "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_resumes_after_redis_restarts_without_clients_reconnecting() {
    let mut cluster = Cluster::builder()
        .nodes(2)
        .env("GATEWAY__REDIS__PING_INTERVAL_MS", "200")
        .env("GATEWAY__REDIS__TIMEOUT_MS", "500")
        .env("GATEWAY__REDIS__BACKOFF_MAX_MS", "300")
        .start()
        .await;
    let (mut a, _) = WsClient::connect_welcomed(&cluster.nodes[0].ws_url("channels=alerts")).await;
    let (mut b, _) =
        WsClient::connect_welcomed(&cluster.nodes[1].ws_url("channels=alerts,room:9")).await;
    for node in &cluster.nodes {
        assert_eq!(node.metrics().await.get("gateway_redis_connected"), 1.0);
    }

    cluster.redis.kill();
    for node in &cluster.nodes {
        eventually("gateway_redis_connected 0", async || {
            (node.metrics().await.get("gateway_redis_connected") == 0.0).then_some(())
        })
        .await;
        node.await_ready(503).await;
    }
    // Sessions stay open while Redis is away; a publish gets an error frame, not a close.
    let reply = a
        .request(json!({"type": "publish", "channel": "chat:x", "data": 1, "id": 1}))
        .await;
    assert_eq!(reply["code"], "publish_failed", "{reply}");

    cluster.redis.restart();
    for node in &cluster.nodes {
        eventually("gateway_redis_connected 1", async || {
            (node.metrics().await.get("gateway_redis_connected") == 1.0).then_some(())
        })
        .await;
        node.await_ready(200).await;
        assert!(node.metrics().await.get("gateway_redis_reconnects_total") >= 1.0);
    }
    // Every wanted channel was resubscribed.
    assert_eq!(cluster.redis.numsub("alerts"), 2);
    assert_eq!(cluster.redis.numsub("room:9"), 1);
    cluster.redis.cli(&["PUBLISH", "alerts", "back"]);
    for client in [&mut a, &mut b] {
        // The same connection: the next frame is the message, not a new welcome.
        assert_eq!(client.expect_type("message").await["data"], "back");
    }
    cluster.redis.cli(&["PUBLISH", "room:9", "room too"]);
    assert_eq!(b.expect_type("message").await["data"], "room too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_pubsub_connection_is_detected_and_replaced() {
    let cluster = Cluster::builder()
        .nodes(1)
        .env("GATEWAY__REDIS__PING_INTERVAL_MS", "200")
        .env("GATEWAY__REDIS__TIMEOUT_MS", "500")
        .start()
        .await;
    let (mut a, _) = WsClient::connect_welcomed(&cluster.nodes[0].ws_url("channels=alerts")).await;
    // Freeze Redis (it answers nothing, closes nothing) for longer than the ping timeout.
    cluster.redis.cli(&["CLIENT", "PAUSE", "1500", "ALL"]);
    eventually("the node to notice the silent connection", async || {
        (cluster.nodes[0]
            .metrics()
            .await
            .get("gateway_redis_reconnects_total")
            >= 1.0)
            .then_some(())
    })
    .await;
    cluster.nodes[0].await_ready(200).await;
    cluster.redis.cli(&["PUBLISH", "alerts", "alive"]);
    assert_eq!(a.expect_type("message").await["data"], "alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_sessions_with_1001_and_exits_0() {
    let mut cluster = Cluster::start(1).await;
    let (mut a, _) = WsClient::connect_welcomed(&cluster.nodes[0].ws_url("channels=alerts")).await;
    let (mut b, _) = WsClient::connect_welcomed(&cluster.nodes[0].ws_url("")).await;
    // A slow client still sending its request head must not hold the drain back.
    let mut stalled = tokio::net::TcpStream::connect(("127.0.0.1", cluster.nodes[0].port))
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stalled, b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let node = &mut cluster.nodes[0];
    let signalled = std::time::Instant::now();
    node.sigterm();
    assert_eq!(a.expect_close().await, Some(1001));
    assert_eq!(b.expect_close().await, Some(1001));
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "sessions were told at once, not after the handshake timeout ({:?})",
        signalled.elapsed()
    );
    let status = node.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "clean exit after the drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_no_redis_serves_ticks_and_the_seed_page_protocol() {
    // `cargo run -p gateway` with nothing else: memory bus, the node ticks itself.
    let node = GatewayNode::start(
        "solo",
        &[("GATEWAY__TICK_INTERVAL_MS".into(), "200".into())],
    )
    .await;
    node.await_ready(200).await;
    // The seed page: /websocket?Id=12345, no channels named → default_channels (ticks).
    let url = format!("ws://127.0.0.1:{}/websocket?Id=12345", node.port);
    let (mut seed, welcome) = WsClient::connect_welcomed(&url).await;
    assert_eq!(welcome["client_id"], "12345");
    assert_eq!(welcome["channels"], json!(["ticks"]));
    let first = seed.until_message("ticks").await;
    let second = seed.until_message("ticks").await;
    assert!(first["data"]["time"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    assert_eq!(
        second["data"]["seq"].as_u64().unwrap(),
        first["data"]["seq"].as_u64().unwrap() + 1
    );
    assert_eq!(
        second["data"]["unix_ms"].as_u64().unwrap() - first["data"]["unix_ms"].as_u64().unwrap(),
        200,
        "ticks are aligned to the interval"
    );
    // Its plain-text "message to send" earns an error frame, not a close.
    seed.send(tokio_tungstenite::tungstenite::Message::text(
        "message to send",
    ))
    .await;
    assert_eq!(seed.until_type("error").await["code"], "bad_json");

    // Chat works on one node through the memory bus.
    let (mut other, _) = WsClient::connect_welcomed(&node.ws_url("channels=chat:lobby")).await;
    let reply = seed
        .request(json!({"type": "subscribe", "channel": "chat:lobby", "id": 1}))
        .await;
    assert_eq!(reply["type"], "subscribed");
    seed.send_json(json!({"type": "publish", "channel": "chat:lobby", "data": {"text": "hello"}}))
        .await;
    assert_eq!(
        other.until_message("chat:lobby").await["data"]["text"],
        "hello"
    );

    // The demo page and the client module are served.
    let (status, page) = tests::http_get(node.port, "/").await.unwrap();
    assert_eq!(status, 200);
    assert!(page.contains("<html"));
    let (status, _) = tests::http_get(node.port, "/client.js").await.unwrap();
    assert_eq!(status, 200);
    // Metrics are on the admin port only.
    assert_eq!(tests::http_get(node.port, "/metrics").await.unwrap().0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_while_redis_is_down_gets_publish_failed_in_the_products_words() {
    let mut cluster = Cluster::builder()
        .nodes(1)
        .env("GATEWAY__REDIS__TIMEOUT_MS", "500")
        .env("GATEWAY__REDIS__BACKOFF_MAX_MS", "300")
        .start()
        .await;
    let node = &cluster.nodes[0];
    let (mut c, _) = WsClient::connect_welcomed(&node.ws_url("channels=chat:x")).await;
    cluster.redis.kill();

    let reply = c
        .request(json!({"type": "publish", "channel": "chat:x", "data": {"t": 1}, "id": 1}))
        .await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "publish_failed", "{reply}");
    assert_eq!(reply["id"], 1);
    assert_eq!(reply["channel"], "chat:x");
    let message = reply["message"].as_str().unwrap();
    assert!(
        message.starts_with("not published: the message bus (Redis) is unavailable")
            || message.starts_with("the message bus (Redis) did not answer in time"),
        "a message of the product's own: {message:?}"
    );
    // The session stays.
    assert_eq!(
        c.request(json!({"type": "ping", "id": 2})).await["type"],
        "pong"
    );

    // Once Redis is back, publishing works again.
    cluster.redis.restart();
    node.await_ready(200).await;
    let reply = c
        .request(json!({"type": "publish", "channel": "chat:x", "data": {"t": 2}, "id": 3}))
        .await;
    assert_eq!(reply["type"], "published", "{reply}");
}
