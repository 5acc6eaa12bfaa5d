//! Reading channel histories (docs/REFERENCE.md §5): one Lua script that reads, in one
//! atomic step, a channel's epoch, the id of its newest entry, whether entries were ever
//! trimmed, and the entries after a position, within a byte budget. [`judge`] turns what it
//! read into a replay or a `history_gone`, and into the position the reader stands at
//! afterwards.
//!
//! Used for a session's `since` (through `Bus::history`) and by the node itself: the baseline
//! of a newly subscribed channel (no entries, just where the stream ends) and the catch-up of
//! a resubscribed one. Many channels are read in one pipeline (one round trip).

use std::time::Duration;

use deadpool_redis::redis;
use tokio::time::timeout;

use super::commands::{Commands, ScriptCall};
use crate::bus::BusError;
use crate::protocol::{self, Offset};

/// Where a reader (the node, for one channel) stands in a channel's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// Not known (its baseline was never confirmed): what was missed cannot be told.
    Unknown,
    /// The channel had no history when looked at: every entry that exists later is new.
    Empty,
    /// The newest entry already delivered (or already in the stream at subscription).
    /// Boxed: every channel a node wants keeps two positions, most of them without history
    /// (a session's personal channel), so `Unknown`/`Empty` should cost two words, not six.
    At(Box<Offset>),
}

impl Position {
    pub fn at(offset: Offset) -> Position {
        Position::At(Box::new(offset))
    }

    /// Move to `offset` if it is newer: same epoch and a later id, or another epoch (a stream
    /// that restarted; any catch-up from either is `history_gone`, never a duplicate).
    /// Whether `offset` is at or before this position in the same epoch: delivered already.
    pub fn covers(&self, offset: &Offset) -> bool {
        matches!(self, Position::At(at) if at.epoch == offset.epoch && offset.id <= at.id)
    }

    pub fn advance(&mut self, offset: Offset) {
        match self {
            Position::At(at) if at.epoch == offset.epoch && at.id >= offset.id => {}
            _ => *self = Position::at(offset),
        }
    }

    /// Take `baseline` (read after the subscription was in place) unless what was delivered
    /// live since is already further: live deliveries are facts, a baseline is a reading.
    pub fn settle(&mut self, baseline: Position) {
        match (&*self, baseline) {
            (Position::At(at), Position::At(b)) if at.epoch == b.epoch && b.id > at.id => {
                *self = Position::At(b)
            }
            (Position::At(_), _) => {}
            (_, baseline) => *self = baseline,
        }
    }
}

/// Reads one channel. KEYS: the stream, its epoch key. ARGV: the first id to return (`-` for
/// the oldest kept), how many entries (0 = none, just the position), a byte budget for their
/// payloads. Returns `{epoch or '', newest id or '', max deleted id, {id, payload, …}, over}`
/// where `over` = 1 when the budget stopped the entries short.
const READ_SCRIPT: &str = r#"
local epoch = redis.call('GET', KEYS[2])
if not epoch then return {'', '', '0-0', {}, 0} end
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local tail = ''
if #newest > 0 then tail = newest[1][1] end
local deleted = '0-0'
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'max-deleted-entry-id' then deleted = info[i + 1] end
  end
end
local out, over = {}, 0
local count = tonumber(ARGV[2])
if count > 0 then
  local budget, used = tonumber(ARGV[3]), 0
  for _, entry in ipairs(redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', count)) do
    local payload, fields = '', entry[2]
    for i = 1, #fields, 2 do
      if fields[i] == 'd' then payload = fields[i + 1] end
    end
    used = used + #payload
    if used > budget then over = 1; break end
    out[#out + 1] = entry[1]
    out[#out + 1] = payload
  end
end
return {epoch, tail, deleted, out, over}
"#;

/// Whether Redis is still loading its data (restarted with persistence): it then accepts
/// pub/sub connections, SUBSCRIBE and PING, but refuses history reads with -LOADING, which a
/// catch-up must not take for lost history. Asked by loading the read script (the reads need it
/// anyway); any other failure is left to the reads themselves.
pub async fn loading(commands: &Commands, op_timeout: Duration) -> bool {
    matches!(
        timeout(op_timeout, commands.load_script(READ_SCRIPT)).await,
        Ok(Some(Err(e)))
            if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
    )
}

/// One channel to read: from where, at most how many entries, within how many payload bytes.
#[derive(Debug, Clone)]
pub struct ReadRequest {
    pub channel: String,
    pub from: Position,
    /// Entries to replay at most (more = gone); 0 = only the position (a baseline).
    pub limit: usize,
    pub budget: usize,
}

/// What a read of one channel means for its reader.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Everything after the position, oldest first: `(offset, payload)`.
    Replay(Vec<(String, Vec<u8>)>),
    /// What was missed cannot be replayed whole: why, for the `history_gone` error frame.
    Gone(String),
}

/// The result of a read: what to deliver, and the position after delivering it.
#[derive(Debug, PartialEq, Eq)]
pub struct Read {
    pub outcome: Outcome,
    pub position: Position,
}

/// What the script returned for one channel.
#[derive(Debug, Default)]
struct Snapshot {
    epoch: Option<String>,
    newest: Option<(u64, u64)>,
    /// Entries were removed (trimmed or deleted) at some point.
    trimmed: bool,
    entries: Vec<((u64, u64), Vec<u8>)>,
    over_budget: bool,
}

/// Read several channels: one pipeline on a single Redis, concurrent calls on a cluster (each
/// routed to its channel's shard). The outer error is Redis not answering (unreachable,
/// timeout); an inner one is a channel whose history cannot be read (e.g. its key holds another
/// type, or the node may not run scripts), which its reader treats as gone.
pub async fn read(
    commands: &Commands,
    prefix: &str,
    op_timeout: Duration,
    requests: &[ReadRequest],
) -> Result<Vec<Result<Read, String>>, BusError> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let calls: Vec<ScriptCall> = requests
        .iter()
        .map(|request| {
            let stream = protocol::history_key(prefix, &request.channel);
            let (start, count) = match &request.from {
                Position::At(offset) if request.limit > 0 => {
                    (offset.stream_id(), request.limit.saturating_add(2))
                }
                Position::Empty if request.limit > 0 => ("-".to_owned(), request.limit + 1),
                _ => ("-".to_owned(), 0),
            };
            ScriptCall {
                keys: vec![stream.clone(), format!("{stream}:epoch")],
                args: vec![start, count.to_string(), request.budget.to_string()],
            }
        })
        .collect();
    let replies = match timeout(op_timeout, commands.eval_all(READ_SCRIPT, &calls)).await {
        Ok(replies) => replies?,
        Err(_) => return Err(BusError::Timeout),
    };
    Ok(requests
        .iter()
        .zip(replies)
        .map(|(request, reply)| {
            reply.and_then(|reply| {
                parse(reply)
                    .map(|snapshot| judge(&request.from, snapshot, request.limit))
                    .ok_or_else(|| "unexpected reply from the history script".to_owned())
            })
        })
        .collect())
}

fn bulk(value: &redis::Value) -> Option<&str> {
    match value {
        redis::Value::BulkString(b) => std::str::from_utf8(b).ok(),
        redis::Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn parse(reply: redis::Value) -> Option<Snapshot> {
    let redis::Value::Array(mut items) = reply else {
        return None;
    };
    if items.len() != 5 {
        return None;
    }
    let over = items.pop()?;
    let entries = items.pop()?;
    let [epoch, newest, deleted] = <[redis::Value; 3]>::try_from(items).ok()?;
    let epoch = bulk(&epoch)?;
    let newest = bulk(&newest)?;
    let deleted = bulk(&deleted)?;
    let redis::Value::Array(flat) = entries else {
        return None;
    };
    let mut parsed = Vec::with_capacity(flat.len() / 2);
    let mut flat = flat.into_iter();
    while let (Some(id), Some(payload)) = (flat.next(), flat.next()) {
        let id = protocol::parse_stream_id(bulk(&id)?)?;
        let redis::Value::BulkString(payload) = payload else {
            return None;
        };
        parsed.push((id, payload));
    }
    Some(Snapshot {
        epoch: (!epoch.is_empty()).then(|| epoch.to_owned()),
        newest: protocol::parse_stream_id(newest),
        trimmed: protocol::parse_stream_id(deleted).is_some_and(|d| d != (0, 0)),
        entries: parsed,
        over_budget: matches!(over, redis::Value::Int(1)),
    })
}

/// Decide what a read from `from` means. Recoverable only when nothing between `from` and the
/// stream's end is missing: the same epoch and the `from` entry still there (trimming and
/// expiry remove the oldest entries first), or, from an empty history, a stream that was never
/// trimmed; and no more than `limit` entries within the budget.
fn judge(from: &Position, snapshot: Snapshot, limit: usize) -> Read {
    let Snapshot {
        epoch,
        newest,
        trimmed,
        entries,
        over_budget,
    } = snapshot;
    let end = match (&epoch, newest) {
        (Some(epoch), Some(id)) => Position::at(Offset {
            epoch: epoch.clone(),
            id,
        }),
        _ => Position::Empty,
    };
    let gone = |why: &str| Read {
        outcome: Outcome::Gone(why.to_owned()),
        position: end.clone(),
    };
    let Some(epoch) = epoch else {
        return match from {
            // Nothing with history was ever published, or it all expired unseen.
            Position::Empty | Position::Unknown => Read {
                outcome: Outcome::Replay(Vec::new()),
                position: Position::Empty,
            },
            Position::At(_) => gone("the channel's history was lost (its stream no longer exists)"),
        };
    };
    if limit == 0 {
        // A baseline: where the stream ends, nothing to replay.
        return Read {
            outcome: Outcome::Replay(Vec::new()),
            position: end,
        };
    }
    let mut entries = entries.into_iter().peekable();
    match from {
        Position::Unknown => return gone("the node lost its place in the channel's history"),
        Position::Empty if trimmed => {
            return gone("the channel's history was trimmed before it could be replayed")
        }
        Position::Empty => {}
        Position::At(since) if since.epoch != epoch => {
            return gone("the channel's history was lost or restarted (epoch changed)")
        }
        Position::At(since) => match entries.next() {
            Some((id, _)) if id == since.id => {}
            _ => return gone("the offset is no longer in the channel's history"),
        },
    }
    let entries: Vec<_> = entries.collect();
    if entries.len() > limit {
        return gone("more messages were missed than are replayed (history.max_replay)");
    }
    if over_budget {
        return gone(
            "the missed messages are larger than the session's queue (limits.send_queue_bytes)",
        );
    }
    let position = match entries.last() {
        Some((id, _)) => Position::at(Offset {
            epoch: epoch.clone(),
            id: *id,
        }),
        None => from.clone(),
    };
    Read {
        outcome: Outcome::Replay(
            entries
                .into_iter()
                .map(|((ms, seq), payload)| (format!("{epoch}:{ms}-{seq}"), payload))
                .collect(),
        ),
        position,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(epoch: &str, ms: u64) -> Position {
        Position::at(Offset {
            epoch: epoch.into(),
            id: (ms, 0),
        })
    }

    fn snapshot(epoch: Option<&str>, ids: &[u64], trimmed: bool) -> Snapshot {
        Snapshot {
            epoch: epoch.map(str::to_owned),
            newest: ids.last().map(|&ms| (ms, 0)),
            trimmed,
            entries: ids.iter().map(|&ms| ((ms, 0), vec![b'x'])).collect(),
            over_budget: false,
        }
    }

    fn replayed(read: &Read) -> Vec<String> {
        match &read.outcome {
            Outcome::Replay(entries) => entries.iter().map(|(o, _)| o.clone()).collect(),
            Outcome::Gone(why) => panic!("gone: {why}"),
        }
    }

    #[test]
    fn a_position_moves_forward_only() {
        let mut p = Position::Unknown;
        p.advance(Offset::parse("e:5-0").unwrap());
        p.advance(Offset::parse("e:3-0").unwrap());
        assert_eq!(p, at("e", 5));
        // A baseline behind what was delivered live does not move it back.
        p.settle(at("e", 4));
        assert_eq!(p, at("e", 5));
        p.settle(at("e", 9));
        assert_eq!(p, at("e", 9));
        p.settle(Position::Empty);
        assert_eq!(p, at("e", 9));
        let mut q = Position::Unknown;
        q.settle(Position::Empty);
        assert_eq!(q, Position::Empty);
    }

    #[test]
    fn replays_after_a_position_still_in_the_stream() {
        let read = judge(&at("e", 2), snapshot(Some("e"), &[2, 3, 4], false), 10);
        assert_eq!(replayed(&read), ["e:3-0", "e:4-0"]);
        assert_eq!(read.position, at("e", 4));
        // Nothing new: the position stays.
        let read = judge(&at("e", 4), snapshot(Some("e"), &[4], false), 10);
        assert!(replayed(&read).is_empty());
        assert_eq!(read.position, at("e", 4));
    }

    #[test]
    fn gone_when_trimmed_restarted_or_too_long() {
        let gone = |read: Read| matches!(read.outcome, Outcome::Gone(_));
        assert!(gone(judge(
            &at("e", 1),
            snapshot(Some("e"), &[2, 3], true),
            10
        )));
        assert!(gone(judge(
            &at("e", 1),
            snapshot(Some("f"), &[1, 2], false),
            10
        )));
        assert!(gone(judge(&at("e", 1), snapshot(None, &[], false), 10)));
        assert!(gone(judge(
            &at("e", 1),
            snapshot(Some("e"), &[1, 2, 3, 4], false),
            2
        )));
        let read = judge(&Position::Unknown, snapshot(Some("e"), &[7], false), 10);
        assert!(matches!(read.outcome, Outcome::Gone(_)));
        // After `history_gone` the reader stands at the stream's end.
        assert_eq!(read.position, at("e", 7));
        let mut over = snapshot(Some("e"), &[1, 2], false);
        over.over_budget = true;
        assert!(gone(judge(&at("e", 1), over, 10)));
    }

    #[test]
    fn from_an_empty_history_everything_is_new_unless_trimmed() {
        let read = judge(&Position::Empty, snapshot(Some("e"), &[1, 2], false), 10);
        assert_eq!(replayed(&read), ["e:1-0", "e:2-0"]);
        let read = judge(&Position::Empty, snapshot(Some("e"), &[5, 6], true), 10);
        assert!(matches!(read.outcome, Outcome::Gone(_)));
        // Still no history, even for an unknown position: nothing with history was missed.
        let read = judge(&Position::Unknown, snapshot(None, &[], false), 10);
        assert!(replayed(&read).is_empty());
        assert_eq!(read.position, Position::Empty);
    }

    #[test]
    fn a_baseline_is_where_the_stream_ends() {
        let read = judge(&Position::Unknown, snapshot(Some("e"), &[3, 9], false), 0);
        assert!(replayed(&read).is_empty());
        assert_eq!(read.position, at("e", 9));
        let read = judge(&Position::Unknown, snapshot(None, &[], false), 0);
        assert_eq!(read.position, Position::Empty);
    }
}
