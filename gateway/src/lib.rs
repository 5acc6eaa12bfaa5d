//! A horizontally scalable WebSocket push gateway node.
//!
//! Clients connect over WebSocket and subscribe to channels; producers publish to Redis; every
//! node delivers every message to its own local subscribers. The contract is
//! docs/REFERENCE.md; the bird's-eye view is ARCHITECTURE.md.
//!
//! # Layout
//!
//! - [`server`]: HTTP routes, the upgrade, [`run`] and the drain.
//! - [`node`]: the node's shared state, as sessions and handlers see it.
//! - [`session`]: one client session's life (reader, batched writer, heartbeat, close codes),
//!   over a WebSocket or Server-Sent Events (`session::ws`, `session::sse`).
//! - [`sse`]: the SSE endpoints (`GET /sse`, `POST /sse/{session}`, CORS preflight).
//! - [`relay`]: where SSE sessions live; POSTed client frames reach their session's node.
//! - [`request`]: what a connect request asks for (query, token, identity), JSON errors.
//! - [`outbox`]: a session's outbound queue, bounded in bytes.
//! - [`hub`]: channel → local subscribers; builds each message frame once and fans it out.
//! - [`bus`]: Redis pub/sub (or the in-process memory bus): subscribe, resubscribe, reconnect.
//! - [`presence`]: who is in a presence channel: the node's entries, their writes and
//!   refresh in Redis, `join`/`leave` events.
//! - [`control`]: the node-level control channel (the server API's disconnect and
//!   unsubscribe; messages addressed to every node or to one).
//! - [`protocol`]: client and server frames, close codes, channel names and patterns.
//! - [`origin`]: the browser Origin allowlist.
//! - [`auth`]: JWT verification and what a token allows.
//! - [`accept`]: the accept loop (HTTP/1.1, handshake deadline, graceful stop).
//! - [`ticker`]: the `ticks` channel; [`lease`]: the tick lease and slot claims shared with
//!   the publisher, so that a deployment has one ticker.
//! - [`config`], [`metrics`], [`shutdown`], [`cli`].

pub mod accept;
pub mod auth;
pub mod bus;
pub mod cli;
pub mod config;
pub mod control;
pub mod hub;
pub mod lease;
pub mod metrics;
pub mod node;
pub mod origin;
pub mod outbox;
pub mod presence;
pub mod protocol;
pub mod relay;
pub mod request;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod sse;
pub mod ticker;
pub mod upgrade;

pub use config::Config;
pub use server::{run, RunError};
