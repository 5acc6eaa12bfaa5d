//! The WebSocket transport: a session's frames as WebSocket text messages, the heartbeat as
//! WebSocket pings, the end as a close frame with the code (docs/REFERENCE.md §2).
//! tungstenite's read and write errors map to the close codes of the protocol.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::SinkExt;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite;

use super::transport::{End, Inbound, Transport};
use crate::metrics::reason;
use crate::protocol::close;

/// An upgraded WebSocket carrying one session.
pub struct Ws(pub WebSocket);

impl Transport for Ws {
    const KIND: &'static str = crate::metrics::transport::WS;
    const PING_PROVES_LIFE: bool = false;

    async fn feed(&mut self, frame: Utf8Bytes) -> Result<(), End> {
        self.0
            .feed(Message::Text(frame))
            .await
            .map_err(classify_error)
    }

    async fn flush(&mut self) -> Result<(), End> {
        self.0.flush().await.map_err(classify_error)
    }

    async fn send(&mut self, frame: Utf8Bytes) -> Result<(), End> {
        self.0
            .send(Message::Text(frame))
            .await
            .map_err(classify_error)
    }

    async fn recv(&mut self) -> Inbound {
        match self.0.recv().await {
            None => Inbound::Lost(End::Gone(reason::CLIENT_CLOSE)),
            Some(Err(e)) => Inbound::Lost(classify_error(e)),
            Some(Ok(Message::Text(text))) => Inbound::Text(text),
            Some(Ok(Message::Binary(_))) => {
                Inbound::Refused(End::Close(close::UNSUPPORTED_DATA, reason::BINARY_FRAME))
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Inbound::Seen,
            Some(Ok(Message::Close(_))) => Inbound::Refused(End::Gone(reason::CLIENT_CLOSE)),
        }
    }

    async fn ping(&mut self) -> Result<(), End> {
        self.0
            .send(Message::Ping(Default::default()))
            .await
            .map_err(classify_error)
    }

    async fn close(&mut self, code: u16, reason: &str) {
        close_socket(&mut self.0, code, reason).await
    }

    async fn gone(&mut self) {
        // Flush a close reply tungstenite may have queued for the client's close frame.
        let _ = timeout(Duration::from_secs(1), self.0.flush()).await;
    }
}

/// Send a close frame, then read until the client answers or goes away.
async fn close_socket(ws: &mut WebSocket, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    if ws.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    while let Some(Ok(msg)) = ws.recv().await {
        if matches!(msg, Message::Close(_)) {
            break;
        }
    }
}

/// Map a WebSocket read/write error to how the session ends.
fn classify_error(e: axum::Error) -> End {
    let inner = e.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => {
            End::Close(close::MESSAGE_TOO_BIG, reason::MESSAGE_TOO_BIG)
        }
        Some(tungstenite::Error::Utf8(_)) => {
            End::Close(close::INVALID_PAYLOAD, reason::INVALID_UTF8)
        }
        Some(tungstenite::Error::Protocol(_)) => {
            End::Close(close::PROTOCOL_ERROR, reason::PROTOCOL_ERROR)
        }
        Some(tungstenite::Error::ConnectionClosed) | Some(tungstenite::Error::AlreadyClosed) => {
            End::Gone(reason::CLIENT_CLOSE)
        }
        _ => End::Gone(reason::IO_ERROR),
    }
}
