//! An HTTP/1 request-head sniffer: it reads the client's bytes on their way
//! into hyper and flags what hyper hides from the request handler —
//! `#fragment`s in request targets, and `Content-Length` sent together with
//! `Transfer-Encoding` (hyper drops the `Content-Length` and serves the
//! request chunked; the contract refuses it, since such requests are how
//! proxies and upstreams are made to disagree on where a request ends).
//!
//! The `http` crate, and so hyper, silently drops a fragment while parsing a
//! request target (`/admin#x` arrives as `/admin`), yet the contract answers
//! such a request with a 400, because peers that do see the fragment have
//! been bypassed through it (Envoy CVE-2021-32779, HAProxy CVE-2023-45539).
//! [`RequestHeadSniffer`] therefore sits between the decrypted TLS stream and
//! hyper, follows HTTP/1.1 message framing just far enough to find every
//! request head, and records in an [`AnomalyLog`] which requests on the
//! connection (by 0-based index, in the order hyper serves them) had an
//! [`Anomaly`] in their head.
//!
//! The tracker mirrors the framing rules of hyper 1.x (`httparse` for heads,
//! hyper's own `Content-Length`, `Transfer-Encoding` and chunked decoder),
//! and wherever the two could disagree it stops tracking for the rest of the
//! connection instead of guessing: a request head with both
//! `Content-Length` and `Transfer-Encoding`, differing `Content-Length`s, a
//! malformed chunk, an `Upgrade` header, a `CONNECT`, the HTTP/2 preface.
//! A desync can then only ever cost detections, never flag a request that
//! had no fragment, and the bytes themselves always pass through untouched.
//! Whatever hyper rejects outright closes the connection, so only inputs
//! hyper accepts need to be read exactly as it reads them.
//!
//! Use: wrap the TLS stream with `RequestHeadSniffer::new(tls, log.clone())`
//! before handing it to hyper, count the requests the service receives on
//! that connection from 0, and answer 400 when `log.anomaly(index)` is
//! `Some`. An HTTP/2 connection is recognised by its preface and left alone,
//! so the log answers `None` for every request on it; its `:path` is parsed
//! by the same `http` crate, which drops a fragment there too, and HPACK
//! keeps it out of reach of a byte scanner.
//!
//! # The invariant that ties it to hyper
//!
//! The log is keyed by position only: the n-th call of the service on a
//! connection (the index [`crate::connection::ConnInfo::next_request_index`]
//! hands out) must be the n-th request head the sniffer saw. Nothing checks
//! this at run time; it holds because
//!
//! * the sniffer is the reader hyper reads from, so it sees every byte
//!   hyper sees, in the same order, before hyper parses it: a head's anomaly
//!   is recorded before hyper can call the service for that head;
//! * it ends a message exactly where hyper does (same head and body framing
//!   rules), and stops following wherever the two could disagree;
//! * hyper's HTTP/1 server calls the service once per head it accepts, in
//!   order, and reads the next head only once the previous call's future
//!   has finished (its dispatcher keeps one future in flight), so the index,
//!   taken while that future runs, follows the order of the heads;
//! * a head hyper refuses ends the connection, so no later call is shifted
//!   by a head that was seen but never served.
//!
//! What breaks it: the sniffer ending a message where hyper does not (a
//! framing rule of hyper's that the tracker does not mirror), the index
//! being counted anywhere but once per service call, or more than one
//! HTTP/1 request in flight on a connection. Each would move a flag onto
//! another request. The places where the sniffer stops following on purpose
//! (after an `Upgrade` header — whether or not the upgrade then happens —
//! a `CONNECT`, ambiguous framing, the HTTP/2 preface) are safe: it records
//! nothing more on that connection and marks where following stopped
//! ([`AnomalyLog::followed`]); the pipeline closes the connection after the
//! last followed request and refuses any later one, so no request is served
//! unchecked.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

mod framing;
#[cfg(test)]
mod tests;
mod tokens;

use framing::Tracker;

/// What was wrong with a request head that hyper does not tell the handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anomaly {
    /// A `#` in the request-target.
    Fragment,
    /// Both `Content-Length` and `Transfer-Encoding`.
    LengthAndTransferEncoding,
}

/// Which requests on one connection had an [`Anomaly`] in their head.
///
/// Shared between the wrapper (writer) and the request handler (reader).
/// Cheap to clone.
#[derive(Clone, Default, Debug)]
pub struct AnomalyLog {
    shared: Arc<LogState>,
}

#[derive(Debug)]
struct LogState {
    /// Indices in increasing order. Anomalies are rare and each one earns a
    /// 400, so this stays short; a Mutex is uncontended because the writer
    /// and the reader run in the same connection task.
    flagged: Mutex<Vec<(u64, Anomaly)>>,
    /// The first request index the sniffer did not follow (`u64::MAX` while
    /// it follows them all).
    unfollowed_from: AtomicU64,
}

impl Default for LogState {
    fn default() -> Self {
        Self {
            flagged: Mutex::new(Vec::new()),
            unfollowed_from: AtomicU64::new(u64::MAX),
        }
    }
}

impl AnomalyLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// true if the request with this 0-based index on the connection had a '#' in its target
    ///
    /// hyper serves the requests of an HTTP/1 connection one after another,
    /// so the handler asks in increasing order; the answers for lower
    /// indices are forgotten here to keep a long keep-alive connection from
    /// accumulating them. Asking again for an index lower than one already
    /// asked about answers `false`.
    pub fn had_fragment(&self, request_index: u64) -> bool {
        self.anomaly(request_index) == Some(Anomaly::Fragment)
    }

    /// The first anomaly of the request with this 0-based index, if any;
    /// asked in increasing order, like [`Self::had_fragment`].
    pub fn anomaly(&self, request_index: u64) -> Option<Anomaly> {
        let mut flagged = self
            .shared
            .flagged
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let answered = flagged.partition_point(|&(index, _)| index < request_index);
        flagged.drain(..answered);
        flagged
            .first()
            .filter(|(index, _)| *index == request_index)
            .map(|&(_, anomaly)| anomaly)
    }

    /// True when the sniffer read this request's head, so [`Self::anomaly`]
    /// speaks for it. A request after the point where the sniffer stopped
    /// following the connection was never checked, and must not be served.
    pub fn followed(&self, request_index: u64) -> bool {
        request_index < self.shared.unfollowed_from.load(Ordering::Relaxed)
    }

    /// True when this request is the last one the sniffer follows (it had an
    /// `Upgrade` header, say): the connection must close after its answer
    /// unless it becomes a tunnel.
    pub fn last_followed(&self, request_index: u64) -> bool {
        request_index.checked_add(1) == Some(self.shared.unfollowed_from.load(Ordering::Relaxed))
    }

    fn stop_following(&self, from_index: u64) {
        self.shared
            .unfollowed_from
            .fetch_min(from_index, Ordering::Relaxed);
    }

    fn record(&self, request_index: u64, anomaly: Anomaly) {
        self.shared
            .flagged
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((request_index, anomaly));
    }
}

/// An I/O wrapper that passes every byte through unchanged and records, in
/// its [`AnomalyLog`], the requests whose head had an [`Anomaly`].
#[derive(Debug)]
pub struct RequestHeadSniffer<IO> {
    io: IO,
    log: AnomalyLog,
    tracker: Tracker,
}

impl<IO> RequestHeadSniffer<IO> {
    pub fn new(io: IO, log: AnomalyLog) -> Self {
        Self {
            io,
            log,
            tracker: Tracker::default(),
        }
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for RequestHeadSniffer<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let already_filled = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            this.tracker
                .feed(&buf.filled()[already_filled..], &this.log);
        }
        result
    }
}

crate::socket::pass_writes_through!(RequestHeadSniffer<IO>);
