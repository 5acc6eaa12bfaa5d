//! Many non-blocking socket sends in one kernel entry, over io_uring.
//!
//! A gateway's fan-out writes one small frame to each of thousands of sockets. Done as one
//! `write`/`sendmsg` per socket, most of a node's CPU is the kernel's per-call path; handed to
//! the kernel as one batch of `IORING_OP_SENDMSG` entries (one `io_uring_enter` per batch),
//! the same sends cost about a fifth less on the machines we measured (BENCHMARKS.md).
//!
//! The API is synchronous and borrows: [`Ring::send_all`] takes the sockets and the bytes for
//! the duration of the call and returns only when the kernel has completed every send it was
//! given. Every send is non-blocking (`MSG_DONTWAIT`): a socket that cannot take everything
//! reports how much it took (possibly a `WouldBlock` error), and the caller queues the rest.
//! [`Ring::new`] proves on the running kernel that a send which would block completes at once
//! with `EAGAIN` rather than waiting, and refuses to build a ring otherwise, so a call never
//! waits on a slow peer.
//!
//! This crate is the workspace's one exception to `unsafe_code = "forbid"`: io_uring reads
//! the `msghdr`s and buffers through raw pointers. Soundness rests on one rule, kept in
//! `send_all`: nothing lent to the kernel is released before the kernel has posted the
//! completion of the entry that names it.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{opcode, types, IoUring, Probe};

/// Flags of every send: never block, never raise SIGPIPE on a peer that went away.
const FLAGS: u32 = (libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) as u32;

/// One socket's share of a batch: the socket and the slices to send to it, in order.
pub type Job<'a> = (BorrowedFd<'a>, &'a [IoSlice<'a>]);

/// A submission/completion ring for batched sends. Not shared between threads: keep one per
/// thread that fans out.
pub struct Ring {
    ring: IoUring,
    /// Entries per `io_uring_enter`: a batch longer than this goes in several.
    entries: usize,
}

impl Ring {
    /// A ring taking up to `entries` sends per kernel entry (rounded up to a power of two by
    /// the kernel). Fails when the kernel or its sandbox refuses io_uring (seccomp profiles of
    /// container runtimes commonly do), lacks `IORING_OP_SENDMSG`, or would make a send wait.
    pub fn new(entries: u32) -> io::Result<Ring> {
        let ring = IoUring::new(entries)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        if !probe.is_supported(opcode::SendMsg::CODE) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the kernel's io_uring has no SENDMSG",
            ));
        }
        let entries = ring.params().sq_entries() as usize;
        let mut ring = Ring { ring, entries };
        ring.check_never_waits()?;
        Ok(ring)
    }

    /// Send to a socket that cannot take a byte: the completion must be posted during the
    /// submission itself, with `EAGAIN`. A kernel that parks the send until the socket drains
    /// instead would make `send_all` wait on a slow client, so such a ring is refused (and the
    /// parked send cancelled before its buffer is released).
    fn check_never_waits(&mut self) -> io::Result<()> {
        let (full, _peer) = std::os::unix::net::UnixStream::pair()?;
        full.set_nonblocking(true)?;
        let chunk = [0u8; 4096];
        loop {
            match io::Write::write(&mut &full, &chunk) {
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        let byte = [0u8; 1];
        let slices = [IoSlice::new(&byte)];
        let msg = msghdr(&slices);
        let entry = opcode::SendMsg::new(types::Fd(full.as_raw_fd()), &msg)
            .flags(FLAGS)
            .build()
            .user_data(0);
        // SAFETY: `msg` and the slice it points to live until the end of this function, and
        // this function does not return before the entry's completion is posted (below: it
        // is either posted during the submission or cancelled and awaited).
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("a new ring has no room"))?;
        self.ring.submit()?;
        let result = self.ring.completion().next().map(|cqe| cqe.result());
        match result {
            Some(r) if r == -libc::EAGAIN => Ok(()),
            Some(r) => Err(io::Error::other(format!(
                "a send to a full socket completed with {r}, not EAGAIN"
            ))),
            None => {
                // Parked: cancel it and wait for both completions before `msg` goes away.
                let cancel = opcode::AsyncCancel::new(0).build().user_data(1);
                // SAFETY: the cancel entry names no memory.
                unsafe { self.ring.submission().push(&cancel) }
                    .map_err(|_| io::Error::other("no room to cancel"))?;
                let mut seen = 0;
                while seen < 2 {
                    self.ring.submit_and_wait(2 - seen)?;
                    seen += self.ring.completion().count();
                }
                Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the kernel's io_uring waits on a full socket",
                ))
            }
        }
    }

    /// Send each job's slices to its socket, without blocking, and put in `results` (same
    /// order as `jobs`) how many bytes each socket took, or its error (`WouldBlock` when it
    /// took nothing). Sends to different sockets are independent; each is one `sendmsg`.
    pub fn send_all(&mut self, jobs: &[Job<'_>], results: &mut Vec<io::Result<usize>>) {
        results.clear();
        results.reserve(jobs.len());
        let mut msgs: Vec<libc::msghdr> = Vec::with_capacity(self.entries.min(jobs.len()));
        for chunk in jobs.chunks(self.entries) {
            let base = results.len();
            results.extend(chunk.iter().map(|_| Ok(0)));
            msgs.clear();
            msgs.extend(chunk.iter().map(|(_, slices)| msghdr(slices)));
            {
                let mut sq = self.ring.submission();
                for (i, ((fd, _), msg)) in chunk.iter().zip(&msgs).enumerate() {
                    let entry = opcode::SendMsg::new(types::Fd(fd.as_raw_fd()), msg)
                        .flags(FLAGS)
                        .build()
                        .user_data(i as u64);
                    // SAFETY: the entry names `msg` (in `msgs`, not resized until this chunk's
                    // completions are all reaped below), the slices it points to and the
                    // socket (borrowed from the caller for this whole call); the loop below
                    // does not end before every entry of the chunk has completed.
                    if unsafe { sq.push(&entry) }.is_err() {
                        // Cannot happen: the queue is empty here and a chunk fits it.
                        results[base + i] = Err(io::Error::other("submission queue full"));
                    }
                }
            }
            let submitted = self.ring.submission().len();
            let mut done = 0;
            let mut failures = 0;
            while done < submitted {
                if let Err(e) = self.ring.submit_and_wait(submitted - done) {
                    if !matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) {
                        failures += 1;
                    }
                    if failures > 1000 {
                        // The kernel may still hold pointers into `msgs` and the caller's
                        // buffers; returning would free them under it. Never seen; fail hard.
                        eprintln!("sendbatch: io_uring_enter keeps failing: {e}");
                        std::process::abort();
                    }
                }
                for cqe in self.ring.completion() {
                    let i = cqe.user_data() as usize;
                    let r = cqe.result();
                    results[base + i] = if r >= 0 {
                        Ok(r as usize)
                    } else {
                        Err(io::Error::from_raw_os_error(-r))
                    };
                    done += 1;
                }
            }
        }
    }
}

/// A `msghdr` for a connected socket: no address, no control data, just the slices.
fn msghdr(slices: &[IoSlice<'_>]) -> libc::msghdr {
    // SAFETY: `msghdr` is plain data (pointers and integers, padding on some targets) for
    // which all-zero is a valid value: no name, no iovecs, no control data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSlice` is ABI-compatible with `iovec` on Unix (std's documented guarantee).
    msg.msg_iov = slices.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = slices.len() as _;
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn sends_each_job_in_order_and_reports_what_each_socket_took() {
        let mut ring = Ring::new(4).expect("io_uring on the test machine");
        let pairs: Vec<(UnixStream, UnixStream)> =
            (0..10).map(|_| UnixStream::pair().unwrap()).collect();
        let texts: Vec<Vec<u8>> = (0..10)
            .map(|i| format!("frame {i};").into_bytes())
            .collect();
        let slices: Vec<[IoSlice<'_>; 2]> = texts
            .iter()
            .map(|t| [IoSlice::new(t), IoSlice::new(b"tail")])
            .collect();
        let jobs: Vec<Job<'_>> = pairs
            .iter()
            .zip(&slices)
            .map(|((a, _), s)| (a.as_fd(), &s[..]))
            .collect();
        let mut results = Vec::new();
        ring.send_all(&jobs, &mut results);
        assert_eq!(results.len(), 10);
        for (i, ((_, b), r)) in pairs.iter().zip(&results).enumerate() {
            let want = format!("frame {i};tail");
            assert_eq!(*r.as_ref().unwrap(), want.len());
            let mut got = vec![0u8; want.len()];
            (&*b).read_exact(&mut got).unwrap();
            assert_eq!(got, want.as_bytes());
        }
    }

    #[test]
    fn a_full_socket_answers_would_block_at_once_and_the_others_still_get_theirs() {
        let mut ring = Ring::new(8).unwrap();
        let (full, _full_peer) = UnixStream::pair().unwrap();
        full.set_nonblocking(true).unwrap();
        while io::Write::write(&mut &full, &[0u8; 4096]).is_ok() {}
        let (ok, ok_peer) = UnixStream::pair().unwrap();
        let slices = [IoSlice::new(b"x")];
        let jobs: Vec<Job<'_>> = vec![(full.as_fd(), &slices), (ok.as_fd(), &slices)];
        let mut results = Vec::new();
        ring.send_all(&jobs, &mut results);
        assert_eq!(
            results[0].as_ref().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert_eq!(*results[1].as_ref().unwrap(), 1);
        let mut byte = [0u8; 1];
        (&ok_peer).read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
    }

    #[test]
    fn a_closed_peer_is_an_error_not_a_signal() {
        let mut ring = Ring::new(2).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let slices = [IoSlice::new(b"x")];
        let mut results = Vec::new();
        ring.send_all(&[(a.as_fd(), &slices)], &mut results);
        assert_eq!(
            results[0].as_ref().unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
    }
}
