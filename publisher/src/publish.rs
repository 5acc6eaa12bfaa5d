//! Publishing: the one place where a message becomes Redis traffic.
//!
//! Ticks, alerts, the HTTP API, the CLI and `tail` all publish through [`Publisher`], so how a
//! message is stored and delivered is decided here alone.
//!
//! Every message goes through one Lua script ([`SCRIPT`]), atomically (docs/REFERENCE.md §5):
//!
//! 1. get-or-create the channel's epoch, `<prefix>history:{<prefix><channel>}:epoch` (a random
//!    8-character id; it changes whenever the stream is lost, e.g. with a Redis restart
//!    without persistence, so old offsets are detected rather than silently skipped);
//! 2. `XADD <prefix>history:{<prefix><channel>} MAXLEN ~ <history.max_len> * d <payload>`;
//! 3. `PEXPIRE` both keys by `history.ttl_ms`;
//! 4. `PUBLISH <prefix><channel>` an envelope: a NUL byte, the offset `<epoch>:<stream id>`,
//!    `\n`, then the payload bytes verbatim. The gateways tell it from a plain `PUBLISH`
//!    by the leading NUL (payloads starting with NUL are reserved). On a Redis Cluster the
//!    script says `SPUBLISH` instead ([`SHARDED_SCRIPT`]): the channel is a shard channel,
//!    delivered by the shard that owns its slot only.
//!
//! The script returns the offset. Both keys carry the Redis channel as their hash tag, and a
//! channel name cannot contain `{` or `}`, so the keys and the shard channel share one slot and
//! the script runs on that slot's primary.
//!
//! **Round trips.** A batch is one pipeline per hash slot (one in standalone mode), order kept
//! within it; on a cluster the pipelines of different slots run concurrently, since a
//! pipeline cannot span slots. The script is sent as `EVALSHA`; the first message of a
//! pipeline is sent as `EVAL` instead, which puts the script into that node's cache for the
//! `EVALSHA`s after it on the same connection. A single message is sent as `EVALSHA` alone and,
//! when that node does not know the script yet (`NOSCRIPT`: a fresh node, a promoted replica,
//! `SCRIPT FLUSH`), once more as `EVAL` — a `NOSCRIPT` means nothing ran, so nothing is sent
//! twice. (redis-rs's `Script::invoke_async` would answer `NOSCRIPT` with `SCRIPT LOAD`, which a
//! cluster connection sends to every node and which therefore fails while any node is down.)

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use deadpool_redis::redis::{self, cluster_routing::Slot, ErrorKind, ServerErrorKind};
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
    /// [`SCRIPT`] or [`SHARDED_SCRIPT`], by mode.
    script: &'static str,
    /// Its SHA1, for `EVALSHA`.
    sha: Arc<str>,
}

/// The append-and-publish script, publishing with `$publish`. KEYS: stream, epoch. ARGV: epoch
/// candidate, max_len, ttl_ms, payload, pub/sub channel. Returns the offset.
macro_rules! append_and_publish {
    ($publish:literal) => {
        concat!(
            r#"
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch)
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'd', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local offset = epoch .. ':' .. id
redis.call('"#,
            $publish,
            r#"', ARGV[5], '\0' .. offset .. '\n' .. ARGV[4])
return offset
"#
        )
    };
}

/// The script of standalone mode: classic pub/sub.
pub const SCRIPT: &str = append_and_publish!("PUBLISH");

/// The script of cluster mode: sharded pub/sub.
pub const SHARDED_SCRIPT: &str = append_and_publish!("SPUBLISH");

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
        let script = if redis.is_cluster() {
            SHARDED_SCRIPT
        } else {
            SCRIPT
        };
        let sha = redis::Script::new(script).get_hash().into();
        Self {
            redis,
            metrics,
            history,
            script,
            sha,
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

    /// Publishes `messages` in order, in one round trip per hash slot; returns their offsets.
    /// On error none, some or all of them may have been published (a pipeline is not a
    /// transaction; on a cluster the slots that did not fail went out). Each message counts in
    /// `publisher_published_total` or in `publisher_publish_errors_total`, by its slot's
    /// outcome.
    pub async fn publish_all(&self, messages: &[Message]) -> Result<Vec<String>, RedisError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let groups = self.by_slot(messages);
        let results = futures_util::future::join_all(groups.iter().map(|group| async move {
            let group: Vec<&Message> = group.iter().map(|&i| &messages[i]).collect();
            self.send(&group).await
        }))
        .await;

        let mut offsets = vec![String::new(); messages.len()];
        let mut first_error = None;
        for (group, result) in groups.iter().zip(results) {
            match result {
                Ok(group_offsets) => {
                    for (&i, offset) in group.iter().zip(group_offsets) {
                        self.metrics.published(&messages[i].channel, 1);
                        offsets[i] = offset;
                    }
                }
                Err(e) => {
                    self.metrics.publish_errors_total.inc_by(group.len() as u64);
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            None => Ok(offsets),
            Some(e) => Err(e),
        }
    }

    /// The indices of `messages`, grouped into what may share a pipeline, each group in order:
    /// everything in standalone mode, one group per hash slot on a cluster.
    fn by_slot(&self, messages: &[Message]) -> Vec<Vec<usize>> {
        if !self.redis.is_cluster() {
            return vec![(0..messages.len()).collect()];
        }
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut group_of: HashMap<Slot, usize> = HashMap::new();
        for (i, message) in messages.iter().enumerate() {
            let slot = Slot::for_key(self.redis.key(message.channel.as_str()));
            let group = *group_of.entry(slot).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[group].push(i);
        }
        groups
    }

    /// Sends messages that may share a pipeline; returns their offsets in order.
    async fn send(&self, messages: &[&Message]) -> Result<Vec<String>, RedisError> {
        let mut conn = self.redis.get().await?;
        if let [message] = messages {
            let evalsha = self.script_command(Carry::Sha, message);
            return match evalsha.query_async::<String>(&mut conn).await {
                Ok(offset) => Ok(vec![offset]),
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    // Nothing ran: send it once more with the script's text.
                    let eval = self.script_command(Carry::Text, message);
                    Ok(vec![eval.query_async::<String>(&mut conn).await?])
                }
                Err(e) => Err(e.into()),
            };
        }
        let mut pipe = redis::pipe();
        for (i, message) in messages.iter().enumerate() {
            // The first one carries the script's text (see the module doc).
            let carry = if i == 0 { Carry::Text } else { Carry::Sha };
            pipe.add_command(self.script_command(carry, message));
        }
        Ok(pipe.query_async::<Vec<String>>(&mut conn).await?)
    }

    /// `EVAL <script>` or `EVALSHA <sha1>`, with the keys and arguments of `message`.
    fn script_command(&self, carry: Carry, message: &Message) -> redis::Cmd {
        let channel = message.channel.as_str();
        let stream = history_key(self.redis.prefix(), channel);
        let epoch = format!("{stream}:epoch");
        let (name, script) = match carry {
            Carry::Text => ("EVAL", self.script),
            Carry::Sha => ("EVALSHA", &*self.sha),
        };
        let mut command = redis::cmd(name);
        command
            .arg(script)
            .arg(2)
            .arg(stream)
            .arg(epoch)
            .arg(new_epoch())
            .arg(self.history.max_len)
            .arg(self.history.ttl_ms)
            .arg(message.payload.as_ref())
            .arg(self.redis.key(channel));
        command
    }
}

/// How a script command names its script.
#[derive(Clone, Copy)]
enum Carry {
    /// `EVAL`: the text (which also puts it into the node's script cache).
    Text,
    /// `EVALSHA`: the SHA1 only.
    Sha,
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
    fn the_sharded_script_differs_only_in_spublish() {
        assert!(SCRIPT.contains("redis.call('PUBLISH', ARGV[5]"));
        assert!(SHARDED_SCRIPT.contains("redis.call('SPUBLISH', ARGV[5]"));
        assert_eq!(SHARDED_SCRIPT.replacen("SPUBLISH", "PUBLISH", 1), SCRIPT);
        assert!(SCRIPT.contains(r"'\0' .. offset .. '\n' .. ARGV[4]"));
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
