//! The response body the proxy hands to hyper: the upstream's streamed body,
//! or a body the proxy wrote itself — wrapped so that the access log is
//! written when the body ends (with the bytes actually sent), and so that the
//! connection knows when a request is over (its idle timer starts then).

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
        self.record.emit(self.bytes, self.started.elapsed());
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
            record,
            started,
            bytes: 0,
            in_flight,
            awaiting_pull: false,
        }));
        self
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
        if let Poll::Ready(None) = polled {
            // Log as soon as the body is complete, not when hyper gets round to dropping it.
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
