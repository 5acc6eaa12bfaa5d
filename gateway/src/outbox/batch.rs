//! Writing what many outboxes owe their sockets at once: the end of a fan-out (`hub::corked`).
//!
//! With io_uring available (and the `io_uring` config key on), the sockets of a batch are
//! written with one kernel entry per [`CHUNK`] sockets ([`sendbatch::Ring`], one ring per
//! thread that fans out), instead of one `writev` each: the kernel's per-call path is most of
//! a fan-out's CPU. Without it (a kernel or container sandbox that refuses io_uring), each
//! socket gets its own vectored write, as before.
//!
//! A fan-out to thousands of sockets (a big channel) is split in two, the second half written
//! by a writer thread of the process at the same time, and returns when both are done.
//!
//! Either way the outbox's rules hold: bytes go to a socket only under its outbox's lock, from
//! the head of what is owed; what a socket does not take stays owed, and its session is woken
//! to finish it. An outbox whose lock is busy (its session is writing, or another fan-out is
//! pushing) is not waited for: its session is woken and writes what is owed itself.

use std::cell::RefCell;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard, TryLockError};

use tokio::net::TcpStream;

use super::{Outbox, State, Wrote};

/// Sockets per kernel entry. 64 sends (about 0.3 ms of kernel work) bound how long a batch
/// holds their outboxes' locks; larger chunks measured no cheaper per send.
const CHUNK: usize = 64;

/// The `io_uring` config key: whether fan-outs may try io_uring at all. Set once at start.
static ENABLED: AtomicBool = AtomicBool::new(true);

enum Slot {
    Untried,
    Ready(Box<sendbatch::Ring>),
    /// The kernel refused (or the config turned it off): vectored writes, one per socket.
    Refused,
}

thread_local! {
    /// This thread's ring, made the first time the thread ends a fan-out.
    static RING: RefCell<Slot> = const { RefCell::new(Slot::Untried) };
}

/// Turn batched writes on or off for the whole process (the `io_uring` config key), and say
/// which write path fan-outs will use: `Ok` with io_uring, `Err` with why not.
pub fn configure(enabled: bool) -> Result<(), String> {
    ENABLED.store(enabled, Ordering::Relaxed);
    if !enabled {
        return Err("turned off by the io_uring config key".into());
    }
    sendbatch::Ring::new(CHUNK as u32)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Write what each of `outboxes` owes its socket. Never waits on a socket or a busy lock.
pub fn write_all(outboxes: &[Arc<Outbox>]) {
    write_split(outboxes, SPLIT_AT);
}

/// Fan-outs to at least this many sockets are split in two: the second half is written by
/// the process's writer thread while the fanning-out thread writes the first, so the last
/// socket of a large channel is written about twice as soon where a core is free.
const SPLIT_AT: usize = 2048;

/// A half fan-out for the writer thread, and where to say it is written.
type Half = (Vec<Arc<Outbox>>, std::sync::mpsc::SyncSender<()>);

/// [`write_all`], splitting batches of `split_at` sockets or more. Returns when every socket
/// of the batch has been written (or left to its session), whichever thread wrote it: the
/// caller's latency figures and the next batch come after.
fn write_split(outboxes: &[Arc<Outbox>], split_at: usize) {
    if outboxes.is_empty() {
        return;
    }
    if outboxes.len() >= split_at {
        if let Some(writer) = writer() {
            let (mine, theirs) = outboxes.split_at(outboxes.len() / 2);
            let (done, written) = std::sync::mpsc::sync_channel(1);
            // Busy with another node's (or thread's) half: write it all here instead.
            if writer.try_send((theirs.to_vec(), done)).is_ok() {
                write_here(mine);
                // The writer never drops a job unanswered unless it died; then its half is
                // written here.
                if written.recv().is_err() {
                    write_here(theirs);
                }
                return;
            }
        }
    }
    write_here(outboxes);
}

/// The process's writer thread, started at the first large fan-out; None if it cannot be.
fn writer() -> Option<&'static std::sync::mpsc::SyncSender<Half>> {
    static WRITER: std::sync::OnceLock<Option<std::sync::mpsc::SyncSender<Half>>> =
        std::sync::OnceLock::new();
    WRITER
        .get_or_init(|| {
            let (jobs, next) = std::sync::mpsc::sync_channel::<Half>(1);
            std::thread::Builder::new()
                .name("gateway-writer".into())
                .spawn(move || {
                    while let Ok((half, done)) = next.recv() {
                        write_here(&half);
                        let _ = done.send(());
                    }
                })
                .ok()?;
            Some(jobs)
        })
        .as_ref()
}

fn write_here(outboxes: &[Arc<Outbox>]) {
    RING.with_borrow_mut(|slot| {
        if matches!(slot, Slot::Untried) {
            *slot = match ENABLED.load(Ordering::Relaxed) {
                true => sendbatch::Ring::new(CHUNK as u32)
                    .map_or(Slot::Refused, |r| Slot::Ready(Box::new(r))),
                false => Slot::Refused,
            };
        }
        match slot {
            Slot::Ready(ring) => {
                for chunk in outboxes.chunks(CHUNK) {
                    write_chunk(ring, chunk);
                }
            }
            _ => write_each(outboxes),
        }
    });
}

/// Without a ring: one vectored write per socket.
fn write_each(outboxes: &[Arc<Outbox>]) {
    for outbox in outboxes {
        if outbox.write_wire().ok() != Some(Wrote::All) {
            // Full or failing: its session writes the rest, or finds out why not.
            outbox.wake_writer();
        }
    }
}

/// One kernel entry for up to [`CHUNK`] sockets, each under its outbox's lock.
fn write_chunk(ring: &mut sendbatch::Ring, chunk: &[Arc<Outbox>]) {
    let mut held: Vec<(&Outbox, &TcpStream, MutexGuard<'_, State>)> =
        Vec::with_capacity(chunk.len());
    for outbox in chunk {
        let Some(socket) = outbox.socket.as_ref() else {
            continue;
        };
        let state = match outbox.state.try_lock() {
            Ok(state) => state,
            // See `Outbox::lock`: the state is consistent after a panic.
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => {
                outbox.wake_writer();
                continue;
            }
        };
        if !state.wire.is_empty() {
            held.push((outbox, socket, state));
        }
    }
    let mut results = Vec::new();
    {
        let mut slices = Vec::with_capacity(held.len());
        let mut ends = Vec::with_capacity(held.len());
        for (_, _, state) in &held {
            state.owed_slices(&mut slices);
            ends.push(slices.len());
        }
        let mut start = 0;
        let jobs: Vec<sendbatch::Job<'_>> = held
            .iter()
            .zip(&ends)
            .map(|((_, socket, _), &end)| {
                let job = (socket.as_fd(), &slices[start..end]);
                start = end;
                job
            })
            .collect();
        ring.send_all(&jobs, &mut results);
    }
    for ((outbox, _, mut state), result) in held.into_iter().zip(results) {
        let finished = match result {
            Ok(n) => {
                state.advance(n);
                state.wire.is_empty()
            }
            // Full (`WouldBlock`) or failing: the session's own write waits for the socket or
            // meets the error.
            Err(_) => false,
        };
        drop(state);
        if !finished {
            outbox.wake_writer();
        }
    }
}

#[cfg(test)]
pub mod testing {
    use super::*;

    /// Whether this thread's fan-outs write through io_uring.
    pub fn uses_ring() -> bool {
        RING.with_borrow(|slot| matches!(slot, Slot::Ready(_)))
    }

    /// `write_all` with batches split from `split_at` sockets on.
    pub fn write_all_split(outboxes: &[Arc<Outbox>], split_at: usize) {
        write_split(outboxes, split_at);
    }

    /// `write_all` on one path: through a ring (`Some`), or one write per socket.
    pub fn write_all_with(ring: Option<&mut sendbatch::Ring>, outboxes: &[Arc<Outbox>]) {
        match ring {
            Some(ring) => outboxes.chunks(CHUNK).for_each(|c| write_chunk(ring, c)),
            None => write_each(outboxes),
        }
    }
}
