//! The node's HTTP side: the public and admin routers, the WebSocket upgrade (the SSE
//! endpoints are [`crate::sse`]), and [`run`], which serves both listeners until shutdown and
//! then drains.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::{reason, Metrics};
use crate::node::Node;
use crate::outbox::signal;
use crate::protocol::close;
use crate::request::{self, error, query_problem, ConnectQuery};
use crate::upgrade::{self, Upgrade};
use crate::{accept, control, origin, session, sse, ticker};

/// Size of tungstenite's read buffer per connection, allocated up front and kept for the
/// connection's life. Client frames are rare and small (a subscribe is ~60 bytes): a frame
/// larger than this is read in two reads (tungstenite grows the buffer to the frame's size
/// once it has read the header), and the default (128 KiB) would cost that much RSS per idle
/// connection.
const READ_BUFFER: usize = 64;
/// tungstenite writes only control frames (pings, close frames, replies to the client's),
/// and hands them on at once: the session's outbox is the socket's only writer and batches.
const WRITE_BUFFER: usize = 0;

/// Why the node could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("configuration key `{}`: {}", .0.key, .0.message)]
    Auth(crate::auth::KeyError),
}

/// Serve `listener` (clients) and `admin_listener` (operators) until `shutdown` is cancelled,
/// then drain: `/readyz` turns 503, no new connections, every session closes with 1001, and
/// the node waits up to `drain_timeout_ms` for them before returning.
pub async fn run(
    listener: TcpListener,
    admin_listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let verifier = config.auth.verifier().map_err(RunError::Auth)?;
    let metrics = Metrics::new();
    let hub = Arc::new(Hub::with_write_delay(
        metrics.clone(),
        config.write_delay_ms > 0,
    ));
    // The bus and the ticker outlive the sessions' drain, so they have their own token.
    let background = CancellationToken::new();
    let bus = Bus::start(&config, hub.clone(), metrics.clone(), background.clone());
    let node_name = config.node_name();
    let ticks = config
        .ticks_enabled()
        .then(|| ticker::spawn(&config, &node_name, bus.clone(), background.clone()));
    let index_page = index_page(&config);
    let node = Arc::new(Node::new(
        config, node_name, hub, bus, metrics, verifier, index_page,
    ));
    // Stopped with the bus, after the drain: it writes the drained sessions' leaves first.
    let presence_writer = tokio::spawn(node.presence.clone().run(background.clone()));
    control::start(&node, background.clone());
    tokio::spawn(node.relay.clone().run(background.clone()));
    let writes = match crate::outbox::configure_batched_writes(node.config.io_uring) {
        Ok(()) => "io_uring batches".to_owned(),
        Err(why) => format!("one writev per socket ({why})"),
    };
    tracing::info!(
        node = %node.node_name,
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        admin = %admin_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        bus = if node.config.redis.is_cluster() { "redis cluster" } else if node.config.redis.enabled() { "redis" } else { "memory" },
        redis = %node.config.redis.url.as_deref().map_or_else(|| "none".into(), crate::config::redact_url),
        auth = node.verifier.is_some(),
        writes = %writes,
        "gateway serving"
    );

    tokio::spawn(heartbeat(node.clone(), background.clone()));
    if node.config.write_delay_ms > 0 {
        tokio::spawn(flush_delayed_writes(
            node.hub.clone(),
            std::time::Duration::from_millis(node.config.write_delay_ms),
            background.clone(),
        ));
    }
    let handshake = node.config.handshake_timeout();
    let admin_stop = CancellationToken::new();
    let admin = tokio::spawn(accept::serve(
        admin_listener,
        admin_router(node.clone()),
        handshake,
        admin_stop.clone(),
    ));
    let public_stop = CancellationToken::new();
    let public = tokio::spawn(accept::serve(
        listener,
        public_router(node.clone()),
        handshake,
        public_stop.clone(),
    ));
    shutdown.cancelled().await;

    // Drain: /readyz turns 503 and upgrades are refused, every session is told to close with
    // 1001 (at once: not after the HTTP connections in flight, which may be slow clients
    // still sending a request head), accepting stops; then wait, bounded, for all of it.
    node.start_draining();
    public_stop.cancel();
    let deadline = tokio::time::Instant::now() + node.config.drain_timeout();
    if tokio::time::timeout_at(deadline, public).await.is_err() {
        tracing::warn!("drain timeout: HTTP connections still open");
    }
    node.tracker().close();
    let open = node.tracker().len();
    if tokio::time::timeout_at(deadline, node.tracker().wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = node.tracker().len(),
            "drain timeout: sessions still open"
        );
    } else {
        tracing::info!(closed = open, "drained");
    }
    background.cancel();
    // Bounded (the writer gives its last write two seconds): the drained sessions' presence
    // entries leave Redis now rather than when they expire.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), presence_writer).await;
    if let Some(ticks) = ticks {
        // Bounded: a held tick lease is released within its own deadline (a third of its TTL),
        // so the next ticker takes over at once instead of after the TTL.
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(node.config.tick_lease_ttl_ms),
            ticks,
        )
        .await;
    }
    admin_stop.cancel();
    let _ = admin.await;
    Ok(())
}

/// With `write_delay_ms`: every `every`, write what the fan-outs owed since the last tick
/// (one write per socket for all of it). Runs until the bus stops, then writes the rest.
async fn flush_delayed_writes(hub: Arc<Hub>, every: std::time::Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => hub.flush_delayed(),
            _ = stop.cancelled() => break,
        }
    }
    hub.flush_delayed();
}

/// The node's heartbeat: every `heartbeat.ping_interval_ms` each session pings its client or,
/// silent for `ping_timeout_ms`, closes with 4001. One node-wide tick, no timer per session.
async fn heartbeat(node: Arc<Node>, stop: CancellationToken) {
    let every = node.config.ping_interval();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => node.signal_all(signal::BEAT),
        }
    }
}

// === routers ===

fn public_router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/ws", get(ws_handler))
        .route("/websocket", get(ws_handler))
        .route("/sse", get(sse::open).options(sse::preflight))
        .route("/sse/{session}", post(sse::post).options(sse::preflight))
        .route("/", get(index))
        .route("/client.js", get(client_js))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(node)
}

fn admin_router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(node)
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn method_not_allowed() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not answer this method",
    )
}

async fn healthz() -> Response {
    Json(serde_json::json!({ "status": "ok" })).into_response()
}

async fn readyz(State(node): State<Arc<Node>>) -> Response {
    let draining = node.is_draining();
    let bus = node.bus.is_ready();
    let status = if node.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({
            "ready": status == StatusCode::OK,
            "draining": draining,
            "bus": if bus { "up" } else { "down" },
            "node": node.node_name,
        })),
    )
        .into_response()
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        node.metrics.render(),
    )
        .into_response()
}

/// The demo page, told which bus the node runs, so that its hints suggest only commands that
/// can work against it (nothing outside a memory-bus node can publish to it).
fn index_page(config: &Config) -> String {
    let page = include_str!("../assets/index.html");
    match config.redis.enabled() {
        true => page.to_owned(),
        false => page.replacen(
            r#"<body data-bus="redis">"#,
            r#"<body data-bus="memory">"#,
            1,
        ),
    }
}

async fn index(State(node): State<Arc<Node>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        node.index_page().to_owned(),
    )
        .into_response()
}

/// The browser client module, embedded in the binary.
const CLIENT_JS: &str = include_str!("../assets/client.js");

/// `client.js`'s strong validator: the gateway's version and a hash of the module's text, so
/// it changes exactly when the module does.
static CLIENT_JS_ETAG: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    // FNV-1a: stable across builds and Rust versions, unlike `DefaultHasher`.
    let hash = CLIENT_JS.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("\"{}-{hash:016x}\"", env!("CARGO_PKG_VERSION"))
});

/// `/client.js`, importable from the sites in `origins` (CORS) and cached as an asset that
/// changes with the gateway's version: browsers keep it but revalidate before each use
/// (`no-cache` + `ETag`, answered 304 while unchanged), so an upgraded node never serves a
/// page a stale client.
async fn client_js(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    let etag = CLIENT_JS_ETAG.as_str();
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| {
            tags.split(',')
                .map(|t| t.trim().trim_start_matches("W/"))
                .any(|t| t == etag || t == "*")
        });
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
            CLIENT_JS,
        )
            .into_response()
    };
    let out = response.headers_mut();
    out.insert(header::ETAG, header::HeaderValue::from_static(etag));
    out.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("public, no-cache"),
    );
    out.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    // The answer depends on the request's Origin: shared caches must keep them apart.
    out.insert(header::VARY, header::HeaderValue::from_static("Origin"));
    if let Some(origin) = origin::cors_origin(&node.config.origins, &headers) {
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
    response
}

async fn ws_handler(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    query: Result<Query<ConnectQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    upgrade: Result<Upgrade, upgrade::Rejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(e) => return e.into_response(),
    };
    if node.is_draining() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "node is shutting down",
        );
    }
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(Some(node.config.limits.max_message_bytes))
        .max_frame_size(Some(node.config.limits.max_message_bytes));
    let limit = node.config.limits.send_queue_bytes;
    // Refusals of a WebSocket client are close codes after the upgrade, not HTTP statuses:
    // a browser's WebSocket API shows neither the status nor the body of a refused upgrade.
    if let Err(message) = origin::check(&node.config.origins, &headers) {
        let refusal = (close::FORBIDDEN_ORIGIN, reason::ORIGIN_FORBIDDEN, message);
        return upgrade.on_upgrade(config, limit, move |ws| session::refuse(ws, node, refusal));
    }
    let query = match query {
        Ok(Query(query)) => query,
        Err(e) => {
            let message = format!("bad query string: {}", query_problem(&e));
            let refusal = (close::BAD_REQUEST, reason::BAD_REQUEST, message);
            return upgrade.on_upgrade(config, limit, move |ws| session::refuse(ws, node, refusal));
        }
    };
    let channels = query.channel_list();
    let since = query.since.clone();
    let (client_id, grant) = match request::identify(&node, query, &headers) {
        Ok(identity) => identity,
        Err(refusal) => {
            return upgrade.on_upgrade(config, limit, move |ws| session::refuse(ws, node, refusal));
        }
    };
    let params = Box::new(session::Params {
        uuid: uuid::Uuid::new_v4(),
        client_id,
        channels,
        peer,
        since: since
            .filter(|s| !s.trim().is_empty())
            .map(String::into_boxed_str),
        grant,
    });
    let tracker = node.tracker().clone();
    upgrade.on_upgrade(config, limit, move |ws| {
        tracker.track_future(session::run(ws, node, params))
    })
}
