//! Publishing: the one place where a message becomes Redis traffic.
//!
//! Ticks, alerts, the HTTP API, the CLI and `tail` all publish through [`Publisher`], so how a
//! message is stored and delivered is decided here alone.
//!
//! Every message goes through one Lua script ([`SCRIPT`]), atomically (docs/REFERENCE.md §5):
//!
//! 1. get-or-create the channel's epoch, `<prefix>history:{<channel>}:epoch` (a random
//!    8-character id; it changes whenever the stream is lost, e.g. with a Redis restart
//!    without persistence, so old offsets are detected rather than silently skipped);
//! 2. `XADD <prefix>history:{<channel>} MAXLEN ~ <history.max_len> * d <payload>`;
//! 3. `PEXPIRE` both keys by `history.ttl_ms`;
//! 4. `PUBLISH <prefix><channel>` an envelope: a NUL byte, the offset `<epoch>:<stream id>`,
//!    `\n`, then the payload bytes verbatim. The gateways tell it from a plain `PUBLISH`
//!    by the leading NUL (payloads starting with NUL are reserved).
//!
//! The script returns the offset. Both keys carry the channel as their hash tag, so they live
//! in one Redis Cluster slot. A batch is one pipeline of `EVAL`s (one round trip, order kept;
//! Redis caches the compiled script, so only its ~500 bytes of text travel again).

use bytes::Bytes;
use deadpool_redis::redis;
use serde::Serialize;

use crate::channel::Channel;
use crate::config::HistoryConfig;
use crate::metrics::Metrics;
use crate::pool::{RedisError, RedisPool};

/// One message: a channel and the exact payload bytes its subscribers receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub channel: Channel,
    pub payload: Bytes,
}

/// Publishes messages and counts them. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    redis: RedisPool,
    metrics: Metrics,
    history: HistoryConfig,
}

/// The append-and-publish script. KEYS: stream, epoch. ARGV: epoch candidate, max_len, ttl_ms,
/// payload, pub/sub channel. Returns the offset.
const SCRIPT: &str = r#"
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch)
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'd', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local offset = epoch .. ':' .. id
redis.call('PUBLISH', ARGV[5], '\0' .. offset .. '\n' .. ARGV[4])
return offset
"#;

/// The stream key of `channel` (without the prefix): the gateway's definition, since it reads
/// what this writes.
pub use gateway::protocol::history_key;

/// A fresh epoch: 8 characters of RFC 4648 base32 (lowercase) from a random UUID.
fn new_epoch() -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let bits = uuid::Uuid::new_v4().as_u128();
    (0..8)
        .map(|i| ALPHABET[((bits >> (i * 5)) & 31) as usize] as char)
        .collect()
}

// === impl Message ===

impl Message {
    pub fn new(channel: Channel, payload: impl Into<Bytes>) -> Self {
        Self {
            channel,
            payload: payload.into(),
        }
    }

    /// A message whose payload is `value` serialized as compact JSON.
    pub fn json(channel: Channel, value: &impl Serialize) -> Self {
        let payload = serde_json::to_vec(value).expect("serializing plain data cannot fail");
        Self::new(channel, payload)
    }

    /// A message from free text (`publisher publish CHANNEL DATA`): the text itself when it is
    /// valid JSON, otherwise the text as a JSON string, so subscribers always receive JSON.
    pub fn from_text(channel: Channel, text: &str) -> Self {
        if serde_json::from_str::<&serde_json::value::RawValue>(text).is_ok() {
            Self::new(channel, text.to_owned())
        } else {
            Self::json(channel, &text)
        }
    }
}

// === impl Publisher ===

impl Publisher {
    pub fn new(redis: RedisPool, metrics: Metrics, history: HistoryConfig) -> Self {
        Self {
            redis,
            metrics,
            history,
        }
    }

    pub fn redis(&self) -> &RedisPool {
        &self.redis
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Publishes one message; returns its offset.
    pub async fn publish(&self, message: &Message) -> Result<String, RedisError> {
        let mut offsets = self.publish_all(std::slice::from_ref(message)).await?;
        Ok(offsets.pop().unwrap_or_default())
    }

    /// Publishes `messages` in order, in one round trip; returns their offsets. On error
    /// none, some or all of them may have been published (a pipeline is not a transaction);
    /// every message of the batch counts in `publisher_publish_errors_total`.
    pub async fn publish_all(&self, messages: &[Message]) -> Result<Vec<String>, RedisError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let result = self.send(messages).await;
        match &result {
            Ok(_) => {
                for message in messages {
                    self.metrics.published(&message.channel, 1);
                }
            }
            Err(_) => self
                .metrics
                .publish_errors_total
                .inc_by(messages.len() as u64),
        }
        result
    }

    async fn send(&self, messages: &[Message]) -> Result<Vec<String>, RedisError> {
        let mut pipe = redis::pipe();
        for message in messages {
            let channel = message.channel.as_str();
            let stream = history_key(self.redis.prefix(), channel);
            let epoch = format!("{stream}:epoch");
            pipe.cmd("EVAL")
                .arg(SCRIPT)
                .arg(2)
                .arg(stream)
                .arg(epoch)
                .arg(new_epoch())
                .arg(self.history.max_len)
                .arg(self.history.ttl_ms)
                .arg(message.payload.as_ref())
                .arg(self.redis.key(channel));
        }
        let mut conn = self.redis.get().await?;
        let offsets = pipe.query_async::<Vec<String>>(&mut conn).await?;
        Ok(offsets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chan() -> Channel {
        Channel::parse("c").unwrap()
    }

    #[test]
    fn epochs_are_short_random_base32() {
        let (a, b) = (new_epoch(), new_epoch());
        assert_eq!(a.len(), 8);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_lowercase() || (b'2'..=b'7').contains(&c)));
        assert_ne!(a, b);
        assert_eq!(history_key("", "chat:lobby"), "history:{chat:lobby}");
        // The hash tag is the Redis channel, prefix included (its SPUBLISH slot).
        assert_eq!(history_key("app:", "news"), "app:history:{app:news}");
    }

    #[test]
    fn text_is_published_verbatim_when_json_else_as_a_string() {
        let cases = [
            (r#"{"a": 1}"#, r#"{"a": 1}"#),
            ("42", "42"),
            (r#""quoted""#, r#""quoted""#),
            ("hello world", r#""hello world""#),
            (r#"say "hi""#, r#""say \"hi\"""#),
            ("", r#""""#),
            ("{broken", r#""{broken""#),
        ];
        for (text, payload) in cases {
            assert_eq!(Message::from_text(chan(), text).payload, payload, "{text}");
        }
    }
}
