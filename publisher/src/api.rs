//! The HTTP API: `POST /alerts`, `POST /publish`, `POST /broadcast`, and the server API
//! (docs/REFERENCE.md §8: `GET /presence/{channel}`, `GET /presence/{channel}/stats`,
//! `GET /history/{channel}`, `GET /channels`, `POST /disconnect`, `POST /unsubscribe`), all
//! behind the optional API key; and `GET /metrics`, `/healthz`, `/readyz`.
//!
//! Every refusal is a 4xx with a JSON body `{"error":"<code>","message":"…"}` and publishes
//! nothing: bodies are read whole (up to `max_body_bytes`) and validated completely before the
//! first message goes out. Codes: `unauthorized` (401), `invalid_json` (400, not JSON),
//! `invalid_body` (400, JSON of the wrong shape or with unknown fields), `invalid_level`,
//! `invalid_text`, `invalid_title`, `invalid_channel`, `invalid_channels`,
//! `invalid_client_id`, `invalid_since`, `invalid_limit`, `invalid_query` (400),
//! `history_gone` (410: the `since` offset cannot be resumed from),
//! `payload_too_large` (413), `unsupported_media_type` (415, the body must be sent as
//! `application/json`, which also keeps browsers from posting here cross-site without a
//! preflight), `not_found` (404), `method_not_allowed` (405), and `redis_unavailable` (503)
//! when Redis cannot take the message.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::alert::{Alert, AlertRequest};
use crate::channel::Channel;
use crate::config::{Config, Secret};
use crate::pool::RedisError;
use crate::publish::{Message, Publisher};
use crate::server_api::{self, HistoryError};
use gateway::control::ControlMessage;

/// What every handler shares; cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

struct Inner {
    publisher: Publisher,
    alerts_channel: Channel,
    api_key: Option<Secret>,
    max_body_bytes: usize,
    max_broadcast_channels: usize,
    /// Cancelled when the process drains: `/readyz` then answers 503.
    shutdown: CancellationToken,
}

/// A refusal or failure, rendered as `{"error":code,"message":…}` with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

/// `axum::Json`, but its rejections are [`ApiError`]s (JSON bodies) instead of plain text.
struct ApiJson<T>(T);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    channel: String,
    /// Kept as the client sent it: published byte for byte.
    data: Box<RawValue>,
}

/// `POST /alerts` answers with the alert as published, so the caller sees its `at`.
#[derive(Serialize)]
struct AlertResponse<'a> {
    published: usize,
    alert: &'a Alert,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastRequest {
    channels: Vec<String>,
    data: Box<RawValue>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectRequest {
    client_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsubscribeRequest {
    client_id: String,
    channel: String,
}

#[derive(Debug, Deserialize)]
struct HistoryQuery {
    since: Option<String>,
    limit: Option<String>,
}

/// Entries `GET /history/{channel}` returns when the request names no `limit`.
const DEFAULT_HISTORY_LIMIT: usize = 100;

/// The API's routes over `publisher`, configured from `config`.
pub fn router(publisher: Publisher, config: &Config, shutdown: CancellationToken) -> Router {
    let state = ApiState {
        inner: Arc::new(Inner {
            publisher,
            alerts_channel: config.alerts_channel(),
            api_key: config.api_key.clone(),
            max_body_bytes: config.max_body_bytes,
            max_broadcast_channels: config.max_broadcast_channels,
            shutdown,
        }),
    };
    let guarded = Router::new()
        .route("/alerts", post(post_alert))
        .route("/publish", post(post_publish))
        .route("/broadcast", post(post_broadcast))
        .route("/presence/{channel}", get(get_presence))
        .route("/presence/{channel}/stats", get(get_presence_stats))
        .route("/history/{channel}", get(get_history))
        .route("/channels", get(get_channels))
        .route("/disconnect", post(post_disconnect))
        .route("/unsubscribe", post(post_unsubscribe))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .merge(guarded)
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(state)
}

// === handlers ===

async fn post_alert(
    State(state): State<ApiState>,
    ApiJson(request): ApiJson<AlertRequest>,
) -> Result<Response, ApiError> {
    let alert =
        Alert::from_request(request).map_err(|e| ApiError::bad_request(e.code(), e.to_string()))?;
    let message = Message::json(state.inner.alerts_channel.clone(), &alert);
    state.publish(&[message]).await?;
    state.inner.publisher.metrics().alerts_total.inc();
    Ok(Json(AlertResponse {
        published: 1,
        alert: &alert,
    })
    .into_response())
}

async fn post_publish(
    State(state): State<ApiState>,
    ApiJson(request): ApiJson<PublishRequest>,
) -> Result<Response, ApiError> {
    let channel = parse_channel(&request.channel)?;
    let message = Message::new(channel, request.data.get().to_owned());
    let offsets = state.publish(&[message]).await?;
    Ok(Json(json!({ "published": 1, "offset": offsets.first() })).into_response())
}

/// One message to many channels. Duplicate channel names are published once.
async fn post_broadcast(
    State(state): State<ApiState>,
    ApiJson(request): ApiJson<BroadcastRequest>,
) -> Result<Response, ApiError> {
    let max = state.inner.max_broadcast_channels;
    if request.channels.is_empty() || request.channels.len() > max {
        return Err(ApiError::bad_request(
            "invalid_channels",
            format!("channels must list 1 to {max} channels"),
        ));
    }
    let mut channels: Vec<Channel> = Vec::with_capacity(request.channels.len());
    for name in &request.channels {
        let channel = parse_channel(name)?;
        if !channels.contains(&channel) {
            channels.push(channel);
        }
    }
    let payload = bytes::Bytes::from(request.data.get().to_owned());
    let messages: Vec<Message> = channels
        .into_iter()
        .map(|channel| Message::new(channel, payload.clone()))
        .collect();
    let offsets = state.publish(&messages).await?;
    Ok(Json(json!({ "published": messages.len(), "offsets": offsets })).into_response())
}

// --- the server API ---

async fn get_presence(
    State(state): State<ApiState>,
    Path(channel): Path<String>,
) -> Result<Response, ApiError> {
    let channel = parse_channel(&channel)?;
    let clients = server_api::presence(state.redis(), &channel).await?;
    Ok(Json(json!({ "clients": clients })).into_response())
}

async fn get_presence_stats(
    State(state): State<ApiState>,
    Path(channel): Path<String>,
) -> Result<Response, ApiError> {
    let channel = parse_channel(&channel)?;
    let clients = server_api::presence(state.redis(), &channel).await?;
    let (num_clients, num_users) = server_api::stats(&clients);
    Ok(Json(json!({ "num_clients": num_clients, "num_users": num_users })).into_response())
}

async fn get_history(
    State(state): State<ApiState>,
    Path(channel): Path<String>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let channel = parse_channel(&channel)?;
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let since = match query.since.as_deref() {
        None | Some("") => None,
        Some(text) => Some(gateway::protocol::Offset::parse(text).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_since",
                "`since` must be an offset from a message (<epoch>:<ms>-<seq>)",
            )
        })?),
    };
    let max = server_api::MAX_HISTORY_LIMIT;
    let limit = match query.limit.as_deref() {
        None | Some("") => DEFAULT_HISTORY_LIMIT,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request("invalid_limit", format!("`limit` must be 1 to {max}"))
            })?,
    };
    match server_api::history(state.redis(), &channel, since.as_ref(), limit).await {
        Ok(page) => Ok(Json(page).into_response()),
        Err(HistoryError::Gone(why)) => Err(ApiError::new(StatusCode::GONE, "history_gone", why)),
        Err(HistoryError::Redis(e)) => Err(e.into()),
    }
}

async fn get_channels(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let channels = server_api::channels(state.redis()).await?;
    Ok(Json(json!({ "channels": channels })).into_response())
}

async fn post_disconnect(
    State(state): State<ApiState>,
    ApiJson(request): ApiJson<DisconnectRequest>,
) -> Result<Response, ApiError> {
    let client_id = parse_client_id(&request.client_id)?;
    server_api::control(state.redis(), ControlMessage::Disconnect { client_id }).await?;
    Ok(Json(json!({ "sent": true })).into_response())
}

async fn post_unsubscribe(
    State(state): State<ApiState>,
    ApiJson(request): ApiJson<UnsubscribeRequest>,
) -> Result<Response, ApiError> {
    let client_id = parse_client_id(&request.client_id)?;
    let channel = parse_channel(&request.channel)?;
    if channel.as_str() == gateway::protocol::personal_channel(&client_id) {
        return Err(ApiError::bad_request(
            "invalid_channel",
            "a client's personal channel cannot be unsubscribed; disconnect it instead",
        ));
    }
    let message = ControlMessage::Unsubscribe {
        client_id,
        channel: channel.to_string(),
    };
    server_api::control(state.redis(), message).await?;
    Ok(Json(json!({ "sent": true })).into_response())
}

fn parse_client_id(id: &str) -> Result<String, ApiError> {
    if gateway::protocol::valid_client_id(id) {
        Ok(id.to_owned())
    } else {
        Err(ApiError::bad_request(
            "invalid_client_id",
            format!("client_id must be {}", gateway::protocol::CLIENT_ID_RULE),
        ))
    }
}

async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.inner.publisher.metrics().render(),
    )
        .into_response()
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<ApiState>) -> Response {
    if state.inner.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "draining" })),
        )
            .into_response();
    }
    match state.inner.publisher.redis().ping().await {
        Ok(()) => Json(json!({ "status": "ready" })).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unavailable", "message": e.to_string() })),
        )
            .into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}

/// Refuses guarded requests without the configured key, before their body is read.
async fn require_api_key(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.inner.api_key {
        let authorized = bearer_token(request.headers())
            .is_some_and(|token| constant_time_eq(key.expose().as_bytes(), token.as_bytes()));
        if !authorized {
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong API key; send Authorization: Bearer <key>",
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    next.run(request).await
}

// === impl ApiState ===

impl ApiState {
    fn redis(&self) -> &crate::pool::RedisPool {
        self.inner.publisher.redis()
    }

    async fn publish(&self, messages: &[Message]) -> Result<Vec<String>, ApiError> {
        self.inner
            .publisher
            .publish_all(messages)
            .await
            .map_err(ApiError::from)
    }
}

// === impl ApiError ===

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.code, "message": self.message });
        (self.status, Json(body)).into_response()
    }
}

impl From<RedisError> for ApiError {
    /// Redis trouble is the server's problem, not the client's: logged, and a 503.
    fn from(error: RedisError) -> Self {
        warn!(error = %error, "publish failed");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "redis_unavailable",
            error.to_string(),
        )
    }
}

// === impl ApiJson ===

impl<T: DeserializeOwned> FromRequest<ApiState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &ApiState) -> Result<Self, Self::Rejection> {
        let max = state.inner.max_body_bytes;
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection, max)),
        }
    }
}

fn json_rejection(rejection: JsonRejection, max_body_bytes: usize) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body with Content-Type: application/json",
        ),
        JsonRejection::JsonSyntaxError(e) => ApiError::bad_request("invalid_json", e.body_text()),
        JsonRejection::JsonDataError(e) => ApiError::bad_request("invalid_body", e.body_text()),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than {max_body_bytes} bytes"),
        ),
        other => ApiError::new(other.status(), "invalid_body", other.body_text()),
    }
}

fn parse_channel(name: &str) -> Result<Channel, ApiError> {
    Channel::parse(name)
        .map_err(|e| ApiError::bad_request("invalid_channel", format!("{name:?}: {e}")))
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is case-insensitive).
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares a secret with a candidate in time that depends only on the secret's length, so
/// response timing reveals neither how much of a guess was right nor the secret's length.
fn constant_time_eq(secret: &[u8], candidate: &[u8]) -> bool {
    let mut diff = u8::from(secret.len() != candidate.len());
    for (i, s) in secret.iter().enumerate() {
        let c = candidate.get(i).copied().unwrap_or(!*s);
        diff |= s ^ c;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"secret", b"secre"));
        assert!(!constant_time_eq(b"secret", b""));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer k1"));
        assert_eq!(bearer_token(&headers), Some("k1"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic k1"));
        assert_eq!(bearer_token(&headers), None);
    }
}
