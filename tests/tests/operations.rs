//! What operators see: metrics, health, HTTP errors, configuration errors.

use serde_json::{json, Value};
use tests::Frames;
use tests::{
    free_port, http_exchange, http_get, http_request, run_gateway_to_exit, Cluster, WsClient,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_what_happened() {
    let cluster = Cluster::start(1).await;
    let node = &cluster.nodes[0];
    let before = node.metrics().await;
    for name in [
        "gateway_connections",
        "gateway_connections_total",
        "gateway_disconnects_total",
        "gateway_subscriptions",
        "gateway_channels",
        "gateway_messages_received_total",
        "gateway_messages_delivered_total",
        "gateway_messages_dropped_total",
        "gateway_delivery_latency_seconds",
        "gateway_redis_connected",
        "gateway_redis_reconnects_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(before.has(name), "missing metric {name}");
    }
    // Labelled counters show every known label value from the start, at zero.
    for series in [
        r#"gateway_client_frames_total{type="subscribe"}"#,
        r#"gateway_client_frames_total{type="publish"}"#,
        r#"gateway_client_frames_total{type="invalid"}"#,
        r#"gateway_disconnects_total{reason="rate_limited",transport="ws"}"#,
        r#"gateway_disconnects_total{reason="bad_request",transport="sse"}"#,
        r#"gateway_connections{transport="sse"}"#,
        r#"gateway_messages_dropped_total{reason="slow_consumer"}"#,
    ] {
        assert_eq!(before.series.get(series), Some(&0.0), "{series}");
    }

    let (mut a, _) = WsClient::connect_welcomed(&node.ws_url("channels=m1,m2")).await;
    let (mut b, _) = WsClient::connect_welcomed(&node.ws_url("channels=m1")).await;
    for i in 0..3 {
        let pong = a.request(json!({"type": "ping", "id": i})).await;
        assert_eq!(pong["type"], "pong");
    }
    for _ in 0..5 {
        cluster.redis.cli(&["PUBLISH", "m1", "x"]);
    }
    for _ in 0..5 {
        a.expect_type("message").await;
        b.expect_type("message").await;
    }

    let m = node.metrics().await;
    assert_eq!(m.get("gateway_connections"), 2.0);
    assert_eq!(
        m.get("gateway_connections_total") - before.get("gateway_connections_total"),
        2.0
    );
    // Personal channels count too: a has user:…, m1, m2; b has user:…, m1. The node's Redis
    // channels: those four and the control channel.
    assert_eq!(m.get("gateway_subscriptions"), 5.0);
    assert_eq!(m.get("gateway_channels"), 5.0);
    assert_eq!(m.get(r#"gateway_client_frames_total{type="ping"}"#), 3.0);
    assert_eq!(m.get("gateway_messages_received_total"), 5.0);
    assert_eq!(m.get("gateway_messages_delivered_total"), 10.0);
    assert_eq!(m.get("gateway_delivery_latency_seconds_count"), 10.0);
    assert_eq!(m.get("gateway_redis_connected"), 1.0);

    a.ws.close(None).await.unwrap();
    a.expect_close().await;
    tests::eventually("the session to be gone", async || {
        let m = node.metrics().await;
        (m.get("gateway_connections") == 1.0
            && m.get(r#"gateway_disconnects_total{reason="client_close"}"#) == 1.0
            && m.get("gateway_subscriptions") == 2.0)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_bad_http_requests_get_json_answers() {
    let cluster = Cluster::builder()
        .nodes(1)
        .env(
            "GATEWAY__ORIGINS",
            "https://app.example.com,https://*.example.org",
        )
        .start()
        .await;
    let node = &cluster.nodes[0];
    for port in [node.port, node.admin_port] {
        assert_eq!(http_get(port, "/healthz").await.unwrap().0, 200);
        let (status, body) = http_get(port, "/readyz").await.unwrap();
        assert_eq!(status, 200);
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["ready"], true);
    }
    // /metrics is on the admin port only.
    assert_eq!(http_get(node.port, "/metrics").await.unwrap().0, 404);

    let json_error = |(status, body): (u16, String)| -> (u16, String) {
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body:?}"));
        (status, v["error"].as_str().unwrap_or_default().to_owned())
    };
    // A plain GET on /ws is not a WebSocket handshake.
    let r = json_error(http_get(node.port, "/ws").await.unwrap());
    assert!(r.0 >= 400 && r.0 < 500 && r.1 == "not_websocket", "{r:?}");
    assert_eq!(
        json_error(http_get(node.port, "/nope").await.unwrap()),
        (404, "not_found".into())
    );
    for (port, path) in [
        (node.port, "/ws"),
        (node.port, "/healthz"),
        (node.admin_port, "/metrics"),
    ] {
        let r = http_request(port, "POST", path, &[], "x").await.unwrap();
        assert_eq!(
            json_error(r),
            (405, "method_not_allowed".into()),
            "POST {path}"
        );
    }

    let upgrade = |origin: &'static str| {
        vec![
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Origin", origin),
        ]
    };
    // A bad client_id is a 4400 close after the upgrade, not an HTTP 400, and a refused
    // Origin a 4403 close, not an HTTP 403: browsers cannot read a refused upgrade's status
    // (docs/REFERENCE.md §2, close codes).
    let (status, _) = http_request(
        node.port,
        "GET",
        "/ws?client_id=bad%20id",
        &upgrade("https://app.example.com"),
        "",
    )
    .await
    .unwrap();
    assert_eq!(status, 101, "a bad client_id is refused after the upgrade");
    let mut bad = WsClient::connect_with(
        &node.ws_url("client_id=bad%20id"),
        &[("Origin", "https://app.example.com")],
    )
    .await;
    let (code, reason) = bad.expect_close_frame().await;
    assert_eq!(code, 4400);
    assert!(reason.starts_with("bad client_id: "), "{reason:?}");
    let mut refused =
        WsClient::connect_with(&node.ws_url(""), &[("Origin", "https://evil.example.com")]).await;
    assert_eq!(refused.expect_close().await, Some(4403));
    for allowed in ["https://app.example.com", "https://x.example.org"] {
        let (status, _) = http_request(node.port, "GET", "/ws", &upgrade(allowed), "")
            .await
            .unwrap();
        assert_eq!(status, 101, "{allowed} is allowed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_js_is_served_with_cors_for_the_origins_and_revalidated_by_etag() {
    let cluster = Cluster::builder()
        .nodes(1)
        .env("GATEWAY__ORIGINS", "https://app.example.com")
        .start()
        .await;
    let port = cluster.nodes[0].port;
    let get = |headers: &'static [(&'static str, &'static str)]| async move {
        http_exchange(port, "GET", "/client.js", headers, "")
            .await
            .expect("client.js answers")
    };

    let allowed = get(&[("Origin", "https://app.example.com")]).await;
    assert_eq!(allowed.status, 200);
    assert!(allowed.body.contains("export class GatewayClient"));
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(
        allowed.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(allowed.header("cache-control"), Some("public, no-cache"));
    assert_eq!(allowed.header("vary"), Some("Origin"));
    let etag = allowed.header("etag").expect("an ETag").to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");

    // Another site gets the module but no CORS header, so its browser keeps it from the page.
    let other = get(&[("Origin", "https://evil.example.com")]).await;
    assert_eq!(other.status, 200);
    assert_eq!(other.header("access-control-allow-origin"), None);
    // So does a request without Origin (not a browser's cross-site fetch).
    assert_eq!(get(&[]).await.header("access-control-allow-origin"), None);

    // Revalidation: the same ETag is a 304 without a body, with the CORS header again.
    let cached = http_exchange(
        port,
        "GET",
        "/client.js",
        &[
            ("Origin", "https://app.example.com"),
            ("If-None-Match", &etag),
        ],
        "",
    )
    .await
    .unwrap();
    assert_eq!(cached.status, 304);
    assert_eq!(cached.body, "");
    assert_eq!(cached.header("etag"), Some(etag.as_str()));
    assert_eq!(
        cached.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    let stale = http_exchange(
        port,
        "GET",
        "/client.js",
        &[("If-None-Match", "\"0.0.0-0000000000000000\"")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(stale.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_pipe_are_plain_text_and_name_redis_without_its_password() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    // A Redis that is not there, with a password in its URL.
    let (port, admin, redis) = (free_port(), free_port(), free_port());
    let mut child = tokio::process::Command::new(tests::bin_path("gateway-node"))
        .env_clear()
        .env("RUST_LOG", "info")
        .env("GATEWAY__LISTEN", format!("127.0.0.1:{port}"))
        .env("GATEWAY__ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env(
            "GATEWAY__REDIS__URL",
            format!("redis://:hunter2@127.0.0.1:{redis}"),
        )
        .env("GATEWAY__REDIS__BACKOFF_MAX_MS", "200")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn gateway-node");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let read = async {
        // The start-up line, then the first failed connection to Redis.
        while let Some(line) = lines.next_line().await.expect("read stderr") {
            seen.push(line);
            if seen.iter().any(|l| l.contains("gateway serving"))
                && seen.iter().any(|l| l.contains("redis pub/sub connect"))
            {
                return;
            }
        }
    };
    tokio::time::timeout(tests::TIMEOUT, read)
        .await
        .unwrap_or_else(|_| panic!("no start-up and connect lines; stderr: {seen:#?}"));
    let log = seen.join("\n");
    assert!(
        !log.contains('\x1b'),
        "no ANSI colour codes in a pipe: {log:?}"
    );
    assert!(
        !log.contains("hunter2"),
        "the password is never logged: {log}"
    );
    let serving = seen.iter().find(|l| l.contains("gateway serving")).unwrap();
    assert!(
        serving.contains(&format!("redis=redis://***@127.0.0.1:{redis}")),
        "the start-up line names the Redis: {serving}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_http_layer_cannot_parse_get_a_bare_4xx_and_the_node_serves_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::start(1).await;
    let node = &cluster.nodes[0];
    let headers: String = (0..120).map(|i| format!("X-{i}: y\r\n")).collect();
    // (A head over ~400 KiB is answered 431 too; not sent here: the node closes before reading
    // all of it, and the reset that follows can discard the answer before the test reads it.)
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not HTTP", b"GARBAGE\r\n\r\n".to_vec(), "HTTP/1.1 400 "),
        (
            "a malformed header",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n".to_vec(),
            "HTTP/1.1 400 ",
        ),
        (
            "more than 100 headers",
            format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{headers}\r\n").into_bytes(),
            "HTTP/1.1 431 ",
        ),
        (
            "a URI over 64 KiB",
            format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000)).into_bytes(),
            "HTTP/1.1 414 ",
        ),
    ];
    for port in [node.port, node.admin_port] {
        for (what, request, status) in &cases {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            // The server may answer (and close) before it has read everything.
            let _ = stream.write_all(request).await;
            let mut response = Vec::new();
            tokio::time::timeout(tests::TIMEOUT, stream.read_to_end(&mut response))
                .await
                .unwrap_or_else(|_| panic!("{what}: no answer"))
                .ok();
            let text = String::from_utf8_lossy(&response).to_ascii_lowercase();
            assert!(
                text.starts_with(&status.to_ascii_lowercase()),
                "{what}: {text:?}"
            );
            // As README says: the HTTP layer answers these, with no body, and closes.
            assert!(text.contains("content-length: 0\r\n"), "{what}: {text:?}");
            assert!(text.contains("connection: close\r\n"), "{what}: {text:?}");
            assert!(text.ends_with("\r\n\r\n"), "{what}: {text:?}");
        }
        assert_eq!(http_get(port, "/healthz").await.unwrap().0, 200);
    }
}

#[test]
fn bad_configuration_exits_2_naming_the_key() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("GATEWAY__NO_SUCH_KEY", "1")], "no_such_key"),
        (
            &[("GATEWAY__LIMITS__MAX_CONNECTIONS", "many")],
            "max_connections",
        ),
        (
            &[("GATEWAY__LIMITS__SEND_QUEUE_BYTES", "10")],
            "limits.send_queue_bytes",
        ),
        (&[("GATEWAY__REDIS__URL", "http://x")], "redis.url"),
        (&[("GATEWAY__LISTEN", "nowhere")], "listen"),
        (
            &[("GATEWAY__DEFAULT_CHANNELS", "ok,not ok")],
            "default_channels",
        ),
        (&[("GATEWAY__AUTH__SECRET", "too short")], "auth.secret"),
        (
            &[("GATEWAY__AUTH__PUBLIC_KEY_FILE", "/nonexistent/key.pem")],
            "auth.public_key_file",
        ),
        (
            &[("GATEWAY__LIMITS__HANDSHAKE_TIMEOUT_MS", "0")],
            "limits.handshake_timeout_ms",
        ),
    ];
    for (env, key) in cases {
        let (status, stderr) = run_gateway_to_exit(env);
        assert_eq!(status.code(), Some(2), "{env:?}: {stderr}");
        assert!(
            stderr.contains(key),
            "{env:?}: message must name `{key}`: {stderr}"
        );
    }
}
