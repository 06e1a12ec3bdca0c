//! The response body the proxy hands to hyper: the upstream's streamed body,
//! or a body the proxy wrote itself — wrapped so that the access log is
//! written when the body ends (with the bytes actually sent), and so that the
//! connection knows when a request is over (its idle timer starts then).
//!
//! A body dropped before its end, when the response has one to send, is a
//! request the client cancelled after the proxy answered its head (an HTTP/2
//! stream reset, mostly): it counts towards the connection's rapid-reset
//! limit like a request cancelled before its answer
//! ([`crate::connection::Activity::note_cancelled`]). Without that, a client
//! that resets each stream just after the upstream's head arrives would cost
//! one upstream connection per stream and never be cut off.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::connection::InFlight;
use crate::telemetry::AccessRecord;
use crate::upstream::UpstreamResponseBody;

enum Inner {
    Upstream(UpstreamResponseBody),
    Full(Option<Bytes>),
}

/// Written once per request, when the response body is finished or dropped.
struct AccessLogOnDrop {
    record: AccessRecord,
    started: Instant,
    bytes: u64,
    in_flight: Option<InFlight>,
    /// A frame was handed to hyper and the connection counts this body as
    /// waiting for the next pull (HTTP/2; see `Activity::body_handed_over`).
    awaiting_pull: bool,
    /// The response carries a body hyper will send: not the answer to a
    /// HEAD, not a 1xx, 204 or 304.
    has_content: bool,
}

impl AccessLogOnDrop {
    fn pulled(&mut self) {
        if self.awaiting_pull {
            self.awaiting_pull = false;
            if let Some(in_flight) = &self.in_flight {
                in_flight.activity().body_pulled();
            }
        }
    }

    fn handed_over(&mut self) {
        if let Some(in_flight) = &self.in_flight
            && in_flight.activity().watches_body_pulls()
        {
            self.awaiting_pull = true;
            in_flight.activity().body_handed_over();
        }
    }
}

impl Drop for AccessLogOnDrop {
    fn drop(&mut self) {
        self.pulled();
        // One clock reading serves the duration, the log line's timestamp
        // and the connection's idle clock.
        let ended = Instant::now();
        self.record.emit(
            self.bytes,
            ended.saturating_duration_since(self.started),
            ended,
        );
        if let Some(in_flight) = self.in_flight.take() {
            in_flight.end_at(tokio::time::Instant::from_std(ended));
        }
    }
}

pub struct ResponseBody {
    inner: Inner,
    log: Option<Box<AccessLogOnDrop>>,
}

impl ResponseBody {
    pub fn upstream(body: UpstreamResponseBody) -> Self {
        ResponseBody {
            inner: Inner::Upstream(body),
            log: None,
        }
    }

    pub fn full(bytes: Bytes) -> Self {
        ResponseBody {
            inner: Inner::Full((!bytes.is_empty()).then_some(bytes)),
            log: None,
        }
    }

    pub fn empty() -> Self {
        ResponseBody {
            inner: Inner::Full(None),
            log: None,
        }
    }

    /// Attaches the access record: it is written when this body ends.
    pub fn with_access_log(
        mut self,
        record: AccessRecord,
        started: Instant,
        in_flight: Option<InFlight>,
    ) -> Self {
        self.log = Some(Box::new(AccessLogOnDrop {
            has_content: has_content(&record.method, record.status),
            record,
            started,
            bytes: 0,
            in_flight,
            awaiting_pull: false,
        }));
        self
    }
}

/// Whether hyper sends a body with this response (RFC 9110 §6.4.1).
fn has_content(method: &http::Method, status: u16) -> bool {
    method != http::Method::HEAD && !matches!(status, 100..=199 | 204 | 304)
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Still logging: the body neither ended nor failed.
        if let Some(log) = &self.log
            && log.has_content
            && !self.is_end_stream()
            && let Some(in_flight) = &log.in_flight
        {
            in_flight.activity().note_cancelled();
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        if let Some(log) = &mut this.log {
            log.pulled();
        }
        let polled = match &mut this.inner {
            Inner::Upstream(body) => Pin::new(body).poll_frame(cx),
            Inner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        };
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && let Some(log) = &mut this.log
        {
            log.bytes += data.len() as u64;
            log.handed_over();
        }
        // Log as soon as the body is complete (hyper stops polling once
        // `is_end_stream` says so) or has failed (the upstream's fault, not
        // the client's), not when hyper gets round to dropping it.
        if this.log.is_some()
            && (matches!(polled, Poll::Ready(None | Some(Err(_)))) || this.is_end_stream())
        {
            this.log = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream(body) => body.is_end_stream(),
            Inner::Full(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(body) => body.size_hint(),
            Inner::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::{Activity, MAX_CANCELLED_REQUESTS};
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;

    fn answered(activity: &Arc<Activity>, method: http::Method, status: u16) -> ResponseBody {
        let record = AccessRecord {
            client: IpAddr::V4(Ipv4Addr::LOCALHOST),
            method,
            path: "/".to_owned(),
            route: Arc::from("r"),
            status,
            upstream_status: Some(status),
            tls: "TLSv1.3",
            sub: None,
        };
        ResponseBody::full(Bytes::from_static(b"content")).with_access_log(
            record,
            Instant::now(),
            Some(activity.begin_request()),
        )
    }

    /// More than the limit of answers, each dropped as `finish` leaves it.
    fn cut_off_after(method: http::Method, status: u16, finish: fn(&mut ResponseBody)) -> bool {
        let activity = Activity::new(false);
        for _ in 0..=MAX_CANCELLED_REQUESTS {
            let mut body = answered(&activity, method.clone(), status);
            finish(&mut body);
        }
        activity.was_cut_off()
    }

    fn read_to_end(body: &mut ResponseBody) {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        while let Poll::Ready(Some(_)) = Pin::new(&mut *body).poll_frame(&mut cx) {}
    }

    #[test]
    fn answers_dropped_before_their_body_was_sent_count_as_cancelled() {
        assert!(cut_off_after(http::Method::GET, 200, |_| {}));
    }

    #[test]
    fn answers_sent_in_full_are_not_cancelled() {
        assert!(!cut_off_after(http::Method::GET, 200, read_to_end));
    }

    #[test]
    fn answers_without_content_are_not_cancelled_when_hyper_never_reads_them() {
        assert!(!cut_off_after(http::Method::HEAD, 200, |_| {}));
        assert!(!cut_off_after(http::Method::GET, 204, |_| {}));
        assert!(!cut_off_after(http::Method::GET, 304, |_| {}));
        assert!(!cut_off_after(http::Method::GET, 101, |_| {}));
    }

    #[test]
    fn the_last_frame_ends_the_body_without_another_poll() {
        let activity = Activity::new(false);
        let mut body = answered(&activity, http::Method::GET, 200);
        let waker = std::task::Waker::noop();
        let frame = Pin::new(&mut body).poll_frame(&mut Context::from_waker(waker));
        assert!(matches!(frame, Poll::Ready(Some(Ok(_)))));
        assert!(body.is_end_stream());
        assert!(body.log.is_none(), "logged at the last frame");
    }
}
