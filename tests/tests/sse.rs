//! Server-Sent Events (docs/REFERENCE.md §9): the same sessions over `GET /sse`, client frames
//! by `POST /sse/{session}` (forwarded through Redis to the session's node), resume with
//! `Last-Event-ID`, and the limits, drain, auth and CORS of WebSocket sessions. Raw HTTP
//! clients against real nodes and a real Redis.

use std::time::Duration;
use tests::Frames;

use serde_json::{json, Value};
use tests::{
    eventually, http_exchange, publish, publish_in_background, redis, sse_post, stream_id, Cluster,
    PublisherNode, SseClient, SseItem, TIMEOUT,
};

const SECRET: &str = "sse-test-secret-0123456789abcdef0123";

fn token(sub: &str) -> String {
    tests::hs256_token(SECRET, sub, json!({}))
}

/// A publisher without ticks.
async fn publisher(cluster: &Cluster) -> PublisherNode {
    PublisherNode::start(&cluster.redis, &[("PUBLISHER__TICK__ENABLED", "false")]).await
}

/// Connect and read the welcome; returns the client (its `session` set).
async fn welcomed(port: u16, query: &str, headers: &[(&str, &str)]) -> SseClient {
    let mut client = SseClient::connect(port, &format!("/sse?{query}"), headers).await;
    assert_eq!(client.head.status, 200, "{:?}", client.head);
    let welcome = client.expect_type("welcome").await;
    assert!(welcome["session"].is_string(), "{welcome}");
    client
}

/// Read `channel`'s messages `first..=last`, in order, nothing lost or repeated.
async fn expect_sequence(client: &mut SseClient, channel: &str, first: u64, last: u64) -> String {
    let mut offset = String::new();
    for expected in first..=last {
        let frame = client.until_message(channel).await;
        assert_eq!(
            frame["data"]["n"], expected,
            "lost, duplicated or reordered: {frame}"
        );
        let now = frame["offset"].as_str().expect("offset").to_owned();
        if !offset.is_empty() {
            assert!(stream_id(&now) > stream_id(&offset));
        }
        offset = now;
    }
    offset
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_client_gets_its_welcome_ticks_pings_and_a_redis_cli_alert() {
    let cluster = Cluster::builder()
        .nodes(1)
        .env("GATEWAY__HEARTBEAT__PING_INTERVAL_MS", "300")
        .start()
        .await;
    let _publisher = PublisherNode::start(&cluster.redis, &[]).await;
    let node = &cluster.nodes[0];
    let mut client = SseClient::connect(node.port, "/sse?channels=ticks,alerts", &[]).await;
    assert_eq!(client.head.status, 200);
    assert_eq!(
        client.head.header("content-type"),
        Some("text/event-stream")
    );
    assert_eq!(client.head.header("x-accel-buffering"), Some("no"));
    // The welcome is the first event.
    let welcome = client.expect_type("welcome").await;
    assert_eq!(welcome["channels"], json!(["ticks", "alerts"]));

    let tick = client.until_message("ticks").await;
    assert!(tick["data"]["unix_ms"].is_u64(), "{tick}");
    cluster.redis.cli(&[
        "PUBLISH",
        "alerts",
        r#"{"level":"critical","text":"Fire in building 3"}"#,
    ]);
    let alert = client.until_message("alerts").await;
    assert_eq!(alert["data"]["text"], "Fire in building 3");

    // The heartbeat is a comment line.
    let mut pinged = false;
    for _ in 0..50 {
        if client.next().await == SseItem::Comment("ping".into()) {
            pinged = true;
            break;
        }
    }
    assert!(pinged, "no `: ping` comment");

    let m = node.metrics().await;
    assert_eq!(m.get(r#"gateway_connections{transport="sse"}"#), 1.0);
    assert_eq!(m.get(r#"gateway_connections{transport="ws"}"#), 0.0);
    assert_eq!(m.get(r#"gateway_connections_total{transport="sse"}"#), 1.0);
    drop(client);
    eventually("the SSE session to end", async || {
        let m = node.metrics().await;
        (m.get(r#"gateway_connections{transport="sse"}"#) == 0.0
            && m.get(r#"gateway_disconnects_total{reason="client_close",transport="sse"}"#) == 1.0)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_resumes_exactly_what_was_missed_on_another_node() {
    let cluster = Cluster::start(2).await;
    let publisher = publisher(&cluster).await;
    let mut client = welcomed(cluster.nodes[0].port, "channels=h:s", &[]).await;
    for n in 1..=3 {
        publish(publisher.port, "h:s", n).await;
    }
    let last = expect_sequence(&mut client, "h:s", 1, 3).await;
    // Every event after an offset carries the resume token: the latest offset per channel.
    let id = client.last_id.clone().expect("events carry an id");
    assert_eq!(id, format!("h:s@{last}"));
    // A forced disconnect.
    drop(client);

    for n in 4..=8 {
        publish(publisher.port, "h:s", n).await;
    }
    let burst = publish_in_background(publisher.port, "h:s", 9..=30);
    // As a browser reconnects: the same URL, plus Last-Event-ID; to the other node.
    let mut client = welcomed(
        cluster.nodes[1].port,
        "channels=h:s",
        &[("Last-Event-ID", &id)],
    )
    .await;
    // The resumed stream starts from the position it was given: its welcome carries it.
    assert_eq!(client.last_id.as_deref(), Some(&*id));
    let last = expect_sequence(&mut client, "h:s", 4, 30).await;
    burst.await.unwrap();
    // Nothing more: no duplicate of the replay.
    assert!(
        client
            .next_within(Duration::from_millis(500))
            .await
            .is_none(),
        "more after the last message"
    );
    assert_eq!(client.last_id.as_deref(), Some(&*format!("h:s@{last}")));

    // A Last-Event-ID that cannot be used: an error frame, and the stream stays open.
    let mut bad = welcomed(
        cluster.nodes[0].port,
        "channels=h:s",
        &[("Last-Event-ID", "h:s@not-an-offset")],
    )
    .await;
    let error = bad.expect_type("error").await;
    assert_eq!(error["code"], "bad_since", "{error}");
    let mut gone = welcomed(
        cluster.nodes[1].port,
        "channels=h:s",
        &[("Last-Event-ID", "h:s@zzzz:1-0")],
    )
    .await;
    let error = gone.expect_type("error").await;
    assert_eq!(error["code"], "history_gone", "{error}");
    // A position that cannot be resumed from is not handed back: the error's event clears it.
    assert_eq!(gone.last_id.as_deref(), Some(""));
    publish(publisher.port, "h:s", 31).await;
    assert_eq!(bad.until_message("h:s").await["data"]["n"], 31);
    assert_eq!(gone.until_message("h:s").await["data"]["n"], 31);
    assert_eq!(client.until_message("h:s").await["data"]["n"], 31);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posted_frames_are_answered_over_the_stream_and_forwarded_from_another_node() {
    let cluster = Cluster::start(2).await;
    let (a, b) = (cluster.nodes[0].port, cluster.nodes[1].port);
    let mut client = welcomed(a, "channels=ticks&client_id=sse-1", &[]).await;
    let session = client.session.clone().unwrap();

    // On the session's node.
    let reply = sse_post(
        a,
        &session,
        &json!({"type":"subscribe","channel":"chat:sse","id":1}),
        &[],
    )
    .await;
    assert_eq!(reply.status, 202, "{reply:?}");
    let subscribed = client.until_type("subscribed").await;
    assert_eq!(
        subscribed,
        json!({"type":"subscribed","channel":"chat:sse","id":1})
    );

    // On the other node: forwarded through Redis.
    let reply = sse_post(
        b,
        &session,
        &json!({"type":"publish","channel":"chat:sse","data":{"text":"hi"},"id":2}),
        &[],
    )
    .await;
    assert_eq!(reply.status, 202, "{reply:?}");
    assert!(reply.body.contains(r#""forwarded":true"#), "{reply:?}");
    let published = client.until_type("published").await;
    assert_eq!(published["id"], 2);
    let message = client.until_message("chat:sse").await;
    assert_eq!(message["data"], json!({"text": "hi"}));
    // It went as a `forward` control message, acted on by the session's node only.
    let forwarded = r#"gateway_control_messages_total{kind="forward"}"#;
    assert_eq!(cluster.nodes[0].metrics().await.get(forwarded), 1.0);
    assert_eq!(cluster.nodes[1].metrics().await.get(forwarded), 0.0);
    let reply = sse_post(b, &session, &json!({"type":"ping","id":3}), &[]).await;
    assert_eq!(reply.status, 202);
    assert_eq!(client.until_type("pong").await["id"], 3);
    // Bad input is an error frame on the stream, as over a WebSocket.
    let reply = http_exchange(a, "POST", &format!("/sse/{session}"), &[], "not json")
        .await
        .unwrap();
    assert_eq!(reply.status, 202);
    assert_eq!(client.until_type("error").await["code"], "bad_json");

    // Unknown sessions, on either node.
    for port in [a, b] {
        let unknown = uuid_like();
        let reply = sse_post(port, &unknown, &json!({"type":"ping"}), &[]).await;
        assert_eq!(reply.status, 404, "{reply:?}");
        let reply = sse_post(port, "nonsense", &json!({"type":"ping"}), &[]).await;
        assert_eq!(reply.status, 404, "{reply:?}");
    }

    // Once the session ended, its id is unknown everywhere.
    drop(client);
    for port in [a, b] {
        eventually("the ended session to be unknown", async || {
            let reply = sse_post(port, &session, &json!({"type":"ping"}), &[]).await;
            (reply.status == 404).then_some(())
        })
        .await;
    }
}

fn uuid_like() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_a_post_needs_the_sessions_own_token() {
    let cluster = Cluster::builder()
        .nodes(2)
        .env("GATEWAY__AUTH__SECRET", SECRET)
        .start()
        .await;
    let (a, b) = (cluster.nodes[0].port, cluster.nodes[1].port);
    // No token: the stream says 4401 and ends.
    let mut refused = SseClient::connect(a, "/sse", &[]).await;
    assert_eq!(refused.head.status, 200);
    assert_eq!(refused.expect_close().await["code"], 4401);

    let alice = token("alice");
    let bearer = format!("Bearer {alice}");
    let mut client = welcomed(a, "channels=ticks", &[("Authorization", &bearer)]).await;
    let session = client.session.clone().unwrap();
    for port in [a, b] {
        let ping = json!({"type":"ping","id":port});
        let reply = sse_post(port, &session, &ping, &[]).await;
        assert_eq!(reply.status, 401, "{reply:?}");
        let reply = sse_post(port, &session, &ping, &[("Authorization", "Bearer junk")]).await;
        assert_eq!(reply.status, 401, "{reply:?}");
        let bob = format!("Bearer {}", token("bob"));
        let reply = sse_post(port, &session, &ping, &[("Authorization", &bob)]).await;
        assert_eq!(reply.status, 403, "{reply:?}");
        let reply = sse_post(port, &session, &ping, &[("Authorization", &bearer)]).await;
        assert_eq!(reply.status, 202, "{reply:?}");
        assert_eq!(client.until_type("pong").await["id"], port);
    }
    // `?token=` works for a POST too.
    let reply = http_exchange(
        b,
        "POST",
        &format!("/sse/{session}?token={alice}"),
        &[],
        r#"{"type":"ping","id":"q"}"#,
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 202, "{reply:?}");
    assert_eq!(client.until_type("pong").await["id"], "q");
}

/// Publish 32 KiB messages on `flood`, 50 at a time, until `done`; panics when that takes
/// longer than three [`TIMEOUT`]s.
async fn flood_until(cluster: &Cluster, what: &str, done: impl AsyncFn() -> bool) {
    let mut conn = cluster.redis.connection().await;
    let payload = format!("\"{}\"", "x".repeat(32 * 1024));
    let deadline = tokio::time::Instant::now() + TIMEOUT * 3;
    loop {
        for _ in 0..50 {
            let _: i64 = redis::cmd("PUBLISH")
                .arg("flood")
                .arg(&payload)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        if done().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sse_consumer_is_closed_with_4000_and_drain_closes_with_1001() {
    let mut cluster = Cluster::builder()
        .nodes(1)
        .env("GATEWAY__LIMITS__SEND_QUEUE_BYTES", "65536")
        .start()
        .await;
    let port = cluster.nodes[0].port;
    let mut slow = welcomed(port, "channels=flood", &[]).await;
    let mut steady = welcomed(port, "channels=ticks", &[]).await;
    // `slow` reads nothing while the flood fills its socket, then its queue.
    let node = &cluster.nodes[0];
    flood_until(&cluster, "the slow SSE consumer cut off", async || {
        let m = node.metrics().await;
        m.get(r#"gateway_disconnects_total{reason="slow_consumer",transport="sse"}"#) >= 1.0
    })
    .await;
    // Reading again, it finds what was written, then the close event with 4000.
    assert_eq!(slow.expect_close().await["code"], 4000);

    // Drain: the other session ends with 1001.
    cluster.nodes[0].sigterm();
    assert_eq!(steady.expect_close().await["code"], 1001);
    let status = cluster.nodes[0].wait_exit(TIMEOUT).await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_echoes_allowed_origins_and_refuses_others() {
    let cluster = Cluster::builder()
        .nodes(1)
        .env("GATEWAY__ORIGINS", "https://app.example.com")
        .env("GATEWAY__LIMITS__MAX_CONNECTIONS", "2")
        .start()
        .await;
    let port = cluster.nodes[0].port;
    let allowed = [("Origin", "https://app.example.com")];
    let mut client = welcomed(port, "channels=ticks", &allowed).await;
    assert_eq!(
        client.head.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    let session = client.session.clone().unwrap();

    let other = SseClient::connect(port, "/sse", &[("Origin", "https://evil.example")]).await;
    assert_eq!(other.head.status, 403, "{:?}", other.head);
    assert_eq!(other.head.header("access-control-allow-origin"), None);

    // The preflight of a POST with a token.
    let preflight = http_exchange(
        port,
        "OPTIONS",
        &format!("/sse/{session}"),
        &[
            ("Origin", "https://app.example.com"),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization, content-type",
            ),
        ],
        "",
    )
    .await
    .unwrap();
    assert_eq!(preflight.status, 204, "{preflight:?}");
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert!(preflight
        .header("access-control-allow-methods")
        .is_some_and(|m| m.contains("POST")));
    assert!(preflight
        .header("access-control-allow-headers")
        .is_some_and(|h| h.contains("authorization")));
    let refused = http_exchange(
        port,
        "OPTIONS",
        &format!("/sse/{session}"),
        &[("Origin", "https://evil.example")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(refused.status, 403);

    let reply = sse_post(port, &session, &json!({"type":"ping","id":1}), &allowed).await;
    assert_eq!(reply.status, 202);
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(client.until_type("pong").await["id"], 1);
    let reply = sse_post(
        port,
        &session,
        &json!({"type":"ping"}),
        &[("Origin", "https://evil.example")],
    )
    .await;
    assert_eq!(reply.status, 403);

    // The connection limit is shared with WebSocket sessions: the third session gets 1013.
    let _second = welcomed(port, "channels=ticks", &[]).await;
    let mut third = SseClient::connect(port, "/sse", &[]).await;
    let close: Value = third.expect_close().await;
    assert_eq!(close["code"], 1013, "{close}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_api_reaches_sse_sessions_like_any_other() {
    let cluster = Cluster::start(2).await;
    let publisher = publisher(&cluster).await;
    let mut client = welcomed(
        cluster.nodes[1].port,
        "channels=chat:api&client_id=sse-api",
        &[],
    )
    .await;
    // Unsubscribe from the server: an `unsubscribed` frame without an id.
    let (status, body) = publisher
        .post(
            "/unsubscribe",
            r#"{"client_id":"sse-api","channel":"chat:api"}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let frame = client.until_type("unsubscribed").await;
    assert_eq!(frame, json!({"type":"unsubscribed","channel":"chat:api"}));
    // Disconnect: the stream ends with 4409.
    let (status, body) = publisher
        .post("/disconnect", r#"{"client_id":"sse-api"}"#)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(client.expect_close().await["code"], 4409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_written_to_a_client_that_stopped_reading_is_dropped_after_its_session() {
    let cluster = Cluster::builder()
        .nodes(1)
        .env("GATEWAY__LIMITS__SEND_QUEUE_BYTES", "65536")
        .env("GATEWAY__HEARTBEAT__PING_INTERVAL_MS", "300")
        .env("GATEWAY__HEARTBEAT__PING_TIMEOUT_MS", "1000")
        .env("GATEWAY__LIMITS__HANDSHAKE_TIMEOUT_MS", "2000")
        .start()
        .await;
    let node = &cluster.nodes[0];
    // One session first, so that what stays open afterwards (Redis connections) is counted.
    let probe = welcomed(node.port, "channels=ticks", &[]).await;
    drop(probe);
    let fds = async || node.metrics().await.get("process_open_fds");
    eventually("the probe session to end", async || {
        let m = node.metrics().await;
        (m.get("gateway_connections") == 0.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = fds().await;

    let _slow = welcomed(node.port, "channels=flood", &[]).await;
    flood_until(&cluster, "the SSE session cut off", async || {
        let m = node.metrics().await;
        m.get(r#"gateway_connections{transport="sse"}"#) == 0.0
    })
    .await;
    // The session ended (4000), but its close event cannot be written to a client that reads
    // nothing. The connection is not kept forever: once the session gave up on the close
    // event (5 s), the stream ends and hyper, waiting for the next request's head, drops the
    // connection after `limits.handshake_timeout_ms`.
    eventually("the stalled connection to be dropped", async || {
        (fds().await <= before).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_is_read_outlives_the_heartbeat_timeout() {
    // An SSE client cannot answer pings: the pings it reads keep its session alive.
    let cluster = Cluster::builder()
        .nodes(1)
        .env("GATEWAY__HEARTBEAT__PING_INTERVAL_MS", "200")
        .env("GATEWAY__HEARTBEAT__PING_TIMEOUT_MS", "600")
        .start()
        .await;
    let node = &cluster.nodes[0];
    let mut client = welcomed(node.port, "channels=ticks", &[]).await;
    let until = tokio::time::Instant::now() + Duration::from_millis(2500);
    let mut pings = 0;
    while tokio::time::Instant::now() < until {
        match client.next_within(Duration::from_millis(500)).await {
            Some(SseItem::Comment(c)) if c == "ping" => pings += 1,
            Some(SseItem::Event {
                event: Some(e),
                data,
                ..
            }) if e == "close" => {
                panic!("closed: {data}")
            }
            Some(_) => {}
            None => panic!("the stream stalled or ended"),
        }
    }
    assert!(pings >= 8, "{pings} pings in 2.5 s");
    let m = node.metrics().await;
    assert_eq!(m.get(r#"gateway_connections{transport="sse"}"#), 1.0);
    assert_eq!(
        m.get(r#"gateway_disconnects_total{reason="heartbeat_timeout",transport="sse"}"#),
        0.0
    );
}
