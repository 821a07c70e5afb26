//! Serving the router on a bound listener until a shutdown signal, then a bounded drain; every
//! connection bounded in number and in the time it may hold a slot without a request.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::http::state::ConnectionLimits;
use crate::http::{build_router, AppState};

/// Connections the kernel may hold for `accept` (it caps this at `net.core.somaxconn`). With
/// tokio's 1,024, a stall of some tens of milliseconds under 12,500 deliveries/s, during which the
/// sender opened more connections, overflowed the queue (`TcpExtListenOverflows` 62 and 532 in two
/// runs of five); each dropped SYN is retried by the sender only after a second, which made those
/// runs' p99 79 and 177 ms and their maximum over a second.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` (with `SO_REUSEADDR`, as `TcpListener::bind` does) and listens with
/// [`LISTEN_BACKLOG`].
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Raises this process's open-file limit to its hard limit, so that the connection cap, not the
/// file table, is what bounds connections (at a soft limit of 1,024, 1,100 silent sockets made
/// `accept` fail). Returns the limit in force.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// Serves until `shutdown` resolves, then stops accepting, closes every connection that is not in
/// the middle of a request (idle or still sending its headers) at once, and lets the requests in
/// flight finish for at most `grace`.
///
/// At most [`ConnectionLimits::max_connections`] connections are served at once; beyond them new
/// ones wait in the listen queue while established ones go on. A connection that does not send a
/// request's headers within the header timeout, or stays idle past the idle timeout, is closed.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let limits = state.connections;
    let router = build_router(state);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stopping, stopped) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = accept(&listener, &slots) => accepted,
        };
        let Some((stream, peer, slot)) = accepted else {
            continue;
        };
        let connection = Connection {
            router: router.clone(),
            limits,
            stopped: stopped.clone(),
            _slot: slot,
        };
        tokio::spawn(connection.serve(stream, peer));
    }
    drop(listener);
    let _ = stopping.send(true);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(grace, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "requests still in flight after the grace period; stopping"
        );
    }
    Ok(())
}

/// The next connection, once a slot is free. A failed `accept` (out of file descriptors, a
/// connection reset before it was taken) is logged and retried after a pause, never fatal.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let slot = slots.clone().acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((stream, peer)) => {
            let _ = stream.set_nodelay(true);
            Some((stream, peer, slot))
        }
        Err(e) => {
            tracing::warn!(error = %e, "accept failed; retrying");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

/// One accepted connection, holding its slot until it closes.
struct Connection {
    router: Router,
    limits: ConnectionLimits,
    stopped: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
}

impl Connection {
    async fn serve(mut self, stream: TcpStream, peer: SocketAddr) {
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Watched {
            inner: stream,
            activity: activity.clone(),
        });
        let router = self.router.clone();
        let tracked = activity.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            let in_flight = tracked.begin();
            let answer = router.clone().oneshot(request);
            async move {
                let response = answer.await;
                drop(in_flight);
                response
            }
        });
        let connection = http1::Builder::new().serve_connection(io, service);
        let mut connection = std::pin::pin!(connection);
        let mut stopping = *self.stopped.borrow();
        loop {
            if stopping && activity.in_flight() == 0 {
                return;
            }
            let deadline = activity.deadline(&self.limits);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended");
                    }
                    return;
                }
                () = sleep_until_some(deadline) => {
                    if activity.deadline(&self.limits).is_some_and(|d| d <= Instant::now()) {
                        tracing::debug!("closing a connection past its header or idle timeout");
                        return;
                    }
                }
                // A request ended: the idle (or next header) deadline starts from now.
                () = activity.ended.notified() => {}
                changed = self.stopped.changed(), if !stopping => {
                    stopping = changed.is_err() || *self.stopped.borrow();
                    if stopping {
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What a connection is doing, as its reads and its requests show: requests in flight, and since
/// when it has owed a request's headers or been idle.
struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds from `started` when the connection began to owe headers; [`NOT_WAITING`] while
    /// it is idle after an answer or serving a request.
    head_since: AtomicU64,
    /// Milliseconds from `started` when the last request ended.
    idle_since: AtomicU64,
    /// Woken when a request ends, so that the connection's loop computes its next deadline.
    ended: Notify,
}

const NOT_WAITING: u64 = u64::MAX;

impl Activity {
    /// A new connection owes its first request's headers from now.
    fn new() -> Self {
        Self {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            head_since: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            ended: Notify::new(),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Bytes arrived: outside a request they start the next request's headers.
    fn read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.head_since.load(Ordering::Acquire) == NOT_WAITING
        {
            self.head_since.store(self.elapsed_ms(), Ordering::Release);
        }
    }

    /// A request's headers are in: it is served until the guard drops.
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(NOT_WAITING, Ordering::Release);
        InFlight(self.clone())
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// When the connection is to be closed if nothing happens: none while a request is served.
    fn deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        if self.in_flight() > 0 {
            return None;
        }
        let (since, limit) = match self.head_since.load(Ordering::Acquire) {
            NOT_WAITING => (self.idle_since.load(Ordering::Acquire), limits.idle_timeout),
            since => (since, limits.header_timeout),
        };
        Some(self.started + Duration::from_millis(since) + limit)
    }
}

/// A request being served; its end starts the idle time.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        activity
            .idle_since
            .store(activity.elapsed_ms(), Ordering::Release);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
        activity.ended.notify_one();
    }
}

/// A socket whose reads are reported to its connection's [`Activity`].
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received; finishing in-flight requests");
}
