//! The publisher's envelope (docs/REFERENCE.md §3 "Wire format"): a NUL byte, the offset
//! `<epoch>:<stream id>`, `\n`, then the payload. Anything else is a live-only payload
//! without an offset. And when a message with an offset was published, from its stream id.
//!
//! The gateways' own presence events (`join`/`leave`, docs/REFERENCE.md §8) travel on the
//! channel too, as a NUL byte, `event`, `\n`, then the server frame: never an offset (`event`
//! has no `:`), so they never enter history or move a channel's position.

use std::time::{Duration, Instant};

use crate::protocol::Offset;

/// Split a pub/sub payload into `(offset, payload)`. The publisher's envelope is a NUL byte,
/// the offset, `\n`, then the payload; anything else (a plain `PUBLISH`, or a malformed
/// envelope) is a live-only payload without an offset.
pub fn envelope(raw: &[u8]) -> (Option<&str>, &[u8]) {
    let parsed = raw.strip_prefix(b"\0").and_then(|rest| {
        let nl = rest.iter().position(|&b| b == b'\n')?;
        let offset = std::str::from_utf8(&rest[..nl]).ok()?;
        Offset::parse(offset)?;
        Some((Some(offset), &rest[nl + 1..]))
    });
    parsed.unwrap_or((None, raw))
}

/// The head of a presence event on a channel.
pub const EVENT_HEAD: &[u8] = b"\0event\n";

/// The server frame carried by a presence event, or None for anything else.
pub fn event(payload: &[u8]) -> Option<&str> {
    let frame = std::str::from_utf8(payload.strip_prefix(EVENT_HEAD)?).ok()?;
    frame.starts_with('{').then_some(frame)
}

/// When a message with this offset was published, as an `Instant`: the stream id's
/// milliseconds are the wall-clock time of the `XADD`. Now, for a clock in the future.
pub fn published_at(offset: &str) -> Instant {
    let now = Instant::now();
    let Some(ms) = Offset::parse(offset).map(|o| o.id.0) else {
        return now;
    };
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    now.checked_sub(Duration::from_millis(wall.saturating_sub(ms)))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_are_told_from_plain_payloads() {
        assert_eq!(
            envelope(b"\0k3f9:17-0\n{\"a\":1}"),
            (Some("k3f9:17-0"), &b"{\"a\":1}"[..])
        );
        assert_eq!(envelope(b"\0e:1-0\n"), (Some("e:1-0"), &b""[..]));
        assert_eq!(envelope(b"{\"a\":1}"), (None, &b"{\"a\":1}"[..]));
        // Malformed envelopes are plain payloads.
        assert_eq!(envelope(b"\0no newline"), (None, &b"\0no newline"[..]));
        assert_eq!(
            envelope(b"\0bad offset\nx"),
            (None, &b"\0bad offset\nx"[..])
        );
        assert_eq!(envelope(b""), (None, &b""[..]));
    }

    #[test]
    fn presence_events_are_never_messages_with_offsets() {
        let raw = b"\0event\n{\"type\":\"join\"}";
        assert_eq!(envelope(raw), (None, &raw[..]));
        assert_eq!(event(raw), Some("{\"type\":\"join\"}"));
        assert_eq!(event(b"{\"type\":\"join\"}"), None);
        assert_eq!(event(b"\0event\nnot a frame"), None);
    }

    #[test]
    fn publish_time_comes_from_the_stream_id() {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let at = published_at(&format!("e:{}-0", ms - 250));
        let age = at.elapsed();
        assert!(
            age >= Duration::from_millis(240) && age < Duration::from_secs(5),
            "{age:?}"
        );
        assert!(published_at(&format!("e:{}-0", ms + 60_000)).elapsed() < Duration::from_secs(1));
    }
}
