//! One client connection: what the request handler knows about it
//! ([`ConnInfo`]), and the activity tracking behind the two connection
//! timers — `header_read_timeout` (a request head must arrive in full this
//! soon after its first byte, or after the connection opens) and
//! `idle_timeout` (a keep-alive connection with no request in flight).
//!
//! hyper's own header timer also runs while a keep-alive connection waits
//! for its next request, which would cut idle connections at the header
//! timeout; so the proxy keeps both timers itself.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::runtime::Shared;
use crate::sniffer::AnomalyLog;

/// What the pipeline knows about the connection a request came on.
pub struct ConnInfo {
    pub shared: Arc<Shared>,
    pub worker: usize,
    pub peer: SocketAddr,
    /// The peer's address as X-Forwarded-For text, formatted once per
    /// connection rather than per request.
    pub peer_header: http::HeaderValue,
    /// TLS version label for the access log ("1.2", "1.3").
    pub tls: &'static str,
    pub is_h2: bool,
    /// What the request-head sniffer flagged, by request index.
    pub anomalies: AnomalyLog,
    pub activity: Arc<Activity>,
    requests: AtomicU64,
}

impl ConnInfo {
    pub fn new(
        shared: Arc<Shared>,
        worker: usize,
        peer: SocketAddr,
        tls: &'static str,
        is_h2: bool,
        anomalies: AnomalyLog,
        activity: Arc<Activity>,
    ) -> Self {
        // An IP address's text is always a valid header value.
        let peer_header = http::HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| http::HeaderValue::from_static("unknown"));
        ConnInfo {
            shared,
            worker,
            peer,
            peer_header,
            tls,
            is_h2,
            anomalies,
            activity,
            requests: AtomicU64::new(0),
        }
    }

    /// The 0-based index of this request on the connection (HTTP/1 order).
    /// Called exactly once per service call: the sniffer's [`AnomalyLog`] is
    /// keyed by this count (the invariant is in [`crate::sniffer`]).
    pub fn next_request_index(&self) -> u64 {
        self.requests.fetch_add(1, Ordering::Relaxed)
    }
}

/// Requests a connection's client may cancel before its answer, beyond
/// which cancelling most of its requests closes the connection.
pub const MAX_CANCELLED_REQUESTS: u64 = 100;

/// A connection's timers, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub header: Duration,
    pub idle: Duration,
    pub send: Duration,
}

impl Timeouts {
    /// How often the connection's one timer must wake at the least: a
    /// deadline can begin (a head starts, a write stalls) while it sleeps.
    pub fn shortest(&self) -> Duration {
        self.header.min(self.idle).min(self.send)
    }
}

/// Why a connection's client was judged abusive and cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutOff {
    /// It cancelled most of its requests (HTTP/2 rapid reset).
    RapidReset = 1,
    /// It sent HTTP/2 PING, SETTINGS or PRIORITY frames past the budget.
    ControlFrameFlood,
}

/// `Activity::cut_off_reason` before any [`CutOff`].
const NOT_CUT_OFF: u8 = 0;

/// Which timer ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// The request head did not arrive in time: the client is cut off.
    HeaderTimeout,
    /// No request for `idle_timeout`: the connection is closed gracefully.
    Idle,
    /// A write to the client made no progress for `send_timeout`: the
    /// client stopped reading, and is cut off with whatever it holds.
    SendTimeout,
}

/// Times are milliseconds since the connection opened; 0 in `head_started`
/// means "no head in progress", so stored values are offset by one.
pub struct Activity {
    opened: Instant,
    in_flight: AtomicU32,
    served: AtomicU64,
    idle_since: AtomicU64,
    head_started: AtomicU64,
    /// Since when a write to the client has been waiting for the socket to
    /// take bytes (offset by one; 0: no write waiting).
    write_stalled_since: AtomicU64,
    /// HTTP/2 response bodies that have handed hyper a frame and wait for it
    /// to take the next, and how many times one was taken: a client that
    /// stops opening its flow-control window stalls these without any
    /// socket write waiting.
    bodies_awaiting_pull: AtomicU64,
    body_pulls: AtomicU64,
    /// Requests the client gave up on before their answer (an HTTP/2
    /// stream reset, mostly).
    cancelled: AtomicU64,
    /// Told when the client has cancelled so many requests that it is
    /// attacking rather than browsing; the connection's driver closes it.
    cut_off: tokio::sync::Notify,
    /// Why [`Self::cut_off`] fired: set before it is notified.
    cut_off_reason: std::sync::atomic::AtomicU8,
    /// HTTP/2 frames (pings, settings) are not request heads.
    tracks_heads: bool,
}

impl Activity {
    pub fn new(tracks_heads: bool) -> Arc<Self> {
        Arc::new(Activity {
            opened: Instant::now(),
            in_flight: AtomicU32::new(0),
            served: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            write_stalled_since: AtomicU64::new(0),
            bodies_awaiting_pull: AtomicU64::new(0),
            body_pulls: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            cut_off: tokio::sync::Notify::new(),
            cut_off_reason: std::sync::atomic::AtomicU8::new(NOT_CUT_OFF),
            tracks_heads,
        })
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    pub fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
        InFlight {
            activity: self.clone(),
            ended_at: None,
        }
    }

    fn on_read(&self) {
        if self.tracks_heads
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_started.load(Ordering::Relaxed) == 0
        {
            self.head_started
                .store(self.now_ms() + 1, Ordering::Relaxed);
        }
    }

    /// A request dropped before its answer: the client reset its stream (or
    /// closed the connection). Browsers do that now and then; a client that
    /// does it for most of its requests, past [`MAX_CANCELLED_REQUESTS`],
    /// is resetting streams to make the proxy start work it never finishes
    /// ("rapid reset", CVE-2023-44487, for streams h2's own limit has
    /// already let through), and its connection is cut off.
    pub fn note_cancelled(&self) {
        let cancelled = self.cancelled.fetch_add(1, Ordering::Relaxed) + 1;
        // `served` counts every request that ended, cancelled ones included.
        if cancelled > MAX_CANCELLED_REQUESTS && cancelled * 2 > self.served.load(Ordering::Relaxed)
        {
            self.cut_off_reason
                .store(CutOff::RapidReset as u8, Ordering::Relaxed);
            self.cut_off.notify_one();
        }
    }

    /// True once the client has been judged abusive: its socket is reset
    /// rather than closed with a lingering drain of what it still sends.
    pub fn was_cut_off(&self) -> bool {
        self.cut_off_reason.load(Ordering::Relaxed) != NOT_CUT_OFF
    }

    /// The client sent more HTTP/2 control frames than
    /// [`crate::h2_flood::ControlFrameGuard`] allows.
    pub fn cut_off_flood(&self) {
        self.cut_off_reason
            .store(CutOff::ControlFrameFlood as u8, Ordering::Relaxed);
        self.cut_off.notify_one();
    }

    /// Resolves once the client has been judged abusive, with why.
    pub async fn cut_off(&self) -> CutOff {
        self.cut_off.notified().await;
        if self.cut_off_reason.load(Ordering::Relaxed) == CutOff::ControlFrameFlood as u8 {
            CutOff::ControlFrameFlood
        } else {
            CutOff::RapidReset
        }
    }

    /// Whether response bodies report their pulls ([`Self::body_handed_over`]):
    /// on HTTP/2 only, where flow control can stall them with no write
    /// waiting; on HTTP/1 a stalled client shows as a stalled write.
    pub fn watches_body_pulls(&self) -> bool {
        !self.tracks_heads
    }

    /// A response body gave hyper a frame and has more to come.
    pub fn body_handed_over(&self) {
        self.bodies_awaiting_pull.fetch_add(1, Ordering::Relaxed);
    }

    /// hyper came back for the next frame of a body (or dropped it).
    pub fn body_pulled(&self) {
        self.bodies_awaiting_pull.fetch_sub(1, Ordering::Relaxed);
        self.body_pulls.fetch_add(1, Ordering::Relaxed);
    }

    /// Bodies waiting for hyper to take their next frame, and the count of
    /// pulls so far (the driver's timer watches it move).
    pub fn body_pull_state(&self) -> (u64, u64) {
        (
            self.bodies_awaiting_pull.load(Ordering::Relaxed),
            self.body_pulls.load(Ordering::Relaxed),
        )
    }

    /// A write the socket did not take (the client is not reading).
    fn on_write_pending(&self) {
        if self.write_stalled_since.load(Ordering::Relaxed) == 0 {
            self.write_stalled_since
                .store(self.now_ms() + 1, Ordering::Relaxed);
        }
    }

    /// A write the socket took: whatever was stalled moves again.
    fn on_write_progress(&self) {
        if self.write_stalled_since.load(Ordering::Relaxed) != 0 {
            self.write_stalled_since.store(0, Ordering::Relaxed);
        }
    }

    /// When a stalled write to the client runs out of `send_timeout`, if
    /// one is stalled.
    pub fn send_deadline(&self, send_timeout: Duration) -> Option<Instant> {
        match self.write_stalled_since.load(Ordering::Relaxed) {
            0 => None,
            since => Some(self.opened + Duration::from_millis(since - 1) + send_timeout),
        }
    }

    /// When the connection's current timer runs out, and which one it is.
    /// With a request in flight only a stalled write has one; the caller
    /// looks again later.
    pub fn deadline(&self, timeouts: &Timeouts) -> (Instant, Option<Expiry>) {
        if let Some(at) = self.send_deadline(timeouts.send) {
            return (at, Some(Expiry::SendTimeout));
        }
        let (header_timeout, idle_timeout) = (timeouts.header, timeouts.idle);
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return (Instant::now() + idle_timeout, None);
        }
        let at = |ms: u64, after: Duration| self.opened + Duration::from_millis(ms) + after;
        let head = self.head_started.load(Ordering::Relaxed);
        if head != 0 {
            return (at(head - 1, header_timeout), Some(Expiry::HeaderTimeout));
        }
        if self.served.load(Ordering::Relaxed) == 0 {
            let expiry = if self.tracks_heads {
                Expiry::HeaderTimeout
            } else {
                Expiry::Idle
            };
            return (at(0, header_timeout), Some(expiry));
        }
        (
            at(self.idle_since.load(Ordering::Relaxed), idle_timeout),
            Some(Expiry::Idle),
        )
    }
}

/// Held while a request is being served (until its response body ends).
pub struct InFlight {
    activity: Arc<Activity>,
    /// When the request ended, if whoever ended it had read the clock.
    ended_at: Option<Instant>,
}

impl InFlight {
    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    /// Ends the request at `now`, a clock reading the caller already made.
    pub fn end_at(mut self, now: Instant) {
        self.ended_at = Some(now);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.activity;
        activity.served.fetch_add(1, Ordering::Relaxed);
        let ended_ms = match self.ended_at {
            Some(at) => at.saturating_duration_since(activity.opened).as_millis() as u64,
            None => activity.now_ms(),
        };
        activity.idle_since.store(ended_ms, Ordering::Relaxed);
        activity.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client connection's claim on `max_connections` and its place in the
/// `portcullis_active_connections` gauge, both given back on drop.
///
/// It travels inside the connection's I/O object ([`ActivityIo::holding`]),
/// so a connection that hyper hands over to a WebSocket tunnel keeps both
/// until the tunnel closes, not only until the upgrade.
pub struct ConnectionSlot {
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
}

impl ConnectionSlot {
    pub fn new(shared: Arc<Shared>, permit: OwnedSemaphorePermit) -> Self {
        shared.metrics.active_connections.inc();
        ConnectionSlot {
            shared,
            _permit: permit,
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.shared.metrics.active_connections.dec();
    }
}

/// Notes reads for the header timer, and closes quietly after a client
/// that vanished; otherwise a pass-through.
pub struct ActivityIo<IO> {
    io: IO,
    activity: Arc<Activity>,
    _slot: Option<ConnectionSlot>,
    /// A read failed: the client closed without close_notify, reset, or
    /// broke the protocol. Nobody is left to read a close_notify, and on a
    /// closed socket sending one only provokes a reset, so the close is a
    /// plain one (nginx does the same). A client that did send close_notify
    /// still gets one back (RFC 8446 §6.1).
    peer_gone: bool,
}

impl<IO> ActivityIo<IO> {
    pub fn new(io: IO, activity: Arc<Activity>) -> Self {
        ActivityIo {
            io,
            activity,
            _slot: None,
            peer_gone: false,
        }
    }

    /// Keeps `slot` for as long as this I/O object lives.
    pub fn holding(mut self, slot: ConnectionSlot) -> Self {
        self._slot = Some(slot);
        self
    }

    fn note_write(&self, polled: &Poll<std::io::Result<usize>>) {
        match polled {
            Poll::Pending => self.activity.on_write_pending(),
            Poll::Ready(_) => self.activity.on_write_progress(),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for ActivityIo<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => self.activity.on_read(),
            Poll::Ready(Err(_)) => self.peer_gone = true,
            _ => {}
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for ActivityIo<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.note_write(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.note_write(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        match polled {
            Poll::Pending => self.activity.on_write_pending(),
            Poll::Ready(_) => self.activity.on_write_progress(),
        }
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.peer_gone {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
