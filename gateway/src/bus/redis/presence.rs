//! Presence in Redis (docs/REFERENCE.md §8): the key layout and the two scripts that write and
//! read it. The gateway writes (`crate::presence` batches joins, leaves and refreshes); the
//! publisher's server API reads with the same [`READ_SCRIPT`], so both programs share this one
//! definition.
//!
//! Per presence channel, two keys with the Redis channel as their hash tag (as history's), so
//! that on a Redis Cluster they live on the channel's own shard and one script touches both:
//!
//! - `<prefix>presence:{<prefix><channel>}`: a ZSET, member = session id, score = when the
//!   entry expires (Redis server time, ms). Redis 7.0 has no per-field expiry, hence the score.
//! - `<prefix>presence:{<prefix><channel>}:data`: a HASH, session id → the entry's JSON
//!   `{"client_id","session","node"}`.
//!
//! Both scripts take the time from Redis (`TIME`), so nodes' clocks never matter, and prune
//! the members whose time is up (their node stopped refreshing them: it died). Both keys get
//! `PEXPIRE ttl` on every write, so a channel nobody refreshes vanishes entirely.

use deadpool_redis::redis;

use super::commands::ScriptCall;
use super::RedisBus;
use crate::bus::BusError;
use crate::protocol::ClientInfo;

/// The ZSET and HASH keys of `channel`'s presence.
pub fn keys(prefix: &str, channel: &str) -> [String; 2] {
    let zset = format!("{prefix}presence:{{{prefix}{channel}}}");
    let data = format!("{zset}:data");
    [zset, data]
}

/// Prune expired members of KEYS[1]/KEYS[2] at `now`; returns how many. Shared by both
/// scripts.
macro_rules! prune {
    () => {
        r#"
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function prune(now)
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
  if #expired > 0 then
    for _, m in ipairs(expired) do redis.call('HDEL', KEYS[2], m) end
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  end
  return #expired
end
"#
    };
}

/// Write one channel's changes. KEYS: zset, data. ARGV: ttl_ms, n (entries to write), then n
/// pairs `session, json`, then sessions to remove. Returns `{expired, removed}`: members
/// pruned because their time was up, and members the removals found.
pub const WRITE_SCRIPT: &str = concat!(
    prune!(),
    r#"
local now = server_now()
local ttl = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local i = 3
for _ = 1, n do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
local removed = 0
while i <= #ARGV do
  removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
  i = i + 1
end
local expired = prune(now)
if redis.call('ZCARD', KEYS[1]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
else
  redis.call('DEL', KEYS[1], KEYS[2])
end
return {expired, removed}
"#
);

/// Read one channel's entries. KEYS: zset, data. Returns `{expired, json...}`: how many
/// members were pruned, then every live entry's JSON.
pub const READ_SCRIPT: &str = concat!(
    prune!(),
    r#"
local expired = prune(server_now())
local out = {expired}
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
-- In slices: unpack() has a limit of a few thousand values.
for i = 1, #members, 1000 do
  local data = redis.call('HMGET', KEYS[2], unpack(members, i, math.min(i + 999, #members)))
  for _, d in ipairs(data) do
    if d then table.insert(out, d) end
  end
end
return out
"#
);

/// What [`READ_SCRIPT`] answered: `(expired, entries)`. Entries that do not parse are skipped
/// (nothing but this module writes them).
pub fn parse_read(value: redis::Value) -> Result<(u64, Vec<ClientInfo>), String> {
    let redis::Value::Array(items) = value else {
        return Err(format!("unexpected presence reply {value:?}"));
    };
    let mut items = items.into_iter();
    let expired = match items.next() {
        Some(redis::Value::Int(n)) => n.max(0) as u64,
        other => return Err(format!("unexpected presence reply head {other:?}")),
    };
    let clients = items
        .filter_map(|item| match item {
            redis::Value::BulkString(bytes) => serde_json::from_slice(&bytes).ok(),
            _ => None,
        })
        .collect();
    Ok((expired, clients))
}

/// One channel's changes for [`RedisBus::presence_write`].
#[derive(Debug, Default)]
pub struct ChannelWrite {
    pub channel: String,
    /// `(session, entry JSON)` to write (or refresh).
    pub upserts: Vec<(String, String)>,
    /// Sessions to remove.
    pub removals: Vec<String>,
}

/// What a batch of writes did, summed over its channels.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Entries of dead nodes pruned.
    pub expired: u64,
    /// Entries the removals found.
    pub removed: u64,
}

// === impl RedisBus ===

impl RedisBus {
    /// Apply `writes` (one script call per channel, pipelined on a single Redis, routed to each
    /// channel's shard on a cluster) with `ttl_ms` as the entries' lifetime.
    pub async fn presence_write(
        &self,
        writes: Vec<ChannelWrite>,
        ttl_ms: u64,
    ) -> Result<WriteOutcome, BusError> {
        // At most CHUNK entries per call: a script blocks its Redis while it runs.
        const CHUNK: usize = 500;
        let ttl = ttl_ms.to_string();
        let mut calls: Vec<ScriptCall> = Vec::with_capacity(writes.len());
        for write in writes {
            let keys: Vec<String> = keys(&self.prefix, &write.channel).into();
            let mut upserts = write.upserts.into_iter().peekable();
            while upserts.peek().is_some() {
                let mut args = vec![ttl.clone(), String::new()];
                let mut n = 0;
                for (session, json) in upserts.by_ref().take(CHUNK) {
                    args.push(session);
                    args.push(json);
                    n += 1;
                }
                args[1] = n.to_string();
                calls.push(ScriptCall {
                    keys: keys.clone(),
                    args,
                });
            }
            let mut removals = write.removals.into_iter().peekable();
            while removals.peek().is_some() {
                let mut args = vec![ttl.clone(), "0".to_owned()];
                args.extend(removals.by_ref().take(CHUNK));
                calls.push(ScriptCall {
                    keys: keys.clone(),
                    args,
                });
            }
        }
        let replies =
            tokio::time::timeout(self.timeout, self.commands.eval_all(WRITE_SCRIPT, &calls))
                .await
                .map_err(|_| BusError::Timeout)??;
        let mut outcome = WriteOutcome::default();
        for reply in replies {
            match reply {
                Ok(redis::Value::Array(counts)) => {
                    let count = |i: usize| match counts.get(i) {
                        Some(redis::Value::Int(n)) => (*n).max(0) as u64,
                        _ => 0,
                    };
                    outcome.expired += count(0);
                    outcome.removed += count(1);
                }
                Ok(other) => {
                    return Err(BusError::Unavailable(format!(
                        "unexpected presence write reply {other:?}"
                    )))
                }
                Err(e) => return Err(BusError::Unavailable(e)),
            }
        }
        Ok(outcome)
    }

    /// Every live entry of `channel`, and how many expired ones the read pruned.
    pub async fn presence_read(&self, channel: &str) -> Result<(u64, Vec<ClientInfo>), BusError> {
        let call = ScriptCall {
            keys: keys(&self.prefix, channel).into(),
            args: Vec::new(),
        };
        let mut replies =
            tokio::time::timeout(self.timeout, self.commands.eval_all(READ_SCRIPT, &[call]))
                .await
                .map_err(|_| BusError::Timeout)??;
        match replies.pop() {
            Some(Ok(value)) => parse_read(value).map_err(BusError::Unavailable),
            Some(Err(e)) => Err(BusError::Unavailable(e)),
            None => Err(BusError::Unavailable("no presence reply".into())),
        }
    }

    /// Send a `join`/`leave` frame to `channel`'s subscribers on every node: on the channel
    /// itself, marked as an event (see `envelope`), so it keeps its order with the channel's
    /// messages and never touches history.
    pub async fn publish_event(&self, channel: &str, frame: &str) -> Result<(), BusError> {
        let mut payload = Vec::with_capacity(super::envelope::EVENT_HEAD.len() + frame.len());
        payload.extend_from_slice(super::envelope::EVENT_HEAD);
        payload.extend_from_slice(frame.as_bytes());
        self.publish(channel, &payload).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_keys_share_the_channels_hash_tag() {
        assert_eq!(
            keys("", "chat:lobby"),
            [
                "presence:{chat:lobby}".to_owned(),
                "presence:{chat:lobby}:data".to_owned()
            ]
        );
        assert_eq!(keys("app:", "x")[0], "app:presence:{app:x}");
    }

    #[test]
    fn read_replies_parse() {
        let entry = br#"{"client_id":"a","session":"s","node":"gw-1"}"#.to_vec();
        let value = redis::Value::Array(vec![
            redis::Value::Int(2),
            redis::Value::BulkString(entry),
            redis::Value::BulkString(b"garbage".to_vec()),
        ]);
        let (expired, clients) = parse_read(value).unwrap();
        assert_eq!(expired, 2);
        assert_eq!(clients.len(), 1);
        assert_eq!(clients[0].node, "gw-1");
    }
}
