//! The outbox's unit tests: the queue, its wake-ups, and the socket hot path.

use super::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

fn frame(s: &str) -> Frame {
    Frame::new(s.to_owned(), Instant::now())
}

#[test]
fn frames_are_websocket_text_frames() {
    let f = frame("hi");
    assert_eq!(&f.wire()[..], b"\x81\x02hi");
    assert_eq!(f.text(), "hi");
    let long = "x".repeat(300);
    let f = frame(&long);
    assert_eq!(&f.wire()[..4], &[0x81, 126, 1, 44]);
    assert_eq!(f.text(), long);
    let huge = "y".repeat(70_000);
    let f = frame(&huge);
    assert_eq!(&f.wire()[..2], &[0x81, 127]);
    assert_eq!(&f.wire()[2..10], &70_000u64.to_be_bytes());
    assert_eq!(f.text().len(), 70_000);
}

#[test]
fn overflow_drops_and_closes() {
    let q = Outbox::new(16);
    assert_eq!(q.push(frame("12345")), Push::Queued);
    assert_eq!(q.push(frame("12345")), Push::Queued);
    assert_eq!(q.push(frame("1")), Push::Overflowed { dropped: 3 });
    assert_eq!(q.push(frame("1")), Push::Closed);
    let mut batch = VecDeque::new();
    assert!(!q.take(&mut batch));
    assert!(batch.is_empty());
    assert!(q.overflowed());
}

#[test]
fn take_drains_and_frees_budget() {
    let q = Outbox::new(14);
    q.push(frame("12345"));
    q.push(frame("12345"));
    let mut batch = VecDeque::new();
    assert!(q.take(&mut batch));
    assert_eq!(batch.len(), 2);
    assert_eq!(q.push(frame("1234567890")), Push::Queued);
}

#[tokio::test]
async fn one_wakeup_per_batch() {
    let q = Outbox::new(1000);
    q.push(frame("a"));
    q.push(frame("b"));
    // The bit set by the first push completes this at once.
    tokio::time::timeout(Duration::from_secs(1), q.ready())
        .await
        .unwrap();
    let mut batch = VecDeque::new();
    q.take(&mut batch);
    assert_eq!(batch.len(), 2);
    // The second push (queue not empty) set nothing.
    assert!(tokio::time::timeout(Duration::from_millis(50), q.ready())
        .await
        .is_err());
    // A plain push does not interrupt writes; overflow and signals do.
    q.push(frame("c"));
    assert!(
        tokio::time::timeout(Duration::from_millis(50), q.interrupted())
            .await
            .is_err()
    );
    q.signal(signal::BEAT);
    tokio::time::timeout(Duration::from_secs(1), q.interrupted())
        .await
        .unwrap();
    assert_eq!(q.take_signals(), signal::BEAT);
    assert_eq!(q.take_signals(), 0);
}

#[tokio::test]
async fn wakes_a_waiting_task() {
    let q = std::sync::Arc::new(Outbox::new(1000));
    let waiter = tokio::spawn({
        let q = q.clone();
        async move { q.ready().await }
    });
    tokio::task::yield_now().await;
    q.push(frame("x"));
    tokio::time::timeout(Duration::from_secs(1), waiter)
        .await
        .unwrap()
        .unwrap();
}

/// A connected loopback pair: the outbox's socket and the client's end.
async fn pair() -> (TcpStream, TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap());
    let (client, accepted) = tokio::join!(client, listener.accept());
    (accepted.unwrap().0, client.unwrap())
}

/// A fan-out of one frame to `q`: pushed, then written as the end of a fan-out writes. True
/// when the socket took it whole (nothing left owed).
fn fan_out(q: &Arc<Outbox>, f: Frame) -> bool {
    assert!(matches!(q.push(f), Push::Owed { .. }));
    write_all(std::slice::from_ref(q));
    q.lock().wire.is_empty()
}

/// The hot path's shape: in the steady state a frame with nothing queued before it is owed
/// to the socket and written by the fan-out, whole, waking nobody; the bytes are the shared
/// frame.
#[tokio::test]
async fn steady_state_writes_directly_and_wakes_nobody() {
    let (socket, mut client) = pair().await;
    let q = Arc::new(Outbox::with_socket(1 << 20, Some(socket)));
    // Not in the steady state yet: queued, and the session is woken.
    assert_eq!(q.push(frame("first")), Push::Queued);
    tokio::time::timeout(Duration::from_secs(1), q.ready())
        .await
        .unwrap();
    let mut batch = VecDeque::new();
    q.take(&mut batch);
    for f in &batch {
        q.owe(f.wire().clone());
    }
    q.flush_wire().await.unwrap();
    q.set_direct(true);
    let shared = frame("second");
    for _ in 0..3 {
        assert_eq!(q.push(shared.clone()), Push::Owed { first: true });
        write_all(std::slice::from_ref(&q));
        assert!(q.lock().wire.is_empty(), "written whole");
    }
    assert!(tokio::time::timeout(Duration::from_millis(50), q.ready())
        .await
        .is_err());
    let mut expected = b"\x81\x05first".to_vec();
    for _ in 0..3 {
        expected.extend_from_slice(b"\x81\x06second");
    }
    let mut got = vec![0; expected.len()];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(got, expected);
    // The session takes over (a client frame to answer): frames queue again.
    q.set_direct(false);
    assert_eq!(q.push(frame("third")), Push::Queued);
}

/// A client that stops reading: once the socket is full, frames queue (with one wake-up),
/// what was owed is finished first, in order, and the byte bound still closes the session.
#[tokio::test]
async fn a_full_socket_queues_in_order_and_overflows() {
    let (socket, mut client) = pair().await;
    socket.writable().await.unwrap();
    let q = Arc::new(Outbox::with_socket(64 * 1024, Some(socket)));
    q.set_direct(true);
    let text = "z".repeat(1000);
    let mut written = 0usize;
    while fan_out(&q, frame(&text)) {
        written += 1;
        assert!(written < 100_000, "a socket that never fills");
    }
    assert!(written > 0);
    tokio::time::timeout(Duration::from_secs(1), q.ready())
        .await
        .unwrap();
    // Now the client reads everything; the session writes what it owes and the queue.
    let reader = tokio::spawn(async move {
        let mut all = Vec::new();
        let mut buf = vec![0; 1 << 16];
        loop {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return all,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    });
    q.set_direct(false);
    let mut batch = VecDeque::new();
    q.take(&mut batch);
    let queued = batch.len();
    for f in &batch {
        q.owe(f.wire().clone());
    }
    q.flush_wire().await.unwrap();
    // Every frame pushed arrives once, whole: the written ones, then the one that found
    // the socket full (queued, or partly written and owed).
    assert!(queued <= 1);
    let total = written + 1;
    drop(q);
    let all = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .unwrap()
        .unwrap();
    let one = frame(&text);
    assert_eq!(all.len(), total * one.len());
    assert!(all.chunks(one.len()).all(|c| c == &one.wire()[..]));

    // Overflow still bounds a session whose socket is full.
    let (socket, _client) = pair().await;
    let q = Outbox::with_socket(16 * 1024, Some(socket));
    q.set_direct(true);
    let mut result = Push::Queued;
    for _ in 0..100_000 {
        result = q.push(frame(&text));
        if matches!(result, Push::Overflowed { .. }) {
            break;
        }
    }
    assert!(matches!(result, Push::Overflowed { .. }));
    assert!(q.overflowed());
}

/// `n` WebSocket outboxes in their steady state (the fan-out may write their sockets), and
/// the clients' ends.
async fn steady_outboxes(n: usize) -> (Vec<TcpStream>, Vec<Arc<Outbox>>) {
    let mut clients = Vec::new();
    let mut outboxes = Vec::new();
    for _ in 0..n {
        let (socket, client) = pair().await;
        socket.writable().await.unwrap();
        let q = Arc::new(Outbox::with_socket(1 << 20, Some(socket)));
        q.set_direct(true);
        clients.push(client);
        outboxes.push(q);
    }
    (clients, outboxes)
}

/// The end of a fan-out, on both write paths (io_uring batches when this machine allows it,
/// one vectored write per socket otherwise): every socket that takes its bytes gets them
/// whole and in order and nobody is woken; a full socket keeps what it did not take owed and
/// its session is woken to finish it; an outbox whose lock is busy is not waited for (its
/// session is woken) and keeps its bytes.
#[tokio::test]
async fn write_all_writes_every_socket_and_leaves_the_rest_to_their_sessions() {
    let mut ring = sendbatch::Ring::new(64).ok();
    for batched in [true, false] {
        if batched && ring.is_none() {
            continue;
        }
        // More sockets than one kernel entry takes, so a batch spans chunks.
        let (mut clients, outboxes) = steady_outboxes(70).await;
        // Socket 1 is full: its client never read, and the fan-out filled it.
        let big = frame(&"f".repeat(60_000));
        while fan_out(&outboxes[1], big.clone()) {}
        tokio::time::timeout(Duration::from_secs(1), outboxes[1].ready())
            .await
            .unwrap();
        for q in &outboxes {
            assert!(matches!(q.push(frame("a")), Push::Owed { .. }));
            assert!(matches!(q.push(frame("bc")), Push::Owed { .. }));
        }
        if batched {
            let busy = outboxes[2].lock();
            batch::testing::write_all_with(ring.as_mut(), &outboxes);
            drop(busy);
        } else {
            // One write per socket waits for a busy lock (held briefly by its holder); here
            // socket 2's session has written nothing yet, as if it were still busy.
            let (first, rest) = outboxes.split_at(2);
            batch::testing::write_all_with(None, first);
            batch::testing::write_all_with(None, &rest[1..]);
            outboxes[2].wake_writer();
        }
        let expected = b"\x81\x01a\x81\x02bc";
        for (i, (q, client)) in outboxes.iter().zip(&mut clients).enumerate() {
            if i == 1 || i == 2 {
                // Woken to finish; what it owes is still owed.
                tokio::time::timeout(Duration::from_secs(1), q.ready())
                    .await
                    .unwrap();
                assert!(!q.lock().wire.is_empty());
                continue;
            }
            let mut got = [0u8; 7];
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, expected, "socket {i}, batched {batched}");
            assert!(q.lock().wire.is_empty());
            assert!(
                tokio::time::timeout(Duration::from_millis(10), q.ready())
                    .await
                    .is_err(),
                "socket {i} woke its session"
            );
        }
        // The busy one's session writes what it owes.
        outboxes[2].flush_wire().await.unwrap();
        let mut got = [0u8; 7];
        clients[2].read_exact(&mut got).await.unwrap();
        assert_eq!(&got, expected);
    }
}

/// A large fan-out is split with the process's writer thread: every socket still gets its
/// bytes whole and in order, nobody is woken, and the call returns only once both halves are
/// written.
#[tokio::test]
async fn a_large_batch_is_split_with_the_writer_thread_and_written_whole() {
    let (mut clients, outboxes) = steady_outboxes(20).await;
    for q in &outboxes {
        assert!(matches!(q.push(frame("a")), Push::Owed { .. }));
        assert!(matches!(q.push(frame("bc")), Push::Owed { .. }));
    }
    batch::testing::write_all_split(&outboxes, 8);
    // Returned: both halves are written, nothing is owed anywhere.
    for q in &outboxes {
        assert!(q.lock().wire.is_empty());
    }
    for (q, client) in outboxes.iter().zip(&mut clients) {
        let mut got = [0u8; 7];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x81\x01a\x81\x02bc");
        assert!(tokio::time::timeout(Duration::from_millis(5), q.ready())
            .await
            .is_err());
    }
}
