//! The gRPC listeners' connections: a cap on how many are open, TCP keepalive, and the
//! closing of idle ones.
//!
//! * **Cap**: each listener (client port; peer port when there is one) keeps at most
//!   `limits.max_connections` connections, TLS handshakes included. A connection beyond it is
//!   accepted and closed at once (the client sees the connection reset, and retries or tries
//!   another node) and counted as `raftsched_limit_refusals_total{limit="connections"}`; the
//!   node stays reachable for the connections it has. At start the process raises its
//!   open-files limit to the hard limit, and a cap that would not fit under it (with
//!   [`RESERVED_FDS`] left for the log, the state machine and peer connections) is lowered,
//!   with a warning: running out of file descriptors would refuse every connection, peers'
//!   included, with nothing to show for it.
//! * **Idle connections**: a connection with no request in flight (streams count while
//!   open) for `limits.idle_timeout` is closed, whatever it is doing otherwise (answering
//!   HTTP/2 pings, or never having spoken at all). Clients reconnect on their next request.
//! * **Half-open connections** (the peer vanished without a FIN): the server pings every
//!   `limits.keepalive_interval` and closes a connection whose ping is not answered within
//!   `limits.keepalive_timeout`; TCP keepalive ([`TCP_KEEPALIVE`]) catches the rest.
//!
//! The requests' side of "in flight" is [`crate::limits::LimitsLayer`], which marks the
//! connection found in each request's [`ConnInfo`] busy until the response ends.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tracing::{debug, warn};

use crate::limits::{Limit, LimitMetrics};
use crate::tls::NodeTls;

/// File descriptors kept free of the connection caps: the Raft log, sled, snapshots,
/// connections to peers, the HTTP port.
pub const RESERVED_FDS: u64 = 256;

/// TCP keepalive of accepted connections: first probe after this much silence.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How connections of one listener are limited.
#[derive(Clone, Debug)]
pub struct ConnSettings {
    /// Open connections at most.
    pub max: usize,
    /// Close a connection after this long with no request in flight.
    pub idle_timeout: Duration,
}

fn epoch() -> std::time::Instant {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    *START.get_or_init(std::time::Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// Whether a connection has requests in flight, and since when it has none.
#[derive(Debug)]
pub struct Activity {
    busy: AtomicUsize,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity { busy: AtomicUsize::new(0), last_ms: AtomicU64::new(now_ms()) }
    }

    fn idle_for(&self) -> Option<Duration> {
        if self.busy.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = self.last_ms.load(Ordering::Acquire);
        Some(Duration::from_millis(now_ms().saturating_sub(last)))
    }
}

/// Keeps a connection busy while alive.
pub struct BusyGuard(Arc<Activity>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.last_ms.store(now_ms(), Ordering::Release);
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a request knows of its connection (a request extension, set by tonic from
/// [`Connected`]).
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// Addresses.
    pub tcp: TcpConnectInfo,
    /// The TLS session (certificates), when the listener speaks TLS.
    pub tls: Option<TlsConnectInfo<TcpConnectInfo>>,
    activity: Arc<Activity>,
}

impl ConnInfo {
    /// Mark the connection busy until the guard is dropped.
    pub fn busy(&self) -> BusyGuard {
        self.activity.busy.fetch_add(1, Ordering::AcqRel);
        self.activity.last_ms.store(now_ms(), Ordering::Release);
        BusyGuard(self.activity.clone())
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A connection's place under its listener's cap, and its open-connections gauge.
struct Slot {
    _permit: OwnedSemaphorePermit,
    gauge: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// An accepted connection (plain or TLS) that closes itself when idle.
pub struct Conn {
    io: Io,
    info: ConnInfo,
    idle_timeout: Duration,
    timer: Pin<Box<Sleep>>,
    closed_idle: bool,
    metrics: LimitMetrics,
    _slot: Slot,
}

impl Conn {
    /// True once the connection was idle for the timeout (then reads see end of file).
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.closed_idle {
            return true;
        }
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let wait = match self.info.activity.idle_for() {
                None => self.idle_timeout,
                Some(idle) if idle >= self.idle_timeout => {
                    self.closed_idle = true;
                    self.metrics.idle_closed.inc();
                    debug!(from = ?self.info.tcp.remote_addr, "closing an idle connection");
                    return true;
                }
                Some(idle) => self.idle_timeout - idle,
            };
            self.timer.as_mut().reset(Instant::now() + wait);
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.idle_expired(cx) {
            // End of file: the server closes the connection.
            return Poll::Ready(Ok(()));
        }
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Raise the soft open-files limit to the hard one; the soft limit in force afterwards.
pub fn raise_fd_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    // rlim_t is u64 on Linux but not on every platform.
    #[allow(clippy::unnecessary_cast)]
    Some(lim.rlim_cur as u64)
}

/// The connection cap that fits under `fds` open files with `listeners` listeners (module
/// docs): `wanted`, or less with a warning.
pub fn fit_cap(wanted: usize, listeners: usize, fds: Option<u64>) -> usize {
    let Some(fds) = fds else { return wanted };
    let room = (fds.saturating_sub(RESERVED_FDS) / listeners.max(1) as u64).max(1) as usize;
    if wanted > room {
        warn!(
            max_connections = wanted,
            open_files_limit = fds,
            using = room,
            "limits.max_connections does not fit under the open-files limit (RLIMIT_NOFILE); \
             using a lower cap. Raise the limit (LimitNOFILE= in the systemd unit) or lower \
             --max-connections"
        );
        return room;
    }
    wanted
}

fn keepalive(tcp: &TcpStream) {
    let ka = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE).with_interval(TCP_KEEPALIVE / 3);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka);
}

/// The connections of `listener` (TLS when `tls` is given), capped and closing when idle
/// (module docs). `name` labels the listener in metrics (`client`, `peer`). Ends when the
/// server stops reading it.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<NodeTls>>,
    settings: ConnSettings,
    metrics: LimitMetrics,
    name: &'static str,
) -> ReceiverStream<Result<Conn, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let cap = Arc::new(Semaphore::new(settings.max));
    let gauge = metrics.connections(name);
    tokio::spawn(async move {
        let mut accept_errors = 0u64;
        let mut last_error_log: Option<Instant> = None;
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, from): (TcpStream, SocketAddr) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors, most likely: back off instead of spinning, and
                    // say so (throttled), since every new connection fails meanwhile.
                    accept_errors += 1;
                    if last_error_log.is_none_or(|t| t.elapsed() >= crate::limits::LOG_EVERY) {
                        warn!(listener = name, error = %e, failures = accept_errors, "accepting connections fails");
                        last_error_log = Some(Instant::now());
                        accept_errors = 0;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = cap.clone().try_acquire_owned() else {
                let msg = format!(
                    "closed a connection from {from}: {} connections are open on the {name} port \
                     (limits.max_connections, --max-connections)",
                    settings.max
                );
                metrics.refused(Limit::Connections, &msg);
                drop(tcp);
                continue;
            };
            gauge.inc();
            let slot = Slot { _permit: permit, gauge: gauge.clone() };
            let _ = tcp.set_nodelay(true);
            keepalive(&tcp);
            let tcp_info = tcp.connect_info();
            let make = {
                let settings = settings.clone();
                let metrics = metrics.clone();
                move |io: Io, tls_info: Option<TlsConnectInfo<TcpConnectInfo>>| {
                    let info = ConnInfo {
                        tcp: tcp_info,
                        tls: tls_info,
                        activity: Arc::new(Activity::new()),
                    };
                    Conn {
                        io,
                        info,
                        idle_timeout: settings.idle_timeout,
                        timer: Box::pin(tokio::time::sleep(settings.idle_timeout)),
                        closed_idle: false,
                        metrics,
                        _slot: slot,
                    }
                }
            };
            match &tls {
                None => {
                    if tx.send(Ok(make(Io::Plain(tcp), None))).await.is_err() {
                        return;
                    }
                }
                Some(t) => {
                    let acceptor = t.acceptor();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => {
                                let info = stream.connect_info();
                                let _ =
                                    tx.send(Ok(make(Io::Tls(Box::new(stream)), Some(info)))).await;
                            }
                            Ok(Err(e)) => debug!(%from, error = %e, "TLS handshake failed"),
                            Err(_) => debug!(%from, "TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_fits_under_the_open_files_limit() {
        assert_eq!(fit_cap(4096, 1, Some(1024)), 1024 - RESERVED_FDS as usize);
        assert_eq!(fit_cap(4096, 2, Some(1024)), (1024 - RESERVED_FDS as usize) / 2);
        assert_eq!(fit_cap(100, 2, Some(1024)), 100, "a cap that fits is kept");
        assert_eq!(fit_cap(100, 1, None), 100, "unknown limit: kept");
        assert_eq!(fit_cap(100, 1, Some(10)), 1, "never zero");
    }
}
