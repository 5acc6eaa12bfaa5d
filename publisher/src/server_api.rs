//! The server API's Redis side (docs/REFERENCE.md §8): presence reads, history reads, the
//! channels the gateways are subscribed to, and the control messages (disconnect,
//! unsubscribe) that reach every gateway node. `api.rs` serves these over HTTP and `cli.rs`
//! from a shell; neither talks to Redis for them but through here.
//!
//! What is shared with the gateway comes from it, so the two programs cannot disagree: the
//! presence keys and read script (`gateway::bus::redis::presence`), the history keys
//! (`gateway::protocol::history_key`), the control channel and message format
//! (`gateway::control`).

use deadpool_redis::redis;
use gateway::bus::redis::presence;
use gateway::control::{Control, ControlMessage};
use gateway::protocol::{self, ClientInfo, Offset};
use serde::Serialize;

use crate::channel::Channel;
use crate::pool::{RedisError, RedisPool};

/// Most history entries one request returns.
pub const MAX_HISTORY_LIMIT: usize = 1000;

/// Why a history read could not answer.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The offset cannot be resumed from: the stream was lost or trimmed past it.
    #[error("{0}")]
    Gone(String),
    #[error(transparent)]
    Redis(#[from] RedisError),
}

/// `GET /history/{channel}`'s answer.
#[derive(Debug, Serialize)]
pub struct HistoryPage {
    pub messages: Vec<HistoryEntry>,
    /// The stream's epoch; None when the channel has no history.
    pub epoch: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct HistoryEntry {
    pub offset: String,
    /// The payload as JSON when it is JSON, else as a string (as clients receive it).
    pub data: serde_json::Value,
}

/// Reads a page of history. KEYS: stream, epoch key. ARGV: first id (`-`, or `(<id>` for
/// after an id), count. Returns `{epoch or '', max deleted id, {id, payload, …}}`.
const HISTORY_SCRIPT: &str = r#"
local epoch = redis.call('GET', KEYS[2])
if not epoch then return {'', '0-0', {}} end
local deleted = '0-0'
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'max-deleted-entry-id' then deleted = info[i + 1] end
  end
end
local out = {}
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', tonumber(ARGV[2]))) do
  local payload, fields = '', entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'd' then payload = fields[i + 1] end
  end
  out[#out + 1] = entry[1]
  out[#out + 1] = payload
end
return {epoch, deleted, out}
"#;

/// Who is in `channel`, on every gateway node (expired entries of dead nodes are pruned).
pub async fn presence(redis: &RedisPool, channel: &Channel) -> Result<Vec<ClientInfo>, RedisError> {
    let [zset, data] = presence::keys(redis.prefix(), channel.as_str());
    let mut conn = redis.get().await?;
    let value: redis::Value = redis::cmd("EVAL")
        .arg(presence::READ_SCRIPT)
        .arg(2)
        .arg(zset)
        .arg(data)
        .query_async(&mut conn)
        .await?;
    presence::parse_read(value)
        .map(|(_, clients)| clients)
        .map_err(|e| {
            RedisError::Command(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "presence",
                e,
            )))
        })
}

/// `(num_clients, num_users)`: sessions, and distinct client ids among them.
pub fn stats(clients: &[ClientInfo]) -> (usize, usize) {
    let mut users: Vec<&str> = clients.iter().map(|c| c.client_id.as_str()).collect();
    users.sort_unstable();
    users.dedup();
    (clients.len(), users.len())
}

/// `channel`'s history after `since` (exclusive; None = from the oldest kept), at most
/// `limit` entries, oldest first.
pub async fn history(
    redis: &RedisPool,
    channel: &Channel,
    since: Option<&Offset>,
    limit: usize,
) -> Result<HistoryPage, HistoryError> {
    let stream = protocol::history_key(redis.prefix(), channel.as_str());
    let epoch_key = format!("{stream}:epoch");
    let from = since.map_or_else(|| "-".to_owned(), |o| format!("({}", o.stream_id()));
    let mut conn = redis.get().await?;
    let (epoch, deleted, entries): (String, String, Vec<Vec<u8>>) = redis::cmd("EVAL")
        .arg(HISTORY_SCRIPT)
        .arg(2)
        .arg(&stream)
        .arg(&epoch_key)
        .arg(from)
        .arg(limit)
        .query_async(&mut conn)
        .await
        .map_err(RedisError::from)?;
    if let Some(since) = since {
        if epoch.is_empty() {
            return Err(HistoryError::Gone(format!("{channel} has no history")));
        }
        if epoch != since.epoch {
            return Err(HistoryError::Gone(format!(
                "the history of {channel} was lost and started again (epoch {epoch})"
            )));
        }
        if protocol::parse_stream_id(&deleted).is_some_and(|d| d > since.id) {
            return Err(HistoryError::Gone(format!(
                "the history of {channel} was trimmed past that offset"
            )));
        }
    }
    let messages = entries
        .chunks_exact(2)
        .map(|pair| HistoryEntry {
            offset: format!("{epoch}:{}", String::from_utf8_lossy(&pair[0])),
            data: match serde_json::from_slice(&pair[1]) {
                Ok(value) => value,
                Err(_) => serde_json::Value::String(String::from_utf8_lossy(&pair[1]).into()),
            },
        })
        .collect();
    Ok(HistoryPage {
        messages,
        epoch: (!epoch.is_empty()).then_some(epoch),
    })
}

/// The channels at least one gateway node is subscribed to: `PUBSUB CHANNELS <prefix>*` on a
/// single Redis, `PUBSUB SHARDCHANNELS <prefix>*` on every node of a cluster; the prefix
/// stripped, the control channel left out, sorted.
pub async fn channels(redis: &RedisPool) -> Result<Vec<String>, RedisError> {
    let prefix = redis.prefix();
    let pattern = format!("{}*", escape_glob(prefix));
    let mut conn = redis.get().await?;
    let names: Vec<String> = redis::cmd("PUBSUB")
        .arg(if redis.is_cluster() {
            "SHARDCHANNELS"
        } else {
            "CHANNELS"
        })
        .arg(pattern)
        .query_async(&mut conn)
        .await?;
    let mut channels: Vec<String> = names
        .into_iter()
        .filter_map(|name| name.strip_prefix(prefix).map(str::to_owned))
        .filter(|name| name != protocol::CONTROL_CHANNEL)
        .collect();
    channels.sort_unstable();
    channels.dedup();
    Ok(channels)
}

/// A Redis glob that matches `literal` exactly.
fn escape_glob(literal: &str) -> String {
    let mut out = String::with_capacity(literal.len());
    for c in literal.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Publish `message` to every gateway node on the control channel.
pub async fn control(redis: &RedisPool, message: ControlMessage) -> Result<(), RedisError> {
    let payload = Control::to_all(message).encode();
    let mut conn = redis.get().await?;
    redis::cmd(if redis.is_cluster() {
        "SPUBLISH"
    } else {
        "PUBLISH"
    })
    .arg(redis.key(protocol::CONTROL_CHANNEL))
    .arg(payload)
    .query_async::<i64>(&mut conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_count_sessions_and_distinct_users() {
        let info = |c: &str, s: &str| ClientInfo {
            client_id: c.into(),
            session: s.into(),
            node: "gw-1".into(),
        };
        let clients = [info("a", "1"), info("a", "2"), info("b", "3")];
        assert_eq!(stats(&clients), (3, 2));
        assert_eq!(stats(&[]), (0, 0));
    }

    #[test]
    fn globs_are_escaped() {
        assert_eq!(escape_glob("app:"), "app:");
        assert_eq!(escape_glob("a*b?[c]"), "a\\*b\\?\\[c\\]");
    }
}
