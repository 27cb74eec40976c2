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
    /// A request's body must have arrived whole this long after its head: one that announces a large body and
    /// sends nothing would otherwise hold its connection for good, with any key at all (the key is checked
    /// before the body is read, the scope after).
    pub body_read_timeout: Duration,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_read_timeout: Duration::from_secs(75),
            body_read_timeout: Duration::from_secs(60),
            max_connections: 4096,
        }
    }
}

/// The request body did not arrive whole within [`ConnectionLimits::body_read_timeout`].
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub(crate) struct BodyTimedOut(Duration);

/// `body`, failing once `limit` has passed before it ended. The deadline is one for the whole body, not one per
/// chunk: a byte every few seconds would keep a per-chunk timer from ever firing.
fn with_deadline(body: axum::body::Body, limit: Duration) -> axum::body::Body {
    use futures::StreamExt;
    let deadline = tokio::time::Instant::now() + limit;
    let chunks = futures::stream::unfold(Some(body.into_data_stream()), move |chunks| async move {
        let mut chunks = chunks?;
        match tokio::time::timeout_at(deadline, chunks.next()).await {
            Ok(Some(chunk)) => Some((chunk, Some(chunks))),
            Ok(None) => None,
            Err(_) => Some((Err(axum::Error::new(BodyTimedOut(limit))), None)),
        }
    });
    axum::body::Body::from_stream(chunks)
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
            let mut request = request.map(|body| with_deadline(axum::body::Body::new(body), limits.body_read_timeout));
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
