//! The HTTP listener: accepts connections and serves the router on each, with the limits `axum::serve` does not
//! set. Its hyper connections run without a timer, so hyper's header-read timeout never fires: a client that
//! opens connections and sends its headers a byte at a time, before any key is asked for, holds a socket and a
//! task each for as long as it likes, until the process runs out of file descriptors. Here every connection must
//! send its request headers within `header_read_timeout` of the server starting to wait for them (from accept,
//! and between requests on a kept-alive connection), and at most `max_connections` are open at once (the next
//! waits in the kernel's backlog). HTTP/1.1 only: hyper's protocol detection for HTTP/2 reads the first bytes
//! with no timer at all, so a connection that sent nothing would hold its place for good. Nothing here needs
//! HTTP/2 (TLS, where it is negotiated, ends at a proxy in front).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Limits on each connection and on how many there are.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// A connection that has not sent a whole request head this long after the server began waiting for one is
    /// closed: from accept, and between requests on a kept-alive connection. Behind a proxy that keeps idle
    /// connections open, make it longer than the proxy's idle timeout (AWS ALB: 60 s), or the proxy may send a
    /// request on a connection just as it closes.
    pub header_read_timeout: Duration,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits { header_read_timeout: Duration::from_secs(75), max_connections: 4096 }
    }
}

/// Serves `app` on `listener` until `shutdown`, then stops accepting and waits for the connections it has to
/// finish their requests (idle ones are closed). Each request carries the client's address (`ConnectInfo`).
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let connections = Arc::new(Semaphore::new(limits.max_connections.clamp(1, Semaphore::MAX_PERMITS)));
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    wait_out_accept_error(&error).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // Replies are small; without this a reply split over two writes could wait on the client's delayed ACK.
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let mut request = request.map(axum::body::Body::new);
            // What wrong keys are counted by (`auth::FailedKeys`).
            request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            app.clone().oneshot(request)
        });
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(tcp), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, "connection ended: {error}");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// An accept that failed for the one connection it was accepting (reset before it was taken) is nothing; one that
/// failed for the listener (out of file descriptors) is tried again after a pause, not in a tight loop.
async fn wait_out_accept_error(error: &std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(error.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        return;
    }
    tracing::warn!("cannot accept a connection: {error}; trying again in a second");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
