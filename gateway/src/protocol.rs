//! The client protocol (docs/REFERENCE.md §2): frames clients send, frames the server sends, close
//! codes, channel-name rules and channel patterns. Pure functions only: nothing here touches a
//! socket.
//!
//! Server frames are written by hand into strings rather than through `serde_json::to_string`
//! on a struct, because the message frame is built once per published message and embeds the
//! payload verbatim; every string that did not come from a validated channel name is escaped
//! through `serde_json`.

use serde::Deserialize;
use serde_json::value::RawValue;

/// Longest channel name accepted (docs/REFERENCE.md §2).
pub const MAX_CHANNEL_LEN: usize = 128;

/// Prefix of every client's personal channel.
pub const PERSONAL_PREFIX: &str = "user:";

/// The node-level control channel (`control.rs`; with `redis.prefix` in front on Redis): the
/// server API's disconnects and unsubscribes reach every node on it. Its `#` is outside the
/// channel-name charset, so no client can subscribe or publish to it, and no publisher API
/// accepts it.
pub const CONTROL_CHANNEL: &str = "#control";

// === close codes ===

/// WebSocket close codes the gateway uses (docs/REFERENCE.md §2 table).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    pub const SLOW_CONSUMER: u16 = 4000;
    pub const HEARTBEAT_TIMEOUT: u16 = 4001;
    pub const RATE_LIMITED: u16 = 4029;
    /// The upgrade request's parameters are unusable (a bad `client_id`, a malformed query).
    pub const BAD_REQUEST: u16 = 4400;
    pub const UNAUTHORIZED: u16 = 4401;
    pub const FORBIDDEN_ORIGIN: u16 = 4403;
    /// Disconnected by the server API (`POST /disconnect`): the client must not reconnect on
    /// its own.
    pub const DISCONNECTED: u16 = 4409;
}

// === channel names and patterns ===

/// Whether `name` is a valid channel: 1–128 chars of `A-Z a-z 0-9 _ - . : @`.
pub fn valid_channel(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_CHANNEL_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@'))
}

/// The client-id rule, as error messages and close reasons state it.
pub const CLIENT_ID_RULE: &str = "1-123 chars of A-Z a-z 0-9 _ - . : @";

/// Whether a client id is usable: it becomes part of the personal channel `user:<id>`, so it
/// must keep that channel valid.
pub fn valid_client_id(id: &str) -> bool {
    !id.is_empty() && valid_channel(id) && id.len() + PERSONAL_PREFIX.len() <= MAX_CHANNEL_LEN
}

/// The personal channel of a client.
pub fn personal_channel(client_id: &str) -> String {
    format!("{PERSONAL_PREFIX}{client_id}")
}

/// Glob match where `*` matches any run of characters (including none); everything else is
/// literal. Used for `client_publish` patterns such as `chat:*`.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // Position of the last `*` seen and the name index it was tried at, for backtracking.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// Whether `pattern` is a channel pattern: a channel name in which `*` may stand anywhere.
pub fn valid_pattern(pattern: &str) -> bool {
    !pattern.is_empty()
        && pattern.len() <= MAX_CHANNEL_LEN
        && pattern.bytes().all(|b| {
            b == b'*' || b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@')
        })
}

/// Whether any of `patterns` matches `name`.
pub fn any_matches(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| pattern_matches(p, name))
}

// === history offsets ===

/// A position in a channel's history (docs/REFERENCE.md §5): `<epoch>:<ms>-<seq>`, where
/// `<ms>-<seq>` is the Redis stream id and the epoch names the stream's incarnation. Opaque to
/// clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offset {
    pub epoch: String,
    /// The stream id, `(milliseconds, sequence)`; ordered like Redis orders ids.
    pub id: (u64, u64),
}

impl Offset {
    /// Parse an offset; None when it is not `<epoch>:<ms>-<seq>` (epoch: 1-32 of `A-Z a-z
    /// 0-9`).
    pub fn parse(text: &str) -> Option<Offset> {
        let (epoch, id) = text.split_once(':')?;
        if epoch.is_empty() || epoch.len() > 32 || !epoch.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return None;
        }
        Some(Offset {
            epoch: epoch.to_owned(),
            id: parse_stream_id(id)?,
        })
    }

    /// The Redis stream id, `<ms>-<seq>`.
    pub fn stream_id(&self) -> String {
        format!("{}-{}", self.id.0, self.id.1)
    }
}

/// Parse a Redis stream id `<ms>-<seq>`.
pub fn parse_stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(ms) || !digits(seq) {
        return None;
    }
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// Split the `since` query parameter (`alerts@k3f9:1700000000000-0,chat:lobby@…`) into
/// `(channel, offset)` pairs, each split at its last `@` (channel names may contain `@`,
/// offsets never do). A malformed pair is returned as `Err(pair)`.
pub fn parse_since_param(param: &str) -> Vec<Result<(String, Offset), String>> {
    param
        .split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            pair.rsplit_once('@')
                .filter(|(channel, _)| valid_channel(channel))
                .and_then(|(channel, offset)| Some((channel.to_owned(), Offset::parse(offset)?)))
                .ok_or_else(|| truncate(pair, 64))
        })
        .collect()
}

/// The Redis key of the stream holding `channel`'s history (docs/REFERENCE.md §5):
/// `<prefix>history:{<prefix><channel>}`; its epoch lives at this key plus `:epoch`. The braces
/// make the Redis channel (`<prefix><channel>`) the hash tag of both keys, so that on a Redis
/// Cluster they live in the slot of the channel's SPUBLISH and one script can append and
/// publish. The one definition of the layout: the publisher writes what the gateway reads.
pub fn history_key(prefix: &str, channel: &str) -> String {
    format!("{prefix}history:{{{prefix}{channel}}}")
}

/// The channel and offset of a message frame built by [`message_frame`] with an offset, read
/// back from its text (used only while a session de-duplicates live frames against a replay,
/// so that frames carry nothing extra). Unambiguous: the channel is a validated name written
/// first, and the offset, whose characters need no escaping, is the last field.
pub fn message_identity(frame: &str) -> Option<(&str, &str)> {
    const HEAD: &str = r#"{"type":"message","channel":""#;
    const OFFSET: &str = r#","offset":""#;
    let rest = frame.strip_prefix(HEAD)?;
    let channel = &rest[..rest.find('"')?];
    let body = frame.strip_suffix("\"}")?;
    let offset = &body[body.rfind(OFFSET)? + OFFSET.len()..];
    if offset.contains('"') || offset.contains('\\') {
        return None;
    }
    Some((channel, offset))
}

/// The channel a `message` frame, or an `error` frame naming one, is about: read back from the
/// frame's text, whose field order this module fixes (channel names never need escaping).
pub fn frame_channel(frame: &str) -> Option<&str> {
    const MESSAGE: &str = r#"{"type":"message","channel":""#;
    const ERROR: &str = r#"{"type":"error","#;
    // Not inside an escaped string: there a quote is always preceded by a backslash.
    const CHANNEL: &str = r#","channel":""#;
    let rest = match frame.strip_prefix(MESSAGE) {
        Some(rest) => rest,
        None if frame.starts_with(ERROR) => &frame[frame.find(CHANNEL)? + CHANNEL.len()..],
        None => return None,
    };
    rest.get(..rest.find('"')?)
}

// === client frames ===

/// A frame a client sent, parsed and validated for shape (not yet for permission).
#[derive(Debug)]
pub enum ClientFrame<'a> {
    Subscribe {
        channel: String,
        id: Option<&'a RawValue>,
        since: Option<String>,
    },
    Unsubscribe {
        channel: String,
        id: Option<&'a RawValue>,
    },
    Publish {
        channel: String,
        data: &'a RawValue,
        id: Option<&'a RawValue>,
    },
    Ping {
        id: Option<&'a RawValue>,
    },
    /// A fresh token for the same `sub`, extending the session past the current `exp`.
    Refresh {
        token: String,
        id: Option<&'a RawValue>,
    },
    /// Who is subscribed to a presence channel, on every node.
    Presence {
        channel: String,
        id: Option<&'a RawValue>,
    },
}

/// Why a client frame was refused. Each maps to an `error` frame code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame is not a JSON object: {0}")]
    BadJson(String),
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error("unknown frame type `{0}`")]
    UnknownType(String),
    #[error("invalid channel name `{0}`: 1-128 chars of A-Z a-z 0-9 _ - . : @")]
    BadChannel(String),
    #[error("`id` must be a number or a string")]
    BadId,
}

impl FrameError {
    /// The `code` field of the error frame.
    pub fn code(&self) -> &'static str {
        match self {
            FrameError::BadJson(_) => "bad_json",
            FrameError::MissingField(_) | FrameError::BadId => "bad_frame",
            FrameError::UnknownType(_) => "unknown_type",
            FrameError::BadChannel(_) => "bad_channel",
        }
    }
}

/// The wire shape of every client frame; fields unused by a type are ignored.
#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "type")]
    kind: Option<std::borrow::Cow<'a, str>>,
    channel: Option<String>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    since: Option<String>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    token: Option<String>,
}

/// Best-effort extraction of a request id from a frame that failed to parse, so that the
/// error frame can still echo it.
pub fn salvage_id(text: &str) -> Option<&RawValue> {
    #[derive(Deserialize)]
    struct IdOnly<'a> {
        #[serde(borrow)]
        id: Option<&'a RawValue>,
    }
    serde_json::from_str::<IdOnly>(text)
        .ok()
        .and_then(|f| f.id)
        .filter(|id| id_is_scalar(id))
}

fn id_is_scalar(id: &RawValue) -> bool {
    matches!(id.get().as_bytes().first(), Some(b'"' | b'-' | b'0'..=b'9'))
}

/// Parse one client text frame.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame<'_>, FrameError> {
    let raw: RawFrame =
        serde_json::from_str(text).map_err(|e| FrameError::BadJson(e.to_string()))?;
    if let Some(id) = raw.id {
        if !id_is_scalar(id) {
            return Err(FrameError::BadId);
        }
    }
    let kind = raw.kind.ok_or(FrameError::MissingField("type"))?;
    let channel = || -> Result<String, FrameError> {
        let c = raw
            .channel
            .clone()
            .ok_or(FrameError::MissingField("channel"))?;
        if valid_channel(&c) {
            Ok(c)
        } else {
            Err(FrameError::BadChannel(truncate(&c, 64)))
        }
    };
    match kind.as_ref() {
        "subscribe" => Ok(ClientFrame::Subscribe {
            channel: channel()?,
            id: raw.id,
            since: raw.since,
        }),
        "unsubscribe" => Ok(ClientFrame::Unsubscribe {
            channel: channel()?,
            id: raw.id,
        }),
        "publish" => Ok(ClientFrame::Publish {
            channel: channel()?,
            data: raw.data.ok_or(FrameError::MissingField("data"))?,
            id: raw.id,
        }),
        "ping" => Ok(ClientFrame::Ping { id: raw.id }),
        "presence" => Ok(ClientFrame::Presence {
            channel: channel()?,
            id: raw.id,
        }),
        "refresh" => Ok(ClientFrame::Refresh {
            token: raw.token.ok_or(FrameError::MissingField("token"))?,
            id: raw.id,
        }),
        other => Err(FrameError::UnknownType(truncate(other, 64))),
    }
}

/// Cut a client-supplied string for an error message, on a char boundary.
fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

// === server frames ===

/// Append `s` as a JSON string literal.
fn push_json_str(out: &mut String, s: &str) {
    // Serializing a &str into a String cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
}

fn push_id(out: &mut String, id: Option<&RawValue>) {
    if let Some(id) = id {
        out.push_str(r#","id":"#);
        out.push_str(id.get());
    }
}

/// `{"type":"message","channel":…,"data":…}`: `data` is the payload verbatim when it is valid
/// JSON, else the payload as a JSON string (invalid UTF-8 replaced).
pub fn message_frame(channel: &str, payload: &[u8], offset: Option<&str>) -> String {
    let mut out = String::with_capacity(48 + channel.len() + payload.len());
    out.push_str(r#"{"type":"message","channel":"#);
    push_json_str(&mut out, channel);
    out.push_str(r#","data":"#);
    match std::str::from_utf8(payload) {
        Ok(text) if serde_json::from_str::<&RawValue>(text).is_ok() => out.push_str(text.trim()),
        Ok(text) => push_json_str(&mut out, text),
        Err(_) => push_json_str(&mut out, &String::from_utf8_lossy(payload)),
    }
    if let Some(offset) = offset {
        out.push_str(r#","offset":"#);
        push_json_str(&mut out, offset);
    }
    out.push('}');
    out
}

/// `{"type":"welcome",…}`; `channels` lists what the session was subscribed to at connect.
pub fn welcome_frame(session: &str, client_id: &str, node: &str, channels: &[String]) -> String {
    let mut out = String::from(r#"{"type":"welcome","session":"#);
    push_json_str(&mut out, session);
    out.push_str(r#","client_id":"#);
    push_json_str(&mut out, client_id);
    out.push_str(r#","node":"#);
    push_json_str(&mut out, node);
    out.push_str(r#","channels":["#);
    for (i, c) in channels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(&mut out, c);
    }
    out.push_str("]}");
    out
}

/// `{"type":"subscribed"|"unsubscribed","channel":…,"id":…}`.
pub fn ack_frame(kind: &str, channel: &str, id: Option<&RawValue>) -> String {
    let mut out = String::from(r#"{"type":"#);
    push_json_str(&mut out, kind);
    out.push_str(r#","channel":"#);
    push_json_str(&mut out, channel);
    push_id(&mut out, id);
    out.push('}');
    out
}

/// `{"type":"pong","id":…}`.
pub fn pong_frame(id: Option<&RawValue>) -> String {
    let mut out = String::from(r#"{"type":"pong""#);
    push_id(&mut out, id);
    out.push('}');
    out
}

/// `{"type":"refreshed","id":…}`: the acknowledgement of a token refresh.
pub fn refreshed_frame(id: Option<&RawValue>) -> String {
    let mut out = String::from(r#"{"type":"refreshed""#);
    push_id(&mut out, id);
    out.push('}');
    out
}

/// `{"type":"published","channel":…,"id":…}`: the acknowledgement of a client publish.
pub fn published_frame(channel: &str, id: Option<&RawValue>) -> String {
    ack_frame("published", channel, id)
}

/// One presence entry: a session subscribed to a presence channel, on some node
/// (docs/REFERENCE.md §8). Stored in Redis as this JSON; listed in `presence` frames and by
/// the server API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct ClientInfo {
    pub client_id: String,
    pub session: String,
    pub node: String,
}

/// `{"type":"presence","channel":…,"clients":[…],"id":…}`.
pub fn presence_frame(channel: &str, clients: &[ClientInfo], id: Option<&RawValue>) -> String {
    let mut out = String::from(r#"{"type":"presence","channel":"#);
    push_json_str(&mut out, channel);
    out.push_str(r#","clients":"#);
    out.push_str(&serde_json::to_string(clients).unwrap_or_else(|_| "[]".into()));
    push_id(&mut out, id);
    out.push('}');
    out
}

/// `{"type":"join"|"leave","channel":…,"client_id":…,"session":…}`: a session subscribed to
/// or left a presence channel.
pub fn presence_event_frame(kind: &str, channel: &str, client_id: &str, session: &str) -> String {
    let mut out = String::from(r#"{"type":"#);
    push_json_str(&mut out, kind);
    out.push_str(r#","channel":"#);
    push_json_str(&mut out, channel);
    out.push_str(r#","client_id":"#);
    push_json_str(&mut out, client_id);
    out.push_str(r#","session":"#);
    push_json_str(&mut out, session);
    out.push('}');
    out
}

/// `{"type":"error","code":…,"message":…,"id":…}`; `channel` is added when the error is about
/// one channel.
pub fn error_frame(
    code: &str,
    message: &str,
    channel: Option<&str>,
    id: Option<&RawValue>,
) -> String {
    let mut out = String::from(r#"{"type":"error","code":"#);
    push_json_str(&mut out, code);
    out.push_str(r#","message":"#);
    push_json_str(&mut out, message);
    if let Some(channel) = channel {
        out.push_str(r#","channel":"#);
        push_json_str(&mut out, channel);
    }
    push_id(&mut out, id);
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_channel_is_not_a_channel_name() {
        assert!(!valid_channel(CONTROL_CHANNEL));
        assert!(matches!(
            parse_client_frame(r##"{"type":"subscribe","channel":"#control"}"##),
            Err(FrameError::BadChannel(_))
        ));
    }

    #[test]
    fn presence_frames() {
        let frame = parse_client_frame(r#"{"type":"presence","channel":"chat:a","id":3}"#);
        assert!(matches!(frame, Ok(ClientFrame::Presence { channel, .. }) if channel == "chat:a"));
        let clients = vec![ClientInfo {
            client_id: "a\"b".into(),
            session: "s".into(),
            node: "gw-1".into(),
        }];
        let id = serde_json::from_str::<&RawValue>("3").unwrap();
        let text = presence_frame("chat:a", &clients, Some(id));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["clients"][0]["client_id"], "a\"b");
        assert_eq!(v["id"], 3);
        let v: serde_json::Value =
            serde_json::from_str(&presence_event_frame("join", "chat:a", "x", "s1")).unwrap();
        assert_eq!(v["type"], "join");
        assert_eq!(v["session"], "s1");
    }

    #[test]
    fn channel_names() {
        assert!(valid_channel("ticks"));
        assert!(valid_channel("chat:lobby"));
        assert!(valid_channel("a.b-c_d@e:1"));
        assert!(valid_channel(&"x".repeat(128)));
        assert!(!valid_channel(&"x".repeat(129)));
        assert!(!valid_channel(""));
        assert!(!valid_channel("a b"));
        assert!(!valid_channel("a,b"));
        assert!(!valid_channel("é"));
        assert!(!valid_channel("a*"));
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("chat:*", "chat:lobby"));
        assert!(pattern_matches("chat:*", "chat:"));
        assert!(!pattern_matches("chat:*", "chatroom"));
        assert!(pattern_matches("*", "anything"));
        assert!(pattern_matches("a*b*c", "aXXbYYc"));
        assert!(!pattern_matches("a*b*c", "aXXbYY"));
        assert!(pattern_matches("exact", "exact"));
        assert!(!pattern_matches("exact", "exactly"));
        assert!(pattern_matches("*:lobby", "chat:lobby"));
    }

    #[test]
    fn parses_frames() {
        match parse_client_frame(r#"{"type":"subscribe","channel":"room:42","id":7}"#) {
            Ok(ClientFrame::Subscribe { channel, id, .. }) => {
                assert_eq!(channel, "room:42");
                assert_eq!(id.map(|i| i.get()), Some("7"));
            }
            other => panic!("{other:?}"),
        }
        match parse_client_frame(r#"{"type":"publish","channel":"chat:a","data":{"text":"hi"}}"#) {
            Ok(ClientFrame::Publish { data, .. }) => assert_eq!(data.get(), r#"{"text":"hi"}"#),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_client_frame("not json").unwrap_err().code(),
            "bad_json"
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"nope"}"#).unwrap_err().code(),
            "unknown_type"
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"subscribe","channel":"bad name"}"#)
                .unwrap_err()
                .code(),
            "bad_channel"
        );
        assert_eq!(
            parse_client_frame(r#"{"channel":"x"}"#).unwrap_err().code(),
            "bad_frame"
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"ping","id":{"a":1}}"#)
                .unwrap_err()
                .code(),
            "bad_frame"
        );
        assert_eq!(parse_client_frame("[1,2]").unwrap_err().code(), "bad_json");
    }

    #[test]
    fn message_frames_embed_json_verbatim() {
        let f = message_frame("alerts", br#"{"level":"critical"}"#, None);
        assert_eq!(
            f,
            r#"{"type":"message","channel":"alerts","data":{"level":"critical"}}"#
        );
        let f = message_frame("logs", b"plain \"text\"", None);
        assert_eq!(
            f,
            r#"{"type":"message","channel":"logs","data":"plain \"text\""}"#
        );
        let v: serde_json::Value =
            serde_json::from_str(&message_frame("x", &[0xff, b'a'], Some("e:1-0"))).unwrap();
        assert_eq!(v["data"], "\u{fffd}a");
        assert_eq!(v["offset"], "e:1-0");
    }

    #[test]
    fn offsets_and_since() {
        let o = Offset::parse("k3f9:1700000000000-0").unwrap();
        assert_eq!(o.epoch, "k3f9");
        assert_eq!(o.id, (1_700_000_000_000, 0));
        assert_eq!(o.stream_id(), "1700000000000-0");
        for bad in [
            "", "k3f9", ":1-0", "k3f9:1", "k3f9:-1", "k3f9:1-", "k 3:1-0", "k:1-0-0", "k:a-0",
        ] {
            assert!(Offset::parse(bad).is_none(), "{bad}");
        }
        let pairs = parse_since_param("alerts@k3f9:1-0, user:a@b@e:2-3 ,,x@bad,@e:1-0,noat");
        assert_eq!(
            pairs[0],
            Ok(("alerts".into(), Offset::parse("k3f9:1-0").unwrap()))
        );
        assert_eq!(
            pairs[1],
            Ok(("user:a@b".into(), Offset::parse("e:2-3").unwrap()))
        );
        assert_eq!(pairs[2], Err("x@bad".into()));
        assert_eq!(pairs[3], Err("@e:1-0".into()));
        assert_eq!(pairs[4], Err("noat".into()));
        assert_eq!(pairs.len(), 5);
    }

    #[test]
    fn message_identity_reads_back_the_frame() {
        let f = message_frame("chat:a", br#"{"x":",\"offset\":\"e:9-9\""}"#, Some("e:1-2"));
        assert_eq!(message_identity(&f), Some(("chat:a", "e:1-2")));
        let f = message_frame("chat:a", br#"{"offset":"e:9-9"}"#, None);
        assert_eq!(message_identity(&f), None);
        let f = message_frame("chat:a", br#"",\"offset\":\"e:9-9""#, None);
        assert_eq!(message_identity(&f), None);
        assert_eq!(message_identity(&error_frame("x", "y", None, None)), None);
    }

    #[test]
    fn frame_channel_reads_back_messages_and_errors() {
        let f = message_frame("chat:a", br#"{"channel":"x"}"#, Some("e:1-2"));
        assert_eq!(frame_channel(&f), Some("chat:a"));
        assert_eq!(frame_channel(&message_frame("b", b"1", None)), Some("b"));
        let gone = error_frame("history_gone", r#"","channel":"x"#, Some("c"), None);
        assert_eq!(frame_channel(&gone), Some("c"));
        assert_eq!(
            frame_channel(&error_frame("bad_json", "no", None, None)),
            None
        );
        assert_eq!(frame_channel(&ack_frame("subscribed", "c", None)), None);
    }

    #[test]
    fn error_frame_is_json() {
        let id = salvage_id(r#"{"id":"abc","type":5}"#);
        let v: serde_json::Value =
            serde_json::from_str(&error_frame("bad", "quote \" here", Some("c"), id)).unwrap();
        assert_eq!(v["id"], "abc");
        assert_eq!(v["message"], "quote \" here");
    }
}
