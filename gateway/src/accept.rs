//! The accept loop of both ports: HTTP/1.1 through hyper with a deadline on the request head,
//! so a client that connects and never finishes its upgrade request (or idles between
//! keep-alive requests) is dropped after `limits.handshake_timeout_ms` instead of holding a
//! socket forever. `axum::serve` offers no such deadline, hence this loop; it keeps what
//! `axum::serve` gave: the peer address as `ConnectInfo<SocketAddr>`, upgrades, and a graceful
//! stop (stop accepting, let in-flight requests finish).
//!
//! Upgraded WebSockets leave this loop's bookkeeping as soon as the 101 is written: the
//! connection task ends and its HTTP state is freed; the session is its own task.

use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

/// Serve `router` on `listener` until `stop` is cancelled, then wait for the HTTP requests in
/// flight (not the upgraded WebSockets, which the node drains itself).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    handshake_timeout: Duration,
    stop: CancellationToken,
) {
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    on_accept_error(e).await;
                    continue;
                }
            },
        };
        // TCP_NODELAY: the session batches in user space (every frame queued by a wake-up
        // leaves in one flush), so Nagle has nothing left to coalesce on loopback, and on a
        // real network it would hold the second of two back-to-back flushes until the first
        // is acknowledged (a round trip plus the peer's delayed-ACK timer). A socket that
        // refuses the option is served anyway.
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let service =
                hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    router.clone().call(request)
                });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(handshake_timeout);
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                // An error here is the client's doing (timeout, bad request, reset): nothing
                // to log above debug.
                result = conn.as_mut() => if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended");
                },
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Errors of `accept` are per connection (the client reset it) or resource exhaustion (out of
/// file descriptors), where retrying at once would spin: pause then.
async fn on_accept_error(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused
    ) {
        return;
    }
    tracing::warn!(error = %e, "accept failed; pausing");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
