//! The Server-Sent Events endpoints (docs/REFERENCE.md §9): `GET /sse` opens a session on the
//! SSE transport (`session::sse`) with the parameters of `/ws`; `POST /sse/{session}` hands
//! one client frame to a session: into its inbox when this node holds it (the relay knows),
//! else as a `forward` message of the control channel to the node that does (its Redis key
//! says which); `OPTIONS` answers the CORS preflight of both for the allowed origins.
//!
//! A stream that cannot become a session (a bad token, a bad query, a full node) is still a
//! `200 text/event-stream` that says why in its only event, `event: close` with the close code
//! of §2, like a WebSocket closed right after its upgrade; only what a browser could not read
//! anyway (a refused Origin) and a draining node are HTTP errors.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::auth::AuthError;
use crate::control::{self, Control, ControlMessage};
use crate::metrics::{reason, transport};
use crate::node::Node;
use crate::relay::{DeliverError, Owner, Relay};
use crate::request::{self, error, query_problem, ConnectQuery, Refusal};
use crate::session::{self, sse::Sse};
use crate::{origin, protocol::close};

/// The header a browser's EventSource sends when it reconnects.
const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");
/// Tells nginx (and proxies that follow it) not to buffer the stream.
const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// `GET /sse`: a session on an event stream.
pub async fn open(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    query: Result<Query<ConnectQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Response {
    if node.is_draining() {
        return with_cors(
            &node,
            &headers,
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "draining",
                "node is shutting down",
            ),
        );
    }
    if let Err(message) = origin::check(&node.config.origins, &headers) {
        node.metrics
            .disconnects
            .with_label_values(&[reason::ORIGIN_FORBIDDEN, transport::SSE])
            .inc();
        return error(StatusCode::FORBIDDEN, "origin_forbidden", message);
    }
    let query = match query {
        Ok(Query(query)) => query,
        Err(e) => {
            let message = format!("bad query string: {}", query_problem(&e));
            let refusal = (close::BAD_REQUEST, reason::BAD_REQUEST, message);
            return refused(node, &headers, refusal);
        }
    };
    // A browser's reconnect repeats the URL (and its `since`) and adds `Last-Event-ID`, the
    // newer position: it wins.
    let since = headers
        .get(&LAST_EVENT_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| query.since.clone())
        .filter(|s| !s.trim().is_empty());
    let channels = query.channel_list();
    let (client_id, grant) = match request::identify(&node, query, &headers) {
        Ok(identity) => identity,
        Err(refusal) => return refused(node, &headers, refusal),
    };
    let uuid = uuid::Uuid::new_v4();
    let registration = node.relay.register(uuid, &client_id);
    node.relay.announce(uuid, &client_id).await;
    let max_positions = node.config.limits.max_subscriptions + 1;
    let (transport, body) = session::sse::stream(
        Some(registration),
        since.as_deref(),
        max_positions,
        node.config.limits.send_queue_bytes,
    );
    let params = Box::new(session::Params {
        uuid,
        client_id,
        channels,
        peer,
        since: since.map(String::into_boxed_str),
        grant,
    });
    let tracker = node.tracker().clone();
    let response = stream_response(&node, &headers, body);
    tokio::spawn(tracker.track_future(session::run(transport, node, params)));
    response
}

/// A stream whose only event is the refusal's close code.
fn refused(node: Arc<Node>, headers: &HeaderMap, refusal: Refusal) -> Response {
    let (transport, body): (Sse, Body) = session::sse::stream(None, None, 0, 0);
    let response = stream_response(&node, headers, body);
    tokio::spawn(session::refuse(transport, node, refusal));
    response
}

fn stream_response(node: &Node, headers: &HeaderMap, body: Body) -> Response {
    let mut response = Response::new(body);
    let out = response.headers_mut();
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    out.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    out.insert(X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
    with_cors(node, headers, response)
}

/// Echo an allowed `Origin` in `Access-Control-Allow-Origin`; the answer depends on it, so
/// shared caches must keep answers apart by it.
fn with_cors(node: &Node, headers: &HeaderMap, mut response: Response) -> Response {
    let out = response.headers_mut();
    out.insert(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(origin) = origin::cors_origin(&node.config.origins, headers) {
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
    response
}

/// `OPTIONS /sse`, `OPTIONS /sse/{session}`: the CORS preflight, for allowed origins only.
pub async fn preflight(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    if let Err(message) = origin::check(&node.config.origins, &headers) {
        return error(StatusCode::FORBIDDEN, "origin_forbidden", message);
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    let out = response.headers_mut();
    out.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    out.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type, last-event-id"),
    );
    out.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    with_cors(&node, &headers, response)
}

/// The query of `POST /sse/{session}`: the token, when not in `Authorization`.
#[derive(Debug, Deserialize)]
pub struct PostQuery {
    token: Option<String>,
}

/// `POST /sse/{session}`: one client frame for an SSE session, answered over its stream.
pub async fn post(
    State(node): State<Arc<Node>>,
    Path(session): Path<String>,
    query: Result<Query<PostQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let response = deliver(
        &node,
        &session,
        query.ok().and_then(|q| q.0.token),
        &headers,
        body,
    )
    .await;
    with_cors(&node, &headers, response)
}

async fn deliver(
    node: &Node,
    session: &str,
    token: Option<String>,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(message) = origin::check(&node.config.origins, headers) {
        return error(StatusCode::FORBIDDEN, "origin_forbidden", message);
    }
    // With auth on, who asks comes first: an unknown session and a foreign one look the same
    // to a client without a valid token.
    let sub = match &node.verifier {
        Some(verifier) => {
            let token = token.as_deref().or_else(|| request::bearer(headers));
            match token
                .ok_or(AuthError::Missing)
                .and_then(|t| verifier.verify(t))
            {
                Ok(grant) => Some(grant.sub),
                Err(e) => return error(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()),
            }
        }
        None => None,
    };
    let not_found = || error(StatusCode::NOT_FOUND, "not_found", "no such session");
    let Ok(id) = uuid::Uuid::parse_str(session) else {
        return not_found();
    };
    let owner = match node.relay.lookup(id).await {
        Ok(Some(owner)) => owner,
        Ok(None) => return not_found(),
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("the session could not be looked up: {e}"),
            )
        }
    };
    if sub.is_some_and(|sub| sub != owner.client_id()) {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the token is for another client than the session's",
        );
    }
    let max = node.config.limits.max_message_bytes;
    if body.len() > max {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "message_too_big",
            format!("a client frame is at most limits.max_message_bytes ({max}) bytes"),
        );
    }
    let Ok(frame) = String::from_utf8(body.to_vec()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_utf8",
            "the body is not valid UTF-8",
        );
    };
    let accepted = |forwarded: bool| {
        (
            StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({ "status": "accepted", "forwarded": forwarded })),
        )
            .into_response()
    };
    match owner {
        Owner::Local { inbox, .. } => match Relay::deliver(&inbox, frame) {
            Ok(()) => accepted(false),
            Err(DeliverError::Busy) => error(
                StatusCode::TOO_MANY_REQUESTS,
                "busy",
                DeliverError::Busy.to_string(),
            ),
            Err(DeliverError::Gone) => not_found(),
        },
        // To the session's node, on the control channel: nodes never talk to each other.
        Owner::Remote { node: owner, .. } => {
            let forward = ControlMessage::Forward {
                session: id.as_simple().to_string(),
                frame,
            };
            match control::send(&node.bus, &Control::to_node(&owner, forward)).await {
                Ok(()) => accepted(true),
                Err(e) => error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    format!("the frame could not be forwarded to the session's node: {e}"),
                ),
            }
        }
    }
}
