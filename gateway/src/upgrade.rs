//! The WebSocket handshake (RFC 6455 §4.2), done on hyper directly rather than through
//! axum's `WebSocketUpgrade`, so that a session gets its raw `TcpStream` back from hyper
//! (`Upgraded::downcast`, keeping the bytes hyper read past the request head): the session's
//! outbox writes pre-framed messages straight into it (`session::ws`). The request is checked
//! as axum checks it, with the same statuses.

use std::future::Future;

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::session::ws::Ws;

/// A valid upgrade request, not answered yet.
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
}

/// Why a request is not a WebSocket upgrade: its status and what to tell the client.
#[derive(Debug)]
pub struct Rejection {
    pub status: StatusCode,
    pub message: &'static str,
}

impl axum::response::IntoResponse for Rejection {
    fn into_response(self) -> Response {
        crate::request::error(self.status, "not_websocket", self.message)
    }
}

fn reject(status: StatusCode, message: &'static str) -> Rejection {
    Rejection { status, message }
}

fn header_eq(headers: &HeaderMap, key: HeaderName, value: &str) -> bool {
    headers
        .get(key)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(value.as_bytes()))
}

fn header_contains(headers: &HeaderMap, key: HeaderName, value: &str) -> bool {
    headers
        .get(key)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains(value))
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = Rejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        if parts.method != Method::GET {
            return Err(reject(
                StatusCode::METHOD_NOT_ALLOWED,
                "Request method must be `GET`",
            ));
        }
        if !header_contains(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                "Connection header did not include 'upgrade'",
            ));
        }
        if !header_eq(&parts.headers, header::UPGRADE, "websocket") {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                "`Upgrade` header did not include 'websocket'",
            ));
        }
        if !header_eq(&parts.headers, header::SEC_WEBSOCKET_VERSION, "13") {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Version` header did not include '13'",
            ));
        }
        let key = parts
            .headers
            .get(header::SEC_WEBSOCKET_KEY)
            .cloned()
            .ok_or(reject(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Key` header missing",
            ))?;
        let on_upgrade = parts.extensions.remove::<OnUpgrade>().ok_or(reject(
            StatusCode::UPGRADE_REQUIRED,
            "WebSocket request couldn't be upgraded since no upgrade state was present",
        ))?;
        Ok(Upgrade { key, on_upgrade })
    }
}

impl Upgrade {
    /// Answer 101 and, once hyper hands the connection over, run `callback` on the session's
    /// transport: the raw socket with tungstenite's `config` for reading and an outbox of
    /// `queue_limit` bytes.
    pub fn on_upgrade<C, Fut>(
        self,
        config: WebSocketConfig,
        queue_limit: usize,
        callback: C,
    ) -> Response
    where
        C: FnOnce(Ws) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade failed");
                    return;
                }
            };
            // accept.rs serves every connection on a `TokioIo<TcpStream>`.
            let parts = match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(parts) => parts,
                Err(_) => {
                    tracing::error!("upgraded connection is not a TcpStream");
                    return;
                }
            };
            // The bytes hyper read past the request head are a slice of its whole read
            // buffer (8 KiB): copy them out and let the buffer go now, not with the session.
            let hyper::upgrade::Parts { io, read_buf, .. } = parts;
            let read = read_buf.to_vec();
            drop(read_buf);
            let ws = Ws::new(io.into_inner(), read, config, queue_limit);
            // The session is a task of its own: this one's state (the upgrade, the
            // configuration, the callback) would otherwise stay in every session's memory.
            tokio::spawn(callback(ws));
        });
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(self.key.as_bytes())) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        response
    }
}
