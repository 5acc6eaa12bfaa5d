//! Security against real nodes: tokens (4401) and what their claims allow, refresh and expiry,
//! the Origin allowlist (4403), the per-address cap (1013), malformed frames (1002, 1009),
//! half-open handshakes, and a token minted by the real publisher program.

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tests::Frames;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tests::{bin_path, Cluster, RawWs, Received, WsClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The node's secret: commas included, to prove `auth.secret` is not split like a list.
const SECRET: &str = "test-secret,with,commas,0123456789abcdef";
/// A second secret in `auth.secrets` (rotation).
const OLD_SECRET: &str = "previous-secret-0123456789abcdef0123";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(secret: &str, alg: Algorithm, claims: Value) -> String {
    encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// An HS256 token for `sub` valid for an hour, with `extra` claims merged in.
fn token(sub: &str, extra: Value) -> String {
    tests::hs256_token(SECRET, sub, extra)
}

fn fixture(name: &str) -> String {
    format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

async fn auth_cluster(extra: &[(&str, &str)]) -> Cluster {
    let mut builder = Cluster::builder()
        .nodes(1)
        .env("GATEWAY__AUTH__SECRET", SECRET)
        .env("GATEWAY__AUTH__SECRETS", OLD_SECRET);
    for (k, v) in extra {
        builder = builder.env(k, v);
    }
    builder.start().await
}

/// The first thing a connection to `url` receives: a close code, or the welcome frame.
async fn first(url: &str, headers: &[(&str, &str)]) -> Received {
    let mut c = WsClient::connect_with(url, headers).await;
    c.next().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_valid_token_are_closed_4401_before_anything() {
    let cluster = auth_cluster(&[]).await;
    let node = &cluster.nodes[0];
    let hour = now() + 3600;
    // alg "none": header {"alg":"none"}, claims, empty signature.
    let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiIxIiwiZXhwIjo0MTAyNDQ0ODAwfQ.";
    let refused: Vec<(&str, String)> = vec![
        ("no token", String::new()),
        ("garbage", "token=abc".into()),
        ("alg none", format!("token={none}")),
        (
            "bad signature",
            format!(
                "token={}",
                sign(
                    "some-other-secret-0123456789abcdef0123",
                    Algorithm::HS256,
                    json!({"sub": "1", "exp": hour})
                )
            ),
        ),
        (
            "expired",
            format!(
                "token={}",
                sign(
                    SECRET,
                    Algorithm::HS256,
                    json!({"sub": "1", "exp": now() - 5})
                )
            ),
        ),
        (
            "wrong alg (HS384, same secret)",
            format!(
                "token={}",
                sign(SECRET, Algorithm::HS384, json!({"sub": "1", "exp": hour}))
            ),
        ),
        (
            "sub missing",
            format!(
                "token={}",
                sign(SECRET, Algorithm::HS256, json!({"exp": hour}))
            ),
        ),
        (
            "exp missing",
            format!(
                "token={}",
                sign(SECRET, Algorithm::HS256, json!({"sub": "1"}))
            ),
        ),
        (
            "sub not a client id",
            format!("token={}", token("a/b", json!({}))),
        ),
        (
            "bad channels claim",
            format!("token={}", token("1", json!({"channels": ["no spaces"]}))),
        ),
        // A client id alone is no identity when auth is on.
        ("client_id without token", "client_id=12345".into()),
    ];
    for (what, query) in &refused {
        let url = node.ws_url(&format!("channels=alerts&{query}"));
        match first(&url, &[]).await {
            Received::Closed(code) => assert_eq!(code, Some(4401), "{what}"),
            Received::Frame(f) => panic!("{what}: got {f} before any close"),
        }
    }
    // `Authorization: Bearer` with a bad token too.
    let bearer = format!(
        "Bearer {}",
        sign(SECRET, Algorithm::HS384, json!({"sub": "1", "exp": hour}))
    );
    match first(&node.ws_url(""), &[("Authorization", &bearer)]).await {
        Received::Closed(code) => assert_eq!(code, Some(4401), "bearer"),
        Received::Frame(f) => panic!("bearer: got {f}"),
    }
    let m = node.metrics().await;
    assert_eq!(
        m.get(r#"gateway_disconnects_total{reason="unauthorized"}"#),
        refused.len() as f64 + 1.0
    );
    // Refused before any subscription: the node never subscribed to `alerts`.
    assert_eq!(m.get("gateway_subscriptions"), 0.0);
    assert_eq!(cluster.redis.numsub("alerts"), 0);

    // Accepted: the query token (the query's client_id is ignored), the header, the old secret.
    let (mut a, welcome) = WsClient::connect_welcomed(&node.ws_url(&format!(
        "client_id=impostor&token={}",
        token("12345", json!({}))
    )))
    .await;
    assert_eq!(welcome["client_id"], "12345");
    let bearer = format!("Bearer {}", token("67890", json!({})));
    let mut b = WsClient::connect_with(
        &node.ws_url("channels=alerts"),
        &[("Authorization", &bearer)],
    )
    .await;
    assert_eq!(b.expect_type("welcome").await["client_id"], "67890");
    let rotated = sign(
        OLD_SECRET,
        Algorithm::HS256,
        json!({"sub": "old", "exp": hour}),
    );
    let (_c, welcome) = WsClient::connect_welcomed(&node.ws_url(&format!("token={rotated}"))).await;
    assert_eq!(welcome["client_id"], "old");
    // The personal channel is the token's sub.
    cluster.redis.cli(&["PUBLISH", "user:12345", "for you"]);
    assert_eq!(a.until_message("user:12345").await["data"], "for you");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_works_for_secrets_with_commas_given_as_a_json_array() {
    // SECRET has commas and is the current `auth.secret`; after a rotation it is an old one,
    // kept in `auth.secrets` next to another, which a comma-separated list could not hold.
    let newest = "the-newest-secret-0123456789abcdef0123";
    let secrets = serde_json::to_string(&[SECRET, OLD_SECRET]).unwrap();
    let cluster = Cluster::builder()
        .nodes(1)
        .env("GATEWAY__AUTH__SECRET", newest)
        .env("GATEWAY__AUTH__SECRETS", &secrets)
        .start()
        .await;
    let node = &cluster.nodes[0];
    let hour = now() + 3600;
    for (secret, sub) in [(newest, "new"), (SECRET, "commas"), (OLD_SECRET, "old")] {
        let token = sign(secret, Algorithm::HS256, json!({"sub": sub, "exp": hour}));
        let (_c, welcome) =
            WsClient::connect_welcomed(&node.ws_url(&format!("token={token}"))).await;
        assert_eq!(welcome["client_id"], sub);
    }
    // A piece of the comma secret is not a secret of its own.
    let piece = sign(
        "test-secret",
        Algorithm::HS256,
        json!({"sub": "x", "exp": hour}),
    );
    match first(&node.ws_url(&format!("token={piece}")), &[]).await {
        Received::Closed(code) => assert_eq!(code, Some(4401)),
        Received::Frame(f) => panic!("a piece of a secret verified: {f}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_reasons_say_what_happened_in_the_same_words_wherever_it_happened() {
    let cluster = auth_cluster(&[
        ("GATEWAY__HEARTBEAT__PING_INTERVAL_MS", "200"),
        ("GATEWAY__HEARTBEAT__PING_TIMEOUT_MS", "20000"),
    ])
    .await;
    let node = &cluster.nodes[0];
    let reason_for = |query: String| async move {
        let mut c = WsClient::connect(&node.ws_url(&query)).await;
        c.expect_close_frame().await
    };
    let expired = sign(
        SECRET,
        Algorithm::HS256,
        json!({"sub": "1", "exp": now() - 5}),
    );
    assert_eq!(
        reason_for(format!("token={expired}")).await,
        (4401, "token expired".to_owned())
    );
    assert_eq!(
        reason_for("token=abc".into()).await,
        (
            4401,
            "bad token: not a JWT (header.claims.signature, base64url)".to_owned()
        )
    );
    let (code, why) = reason_for(String::new()).await;
    assert_eq!(code, 4401);
    assert!(why.starts_with("a token is required"), "{why:?}");

    // A session whose token expires is closed in the same words as a refused expired token.
    let soon = sign(
        SECRET,
        Algorithm::HS256,
        json!({"sub": "2", "exp": now() + 1}),
    );
    let (mut lapsing, _) = WsClient::connect_welcomed(&node.ws_url(&format!("token={soon}"))).await;
    assert_eq!(
        lapsing.expect_close_frame().await,
        (4401, "token expired".to_owned())
    );

    // Session ends other than auth: words too, not metric labels.
    let (mut binary, _) =
        WsClient::connect_welcomed(&node.ws_url(&format!("token={}", token("3", json!({}))))).await;
    binary
        .send(tokio_tungstenite::tungstenite::Message::binary(vec![
            1, 2, 3,
        ]))
        .await;
    assert_eq!(
        binary.expect_close_frame().await,
        (
            1003,
            "binary frames are not part of this protocol".to_owned()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_claims_limit_subscriptions_and_publishes() {
    let cluster = auth_cluster(&[]).await;
    let node = &cluster.nodes[0];

    // `channels: ["chat:*"]`: chat:x yes, alerts no (at connect and later), personal yes.
    let t = token("42", json!({"channels": ["chat:*"]}));
    let mut c = WsClient::connect(&node.ws_url(&format!("channels=chat:x,alerts&token={t}"))).await;
    let welcome = c.expect_type("welcome").await;
    assert_eq!(welcome["channels"], json!(["chat:x"]));
    let refused = c.expect_type("error").await;
    assert_eq!(
        (refused["code"].as_str(), refused["channel"].as_str()),
        (Some("forbidden"), Some("alerts"))
    );
    let r = c
        .request(json!({"type": "subscribe", "channel": "alerts", "id": 1}))
        .await;
    assert_eq!(
        (r["type"].as_str(), r["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{r}"
    );
    c.subscribe("chat:y").await;
    let r = c
        .request(json!({"type": "subscribe", "channel": "user:43"}))
        .await;
    assert_eq!(r["code"], "forbidden");
    cluster.redis.cli(&["PUBLISH", "user:42", "mine"]);
    assert_eq!(c.until_message("user:42").await["data"], "mine");
    // No publish claim: client_publish (chat:*) applies.
    let r = c
        .request(json!({"type": "publish", "channel": "chat:x", "data": 1, "id": 2}))
        .await;
    assert_eq!(r["type"], "published", "{r}");

    // A session naming no channels gets the defaults its token allows (ticks is not).
    let (_d, welcome) = WsClient::connect_welcomed(&node.ws_url(&format!("token={t}"))).await;
    assert_eq!(welcome["channels"], json!([]));

    // `publish: ["news:*"]` replaces client_publish for that session.
    let t = token("7", json!({"publish": ["news:*"]}));
    let (mut p, _) =
        WsClient::connect_welcomed(&node.ws_url(&format!("channels=news:a&token={t}"))).await;
    let r = p
        .request(json!({"type": "publish", "channel": "news:a", "data": "hi", "id": 3}))
        .await;
    assert_eq!(r["type"], "published", "{r}");
    let r = p
        .request(json!({"type": "publish", "channel": "chat:x", "data": 1, "id": 4}))
        .await;
    assert_eq!(
        (r["type"].as_str(), r["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{r}"
    );
    // `publish: []` forbids publishing at all.
    let t = token("8", json!({"publish": []}));
    let (mut q, _) = WsClient::connect_welcomed(&node.ws_url(&format!("token={t}"))).await;
    let r = q
        .request(json!({"type": "publish", "channel": "chat:x", "data": 1}))
        .await;
    assert_eq!(r["code"], "forbidden", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_extends_a_session_and_expiry_closes_4401() {
    let cluster = auth_cluster(&[
        ("GATEWAY__HEARTBEAT__PING_INTERVAL_MS", "200"),
        ("GATEWAY__HEARTBEAT__PING_TIMEOUT_MS", "20000"),
    ])
    .await;
    let node = &cluster.nodes[0];
    let exp = now() + 2;
    let short = |sub: &str| sign(SECRET, Algorithm::HS256, json!({"sub": sub, "exp": exp}));
    let (mut kept, _) =
        WsClient::connect_welcomed(&node.ws_url(&format!("token={}", short("a")))).await;
    let (mut lapsed, _) =
        WsClient::connect_welcomed(&node.ws_url(&format!("token={}", short("b")))).await;

    // Bad refreshes: error frames, the session stays (until its exp).
    for (bad, what) in [
        (token("someone-else", json!({})), "another sub"),
        ("abc".to_owned(), "garbage"),
        (
            sign(
                SECRET,
                Algorithm::HS256,
                json!({"sub": "a", "exp": now() - 1}),
            ),
            "expired",
        ),
    ] {
        let r = kept
            .request(json!({"type": "refresh", "token": bad, "id": 1}))
            .await;
        assert_eq!(
            (r["type"].as_str(), r["code"].as_str()),
            (Some("error"), Some("bad_token")),
            "{what}: {r}"
        );
        assert_eq!(r["id"], 1);
    }
    let r = kept
        .request(json!({"type": "refresh", "token": token("a", json!({})), "id": 2}))
        .await;
    assert_eq!(r, json!({"type": "refreshed", "id": 2}));

    // The unrefreshed session ends with 4401 soon after its exp (heartbeat 200 ms).
    assert_eq!(lapsed.expect_close().await, Some(4401));
    assert!(now() >= exp);
    // The refreshed one lives on past the first token's exp.
    while now() < exp + 1 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pong = kept.request(json!({"type": "ping", "id": 3})).await;
    assert_eq!(pong["type"], "pong");
    let m = node.metrics().await;
    assert_eq!(
        m.get(r#"gateway_disconnects_total{reason="token_expired"}"#),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_key_tokens_and_publisher_minted_tokens_are_accepted() {
    // ES256 with a public key file, alongside the HS256 secret.
    let cluster = auth_cluster(&[(
        "GATEWAY__AUTH__PUBLIC_KEY_FILE",
        &fixture("es256-public.pem"),
    )])
    .await;
    let node = &cluster.nodes[0];
    let private = std::fs::read(fixture("es256-private.pem")).unwrap();
    let es = encode(
        &Header::new(Algorithm::ES256),
        &json!({"sub": "es-client", "exp": now() + 60}),
        &EncodingKey::from_ec_pem(&private).unwrap(),
    )
    .unwrap();
    let (_c, welcome) = WsClient::connect_welcomed(&node.ws_url(&format!("token={es}"))).await;
    assert_eq!(welcome["client_id"], "es-client");

    // The real publisher program mints a token the real gateway accepts.
    let out = Command::new(bin_path("publisher-node"))
        .env_clear()
        .env("PUBLISHER__AUTH__SECRET", SECRET)
        .args([
            "token",
            "--sub",
            "12345",
            "--channels",
            "ticks,alerts,chat:*",
        ])
        .args(["--publish", "chat:*", "--ttl", "1h"])
        .output()
        .expect("run publisher-node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stdout.contains("commas") && !stderr.contains("commas"),
        "the secret is never printed"
    );
    let minted = stdout.trim();
    let mut c =
        WsClient::connect(&node.ws_url(&format!("channels=alerts,news&token={minted}"))).await;
    let welcome = c.expect_type("welcome").await;
    assert_eq!(welcome["client_id"], "12345");
    assert_eq!(welcome["channels"], json!(["alerts"]));
    assert_eq!(c.expect_type("error").await["code"], "forbidden"); // news
    let r = c
        .request(json!({"type": "publish", "channel": "chat:lobby", "data": 1, "id": 1}))
        .await;
    assert_eq!(r["type"], "published", "{r}");

    // Without a secret the publisher refuses (exit 2) rather than print an unsigned token.
    let out = Command::new(bin_path("publisher-node"))
        .env_clear()
        .args(["token", "--sub", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_origins_get_4403_and_addresses_are_capped() {
    let cluster = Cluster::builder()
        .nodes(1)
        .env("GATEWAY__ORIGINS", "https://app.example.com")
        .env("GATEWAY__LIMITS__MAX_CONNECTIONS_PER_IP", "2")
        .start()
        .await;
    let node = &cluster.nodes[0];
    let url = node.ws_url("channels=alerts");
    for origin in [
        "https://evil.example.com",
        "null",
        "https://app.example.com.evil.org",
    ] {
        match first(&url, &[("Origin", origin)]).await {
            Received::Closed(code) => assert_eq!(code, Some(4403), "{origin}"),
            Received::Frame(f) => panic!("{origin}: got {f}"),
        }
    }
    let m = node.metrics().await;
    assert_eq!(
        m.get(r#"gateway_disconnects_total{reason="origin_forbidden"}"#),
        3.0
    );

    // Two sessions from 127.0.0.1, then 1013 for the third; a freed slot is usable again.
    let (a, _) = WsClient::connect_welcomed(&url).await;
    let mut b = WsClient::connect_with(&url, &[("Origin", "https://app.example.com")]).await;
    b.expect_type("welcome").await;
    assert_eq!(first(&url, &[]).await.closed(), Some(1013));
    drop(a);
    tests::eventually("a freed per-address slot", async || {
        match first(&url, &[]).await {
            Received::Frame(f) if f["type"] == "welcome" => Some(()),
            _ => None,
        }
    })
    .await;
    let m = node.metrics().await;
    assert!(m.get(r#"gateway_disconnects_total{reason="max_connections_per_ip"}"#) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_their_close_codes() {
    let cluster = Cluster::builder()
        .nodes(1)
        .env("GATEWAY__LIMITS__MAX_MESSAGE_BYTES", "1024")
        .start()
        .await;
    let node = &cluster.nodes[0];
    let ping = br#"{"type":"ping"}"#;
    let big = vec![b' '; 2000];
    let half = vec![b' '; 600];
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("RSV1 set", RawWs::masked(0x80 | 0x40 | 0x1, ping), 1002),
        ("RSV3 set", RawWs::masked(0x80 | 0x10 | 0x1, ping), 1002),
        (
            "reserved data opcode 3",
            RawWs::masked(0x80 | 0x3, ping),
            1002,
        ),
        (
            "reserved control opcode 0xB",
            RawWs::masked(0x80 | 0xB, b""),
            1002,
        ),
        (
            "unmasked client frame",
            RawWs::frame(0x81, ping, None),
            1002,
        ),
        ("fragmented ping", RawWs::masked(0x9, b"x"), 1002),
        (
            "control frame over 125 bytes",
            RawWs::masked(0x89, &[b'x'; 126]),
            1002,
        ),
        (
            "continuation without a start",
            RawWs::masked(0x80, ping),
            1002,
        ),
        (
            "one frame over max_message_bytes",
            RawWs::masked(0x81, &big),
            1009,
        ),
        (
            "fragments over max_message_bytes in total",
            [
                RawWs::masked(0x01, &half),
                RawWs::masked(0x00, &half),
                RawWs::masked(0x80, &half),
            ]
            .concat(),
            1009,
        ),
        ("binary", RawWs::masked(0x82, b"\x01\x02"), 1003),
        (
            "text that is not UTF-8",
            RawWs::masked(0x81, b"{\xff}"),
            1007,
        ),
    ];
    let (mut bystander, _) = WsClient::connect_welcomed(&node.ws_url("channels=alerts")).await;
    for (what, bytes, code) in &cases {
        let mut raw = RawWs::connect(node.port, "/ws?channels=alerts").await;
        let (opcode, welcome) = raw.next_frame().await.expect("welcome");
        assert_eq!(opcode, 1);
        assert!(String::from_utf8_lossy(&welcome).contains("welcome"));
        raw.send_raw(bytes).await;
        assert_eq!(raw.close_code().await, Some(*code), "{what}");
    }
    // The node serves everyone else throughout.
    cluster.redis.cli(&["PUBLISH", "alerts", "still here"]);
    assert_eq!(
        bystander.until_message("alerts").await["data"],
        "still here"
    );
    assert_eq!(node.metrics().await.get("gateway_connections"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_handshakes_are_dropped_and_do_not_starve_clients() {
    const HALF_OPEN: usize = 1000;
    let _ = rlimit::increase_nofile_limit(4096);
    let cluster = Cluster::builder()
        .nodes(1)
        .env("GATEWAY__LIMITS__HANDSHAKE_TIMEOUT_MS", "1000")
        .start()
        .await;
    let node = &cluster.nodes[0];
    let partial = format!(
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUpgrade: websocket\r\n",
        node.port
    );
    let mut stalled = Vec::with_capacity(HALF_OPEN);
    for i in 0..HALF_OPEN {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", node.port))
            .await
            .expect("connect");
        // Half of them send nothing at all, half a partial request head.
        if i % 2 == 0 {
            s.write_all(partial.as_bytes()).await.unwrap();
        }
        stalled.push(s);
    }
    // A normal client still connects and receives.
    let (mut c, _) = WsClient::connect_welcomed(&node.ws_url("channels=alerts")).await;
    cluster.redis.cli(&["PUBLISH", "alerts", "through"]);
    assert_eq!(c.until_message("alerts").await["data"], "through");

    // Every stalled connection is closed by the node after the handshake timeout.
    let started = std::time::Instant::now();
    let closed = futures_util::future::join_all(stalled.into_iter().map(|mut s| async move {
        let mut buf = [0u8; 512];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                // A 408 or similar answer before the close is fine.
                Ok(Ok(_)) => continue,
            }
        }
    }))
    .await;
    let dropped = closed.iter().filter(|c| **c).count();
    assert_eq!(dropped, HALF_OPEN, "stalled connections dropped");
    assert!(started.elapsed() < Duration::from_secs(10));
    // And the session is unaffected.
    let pong = c.request(json!({"type": "ping", "id": 1})).await;
    assert_eq!(pong["type"], "pong");
}

trait ClosedCode {
    fn closed(self) -> Option<u16>;
}

impl ClosedCode for Received {
    fn closed(self) -> Option<u16> {
        match self {
            Received::Closed(code) => code,
            Received::Frame(f) => panic!("expected a close, got {f}"),
        }
    }
}
