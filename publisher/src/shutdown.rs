//! Shutdown signals: SIGTERM and SIGINT (Ctrl-C) cancel the process's root token.
//!
//! Everything long-lived takes a child of that token: the HTTP server stops accepting and
//! drains, the lease is released, the tick and tail loops return. [`crate::run`] never installs
//! signal handlers itself, so tests can run several publishers in one process.

use tokio_util::sync::CancellationToken;
use tracing::info;

/// Cancels `token` on the first SIGTERM or SIGINT.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        tokio::select! {
            () = signal() => {
                info!("shutdown signal received");
                token.cancel();
            }
            () = token.cancelled() => {}
        }
    });
}

#[cfg(unix)]
async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(not(unix))]
async fn signal() {
    // Without a handler Ctrl-C would kill the process; with one it shuts down cleanly.
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}
