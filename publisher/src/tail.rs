//! `publisher tail FILE --channel logs`: follows a growing file and publishes each new complete
//! line, in order, as `{"line":"<text>","file":"<file name>"}`.
//!
//! - **Start**: at the end of the file (only lines written from now on), or at its start with
//!   `--from-start`.
//! - **Lines**: split on `\n`; a trailing `\r` is dropped; bytes that are not UTF-8 become U+FFFD;
//!   a line longer than `tail.max_line_bytes` is published in pieces of at most that size; a last
//!   line without its `\n` waits until it is completed (or the file is rotated).
//! - **Bursts**: the file is polled every `tail.poll_interval_ms`; whatever appeared since is
//!   published in pipelines of up to `tail.batch_lines` messages, one round trip each.
//! - **Rotation**: a file that shrinks below the read position was truncated (copytruncate):
//!   reading restarts at 0. A path that names a different file (same device and inode no more:
//!   rename and recreate) is reopened after the rest of the old file has been read, and the new
//!   file is read from its start. The old file stays open for `tail.rotate_grace_ms` and what
//!   is still written to it is published too (an application that reopens its log only on a
//!   postrotate signal writes there meanwhile). While the path is missing, the old file is kept.
//!   Known limit of polling: a truncated file that grows past the old position before the next
//!   poll is not recognised as truncated.
//! - **Redis trouble**: Redis must answer at start (else the command fails at once); later a
//!   failed batch is retried with capped backoff and nothing more is read meanwhile, so the file
//!   itself is the buffer. A batch retried after an unclear failure may be delivered twice.
//!
//! The file is read with blocking I/O on tokio's blocking pool.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::channel::Channel;
use crate::pool::RedisError;
use crate::publish::{Message, Publisher};

/// The most bytes read from the file in one go, so a huge backlog is handled in slices.
const READ_CHUNK: usize = 256 * 1024;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What to follow and how.
#[derive(Debug, Clone)]
pub struct TailOptions {
    pub path: PathBuf,
    pub channel: Channel,
    pub from_start: bool,
    pub poll_interval: Duration,
    pub max_line_bytes: usize,
    pub batch_lines: usize,
    /// How long a renamed-away file is still read.
    pub rotate_grace: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Redis(#[from] RedisError),
}

/// The message published for each line.
#[derive(Serialize)]
struct LineMessage<'a> {
    line: &'a str,
    file: &'a str,
}

/// Follows `options.path` until `shutdown`; fails only when Redis is unreachable at start or
/// the file cannot be read.
pub async fn run(
    publisher: Publisher,
    options: TailOptions,
    shutdown: CancellationToken,
) -> Result<(), TailError> {
    publisher.redis().ping().await?;
    let io_error = |source| TailError::Io {
        path: options.path.clone(),
        source,
    };
    let file_name = options.path.file_name().map_or_else(
        || options.path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );

    let (path, from_start, max_line, grace) = (
        options.path.clone(),
        options.from_start,
        options.max_line_bytes,
        options.rotate_grace,
    );
    let mut follower =
        tokio::task::spawn_blocking(move || Follower::open(&path, from_start, max_line, grace))
            .await
            .expect("the file reader does not panic")
            .map_err(io_error)?;
    info!(
        file = %options.path.display(),
        offset = follower.offset,
        channel = %options.channel,
        "tailing"
    );

    let sender = Sender {
        publisher,
        channel: options.channel.clone(),
        file_name,
        batch_lines: options.batch_lines,
    };
    loop {
        // Everything that is there now, a slice at a time.
        loop {
            let read;
            (follower, read) = blocking(follower, |f| f.read_some(READ_CHUNK))
                .await
                .map_err(io_error)?;
            if !sender.send_pending(&mut follower, &shutdown).await {
                return Ok(());
            }
            if read == 0 {
                break;
            }
        }
        let rotated;
        (follower, rotated) = blocking(follower, Follower::check_rotation)
            .await
            .map_err(io_error)?;
        if let Some(rotation) = rotated {
            info!(file = %options.path.display(), ?rotation, "file rotated");
            if !sender.send_pending(&mut follower, &shutdown).await {
                return Ok(());
            }
            continue;
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(options.poll_interval) => {}
        }
    }
}

/// Runs `f` on the blocking pool, handing the follower over and back.
async fn blocking<T: Send + 'static>(
    mut follower: Follower,
    f: impl FnOnce(&mut Follower) -> io::Result<T> + Send + 'static,
) -> io::Result<(Follower, T)> {
    tokio::task::spawn_blocking(move || {
        let result = f(&mut follower);
        result.map(|value| (follower, value))
    })
    .await
    .expect("the file reader does not panic")
}

struct Sender {
    publisher: Publisher,
    channel: Channel,
    file_name: String,
    batch_lines: usize,
}

impl Sender {
    /// Publishes every complete line the follower holds, retrying until it succeeds; false
    /// when `shutdown` came first.
    async fn send_pending(&self, follower: &mut Follower, shutdown: &CancellationToken) -> bool {
        while !follower.lines.is_empty() {
            let n = follower.lines.len().min(self.batch_lines);
            let batch: Vec<Message> = follower
                .lines
                .iter()
                .take(n)
                .map(|line| {
                    let message = LineMessage {
                        line,
                        file: &self.file_name,
                    };
                    Message::json(self.channel.clone(), &message)
                })
                .collect();
            let mut backoff = Duration::from_millis(100);
            loop {
                match self.publisher.publish_all(&batch).await {
                    Ok(_) => break,
                    Err(e) => {
                        warn!(error = %e, lines = n, ?backoff, "publishing lines failed; retrying");
                        tokio::select! {
                            () = shutdown.cancelled() => return false,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            follower.lines.drain(..n);
        }
        !shutdown.is_cancelled()
    }
}

/// Why reading went back to the start of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rotation {
    Truncated,
    Replaced,
}

/// The blocking part: one open file, the read position, and lines not yet published.
struct Follower {
    path: PathBuf,
    file: File,
    /// (device, inode) of `file`: a different pair at `path` means the file was replaced.
    identity: (u64, u64),
    offset: u64,
    /// The start of a line whose `\n` has not been written yet.
    partial: Vec<u8>,
    max_line: usize,
    lines: VecDeque<String>,
    /// The file renamed away at the last rotation, still read until its grace ends.
    old: Option<OldFile>,
    grace: Duration,
}

/// A rotated-away file: its handle, its unfinished line, and until when it is read.
struct OldFile {
    file: File,
    partial: Vec<u8>,
    until: Instant,
}

impl Follower {
    fn open(path: &Path, from_start: bool, max_line: usize, grace: Duration) -> io::Result<Self> {
        let mut file = File::open(path)?;
        let meta = file.metadata()?;
        let offset = if from_start { 0 } else { meta.len() };
        file.seek(SeekFrom::Start(offset))?;
        Ok(Self {
            path: path.to_owned(),
            file,
            identity: identity(&meta),
            offset,
            partial: Vec::new(),
            max_line: max_line.max(4),
            lines: VecDeque::new(),
            old: None,
            grace,
        })
    }

    /// Reads up to `limit` new bytes into lines (the rotated-away file's first, while it is
    /// still read); returns how many bytes it read.
    fn read_some(&mut self, limit: usize) -> io::Result<usize> {
        let from_old = self.read_old(limit)?;
        Ok(from_old + self.read_current(limit - from_old.min(limit))?)
    }

    /// What was written to the rotated-away file since; it is closed (its unfinished line
    /// published) once its grace is over.
    fn read_old(&mut self, limit: usize) -> io::Result<usize> {
        let Some(mut old) = self.old.take() else {
            return Ok(0);
        };
        std::mem::swap(&mut self.file, &mut old.file);
        std::mem::swap(&mut self.partial, &mut old.partial);
        let offset = self.offset;
        let expired = Instant::now() >= old.until;
        // Past its grace it is read to its end (its last words), then closed.
        let mut total = 0;
        let read = loop {
            match self.read_current(limit) {
                Ok(n) if n > 0 && expired => total += n,
                Ok(n) => break Ok(total + n),
                Err(e) => break Err(e),
            }
        };
        if expired && read.is_ok() {
            self.flush_partial();
        }
        self.offset = offset;
        std::mem::swap(&mut self.file, &mut old.file);
        std::mem::swap(&mut self.partial, &mut old.partial);
        if !(expired && read.is_ok()) {
            self.old = Some(old);
        }
        read
    }

    fn read_current(&mut self, limit: usize) -> io::Result<usize> {
        let mut buf = vec![0; limit.min(64 * 1024)];
        let mut total = 0;
        while total < limit {
            let want = buf.len().min(limit - total);
            let n = match self.file.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.offset += n as u64;
            total += n;
            self.split(&buf[..n]);
        }
        Ok(total)
    }

    fn split(&mut self, mut data: &[u8]) {
        loop {
            let end = data.iter().position(|&b| b == b'\n');
            let segment = &data[..end.unwrap_or(data.len())];
            self.partial.extend_from_slice(segment);
            self.cut_long_line();
            match end {
                Some(end) => {
                    self.finish_line();
                    data = &data[end + 1..];
                }
                None => break,
            }
        }
    }

    /// Publishes an over-long line in pieces, each cut at a character boundary when there is
    /// one within the last three bytes before the limit.
    fn cut_long_line(&mut self) {
        while self.partial.len() > self.max_line {
            let mut cut = self.max_line;
            while cut > self.max_line - 3 && is_continuation(self.partial[cut]) {
                cut -= 1;
            }
            let rest = self.partial.split_off(cut);
            self.finish_line();
            self.partial = rest;
        }
    }

    fn finish_line(&mut self) {
        if self.partial.last() == Some(&b'\r') {
            self.partial.pop();
        }
        self.lines
            .push_back(String::from_utf8_lossy(&self.partial).into_owned());
        self.partial.clear();
    }

    /// An unfinished last line of a file that is being left behind still counts as a line.
    fn flush_partial(&mut self) {
        if !self.partial.is_empty() {
            self.finish_line();
        }
    }

    /// Notices truncation and replacement; see the module doc.
    fn check_rotation(&mut self) -> io::Result<Option<Rotation>> {
        let meta = match fs::metadata(&self.path) {
            Ok(meta) => meta,
            // Between a rename and the new file's creation: keep reading the old one.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if identity(&meta) != self.identity {
            // Whatever the writer added to the old file before switching comes first.
            while self.read_current(READ_CHUNK)? > 0 {}
            let file = match File::open(&self.path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            self.identity = identity(&file.metadata()?);
            let old = std::mem::replace(&mut self.file, file);
            // A file rotated away before this one's grace ended: it is done.
            if let Some(older) = self.old.take() {
                let partial = std::mem::replace(&mut self.partial, older.partial);
                self.flush_partial();
                self.partial = partial;
            }
            // Its unfinished last line may still be completed during the grace.
            self.old = Some(OldFile {
                file: old,
                partial: std::mem::take(&mut self.partial),
                until: Instant::now() + self.grace,
            });
            self.offset = 0;
            return Ok(Some(Rotation::Replaced));
        }
        if meta.len() < self.offset {
            self.flush_partial();
            self.file.seek(SeekFrom::Start(0))?;
            self.offset = 0;
            return Ok(Some(Rotation::Truncated));
        }
        Ok(None)
    }
}

fn is_continuation(byte: u8) -> bool {
    byte & 0b1100_0000 == 0b1000_0000
}

#[cfg(unix)]
fn identity(meta: &fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

/// Without inodes, replacement cannot be told from growth; truncation still can.
#[cfg(not(unix))]
fn identity(_meta: &fs::Metadata) -> (u64, u64) {
    (0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "publisher-tail-{name}-{}-{}",
                std::process::id(),
                uuid::Uuid::new_v4()
            ));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn append(path: &Path, text: &str) {
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        file.write_all(text.as_bytes()).unwrap();
    }

    fn drain(f: &mut Follower) -> Vec<String> {
        while f.read_some(READ_CHUNK).unwrap() > 0 {}
        f.lines.drain(..).collect()
    }

    #[test]
    fn starts_at_the_end_and_keeps_partial_lines() {
        let dir = TempDir::new("end");
        let path = dir.0.join("app.log");
        append(&path, "old 1\nold 2\n");
        let mut f = Follower::open(&path, false, 1024, Duration::ZERO).unwrap();
        assert!(drain(&mut f).is_empty());
        append(&path, "new 1\r\nnew ");
        assert_eq!(drain(&mut f), ["new 1"]);
        append(&path, "2\n");
        assert_eq!(drain(&mut f), ["new 2"]);
        let mut f = Follower::open(&path, true, 1024, Duration::ZERO).unwrap();
        assert_eq!(drain(&mut f), ["old 1", "old 2", "new 1", "new 2"]);
    }

    #[test]
    fn long_lines_are_cut_at_character_boundaries() {
        let dir = TempDir::new("long");
        let path = dir.0.join("app.log");
        append(&path, "");
        let mut f = Follower::open(&path, true, 8, Duration::ZERO).unwrap();
        append(&path, "abcdefghij\naaaaaaaé\n12345678\n");
        assert_eq!(
            drain(&mut f),
            ["abcdefgh", "ij", "aaaaaaa", "é", "12345678"]
        );
    }

    #[test]
    fn follows_truncation_and_replacement() {
        let dir = TempDir::new("rotate");
        let path = dir.0.join("app.log");
        append(&path, "one\ntwo\n");
        let mut f = Follower::open(&path, true, 1024, Duration::ZERO).unwrap();
        assert_eq!(drain(&mut f), ["one", "two"]);
        assert_eq!(f.check_rotation().unwrap(), None);

        fs::File::create(&path).unwrap(); // truncate
        assert_eq!(f.check_rotation().unwrap(), Some(Rotation::Truncated));
        append(&path, "three\n");
        assert_eq!(drain(&mut f), ["three"]);

        append(&path, "four\nfive");
        fs::rename(&path, dir.0.join("app.log.1")).unwrap();
        assert_eq!(
            f.check_rotation().unwrap(),
            None,
            "path missing: keep the old file"
        );
        append(&path, "six\n");
        assert_eq!(f.check_rotation().unwrap(), Some(Rotation::Replaced));
        assert_eq!(drain(&mut f), ["four", "five", "six"]);
    }

    #[test]
    fn lines_written_to_the_old_file_after_a_rename_are_published_during_the_grace() {
        let dir = TempDir::new("grace");
        let path = dir.0.join("app.log");
        let rotated = dir.0.join("app.log.1");
        append(&path, "one\n");
        let mut f = Follower::open(&path, true, 1024, Duration::from_millis(300)).unwrap();
        assert_eq!(drain(&mut f), ["one"]);
        // logrotate `create`: rename, new empty file; the application still has the old one
        // open and writes there until its postrotate signal.
        append(&path, "two\nthr");
        fs::rename(&path, &rotated).unwrap();
        append(&path, "");
        assert_eq!(f.check_rotation().unwrap(), Some(Rotation::Replaced));
        append(&rotated, "ee\nlate\n");
        append(&path, "new\n");
        assert_eq!(drain(&mut f), ["two", "three", "late", "new"]);
        append(&rotated, "unfinished");
        std::thread::sleep(Duration::from_millis(350));
        append(&path, "newer\n");
        // Past the grace: the old file's last words, then it is closed.
        assert_eq!(drain(&mut f), ["unfinished", "newer"]);
        append(&rotated, "too late\n");
        assert!(drain(&mut f).is_empty());
    }
}
