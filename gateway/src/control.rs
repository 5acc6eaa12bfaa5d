//! The node-level control channel (docs/REFERENCE.md §8): messages to every node, or to one
//! node, that act on the node's sessions rather than reach them as frames — the server API's
//! disconnect (close 4409) and unsubscribe, and a client frame POSTed for an SSE session of
//! another node (`forward`, docs/REFERENCE.md §9).
//!
//! On the wire a control message is JSON with a `kind` field, plus `node` when it is
//! addressed to one node (its `node_name`), published on [`protocol::CONTROL_CHANNEL`] (with
//! `redis.prefix` in front): a name outside the channel charset, so no client can subscribe
//! or publish to it. The bus subscribes it like any wanted channel (resubscribed after every
//! reconnect, counted by `/readyz`) and hands its payloads here; [`start`] queues them
//! (bounded) to one task that acts on them.
//!
//! A new kind is a variant of [`ControlMessage`], its name in [`ControlMessage::kind`] and
//! [`KINDS`], and its arm in [`handle`]: all in this file. Senders (the publisher, or a node
//! addressing another) build a [`Control`] and [`Control::encode`] it, or call [`send`].

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError};
use crate::metrics::control_kind;
use crate::node::{Node, SessionCommand};
use crate::protocol;

/// Control messages waiting for the control task at most; more are dropped and counted.
const QUEUE: usize = 4096;

/// What a control message asks for. Serialized with its `kind`:
/// `{"kind":"disconnect","client_id":"12345"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ControlMessage {
    /// Close every session of the client with 4409.
    Disconnect { client_id: String },
    /// Remove `channel` from every session of the client (each gets `unsubscribed`).
    Unsubscribe { client_id: String, channel: String },
    /// Hand a client frame to this node's SSE session `session` (a POST that reached another
    /// node; addressed to the session's node only).
    Forward { session: String, frame: String },
}

/// Every `kind` (the values of `gateway_control_messages_total{kind}`, with `invalid` and
/// `dropped`).
pub const KINDS: [&str; 3] = ["disconnect", "unsubscribe", "forward"];

impl ControlMessage {
    pub fn kind(&self) -> &'static str {
        match self {
            ControlMessage::Disconnect { .. } => KINDS[0],
            ControlMessage::Unsubscribe { .. } => KINDS[1],
            ControlMessage::Forward { .. } => KINDS[2],
        }
    }
}

/// A control message and whom it is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Control {
    /// Only the node whose `node_name` this is acts on it; None = every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(flatten)]
    pub message: ControlMessage,
}

impl Control {
    /// For every node.
    pub fn to_all(message: ControlMessage) -> Control {
        Control {
            node: None,
            message,
        }
    }

    /// For the node named `node` only.
    pub fn to_node(node: &str, message: ControlMessage) -> Control {
        Control {
            node: Some(node.to_owned()),
            message,
        }
    }

    /// The payload to publish on the control channel.
    pub fn encode(&self) -> String {
        // A struct of strings always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn decode(payload: &[u8]) -> Result<Control, serde_json::Error> {
        serde_json::from_slice(payload)
    }
}

/// Publish `control` on the control channel through the node's bus.
pub async fn send(bus: &Bus, control: &Control) -> Result<(), BusError> {
    bus.publish(protocol::CONTROL_CHANNEL, control.encode().as_bytes())
        .await
}

/// Subscribe the node to the control channel and act on what arrives until `stop`.
pub fn start(node: &Arc<Node>, stop: CancellationToken) {
    let metrics = node.metrics.clone();
    for kind in KINDS.iter().chain(&[control_kind::DROPPED]) {
        metrics.control_messages.with_label_values(&[kind]);
    }
    let (tx, rx) = mpsc::channel::<Box<[u8]>>(QUEUE);
    node.bus.on_control(Box::new(move |payload| {
        if tx.try_send(payload.into()).is_err() {
            metrics
                .control_messages
                .with_label_values(&[control_kind::DROPPED])
                .inc();
        }
    }));
    tokio::spawn(run(node.clone(), rx, stop));
}

async fn run(node: Arc<Node>, mut rx: mpsc::Receiver<Box<[u8]>>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            payload = rx.recv() => match payload {
                Some(payload) => receive(&node, &payload),
                None => return,
            },
        }
    }
}

fn receive(node: &Node, payload: &[u8]) {
    let control = match Control::decode(payload) {
        Ok(control) => control,
        Err(e) => {
            tracing::debug!(error = %e, "invalid control message");
            node.metrics
                .control_messages
                .with_label_values(&[control_kind::INVALID])
                .inc();
            return;
        }
    };
    if control
        .node
        .as_deref()
        .is_some_and(|name| name != node.node_name)
    {
        return;
    }
    node.metrics
        .control_messages
        .with_label_values(&[control.message.kind()])
        .inc();
    handle(node, control.message);
}

/// What each kind does on this node.
fn handle(node: &Node, message: ControlMessage) {
    match message {
        ControlMessage::Disconnect { client_id } => {
            let n = node.command_client(&client_id, SessionCommand::Disconnect);
            tracing::debug!(%client_id, sessions = n, "disconnect");
        }
        ControlMessage::Unsubscribe { client_id, channel } => {
            let n = node.command_client(&client_id, SessionCommand::Unsubscribe(channel.into()));
            tracing::debug!(%client_id, sessions = n, "unsubscribe");
        }
        ControlMessage::Forward { session, frame } => node.relay.on_forwarded(&session, frame),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_with_their_kind() {
        let all = Control::to_all(ControlMessage::Disconnect {
            client_id: "42".into(),
        });
        assert_eq!(all.encode(), r#"{"kind":"disconnect","client_id":"42"}"#);
        assert_eq!(Control::decode(all.encode().as_bytes()).unwrap(), all);
        let one = Control::to_node(
            "gw-2",
            ControlMessage::Unsubscribe {
                client_id: "42".into(),
                channel: "chat:a".into(),
            },
        );
        let text = one.encode();
        assert!(text.contains(r#""node":"gw-2""#) && text.contains(r#""kind":"unsubscribe""#));
        assert_eq!(Control::decode(text.as_bytes()).unwrap(), one);
        assert_eq!(one.message.kind(), "unsubscribe");
        let forward = Control::to_node(
            "gw-1",
            ControlMessage::Forward {
                session: "6f1c".into(),
                frame: r#"{"type":"ping"}"#.into(),
            },
        );
        assert_eq!(
            Control::decode(forward.encode().as_bytes()).unwrap(),
            forward
        );
        assert_eq!(forward.message.kind(), "forward");
        assert!(Control::decode(br#"{"kind":"reboot"}"#).is_err());
        assert!(Control::decode(br#"{"client_id":"42"}"#).is_err());
        assert!(Control::decode(b"not json").is_err());
    }
}
