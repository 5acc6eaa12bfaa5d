//! What a client's HTTP request asks for, read the same way by every endpoint that opens or
//! addresses a session (`/ws`, `/sse`, `POST /sse/{session}`): the connect query, the token
//! (`?token=` or `Authorization: Bearer`), the identity it resolves to, and the JSON error
//! body of a refused request.

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use crate::auth::{AuthError, Grant};
use crate::metrics::reason;
use crate::node::Node;
use crate::protocol::{self, close};

/// A refusal of a session: close code, `gateway_disconnects_total` reason, message.
pub type Refusal = (u16, &'static str, String);

/// A JSON error body: `{"error":code,"message":…}`.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": code, "message": message.into() })),
    )
        .into_response()
}

/// Query parameters of `/ws` and `/sse` (docs/REFERENCE.md §2). `Id` is the seed page's
/// spelling of `client_id`.
#[derive(Debug, Deserialize)]
pub struct ConnectQuery {
    pub channels: Option<String>,
    pub client_id: Option<String>,
    #[serde(rename = "Id")]
    pub id: Option<String>,
    pub token: Option<String>,
    pub since: Option<String>,
}

impl ConnectQuery {
    /// The channels named in `channels` (not yet validated); empty = the defaults.
    pub fn channel_list(&self) -> Vec<String> {
        self.channels
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// What is wrong with a query string that does not deserialize, in a close reason's words
/// (axum's rejection text starts with its own preamble).
pub fn query_problem(rejection: &axum::extract::rejection::QueryRejection) -> String {
    let text = rejection.body_text();
    match text.split_once(": ") {
        Some((_, detail)) => detail.to_owned(),
        None => text,
    }
}

/// The token of `Authorization: Bearer <token>`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The session's client id and, with auth on, what its token allows; or why it is refused
/// (4401 for the token, 4400 for a bad `client_id`). With auth on the identity comes from the
/// token only; `client_id`/`Id` are ignored. Without either, a fresh random id.
pub fn identify(
    node: &Node,
    query: ConnectQuery,
    headers: &HeaderMap,
) -> Result<(String, Option<Box<Grant>>), Refusal> {
    match &node.verifier {
        Some(verifier) => {
            let token = query.token.as_deref().or_else(|| bearer(headers));
            match token
                .ok_or(AuthError::Missing)
                .and_then(|t| verifier.verify(t))
            {
                Ok(grant) => Ok((grant.sub.clone(), Some(Box::new(grant)))),
                Err(e) => Err((close::UNAUTHORIZED, reason::UNAUTHORIZED, e.to_string())),
            }
        }
        None => match query.client_id.or(query.id) {
            Some(id) if protocol::valid_client_id(&id) => Ok((id, None)),
            Some(_) => Err((
                close::BAD_REQUEST,
                reason::BAD_REQUEST,
                format!("bad client_id: {}", protocol::CLIENT_ID_RULE),
            )),
            None => Ok((uuid::Uuid::new_v4().simple().to_string(), None)),
        },
    }
}
