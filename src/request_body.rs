//! The request body on its way to the upstream: streamed as it arrives, or
//! whole when a policy had to read it first (a `json_schema` route).
//!
//! Streaming is the rule: the proxy holds no more of a body than one read.
//! Only a schema route buffers, and only up to its `max_body_bytes`
//! ([`read_whole`] stops at the first byte past it), so memory stays under
//! concurrency × limit. A whole body goes upstream with a `Content-Length`
//! (the upstream encoder frames by [`Body::size_hint`]), byte for byte as
//! the client sent it.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::policy::limits::{LimitedBody, is_body_too_large};
use crate::reject::Rejection;

pub enum RequestBody {
    Streamed(LimitedBody<Incoming>),
    /// `None` once sent.
    Whole(Option<Bytes>),
}

impl RequestBody {
    pub fn streamed(body: Incoming, limit: u64) -> Self {
        RequestBody::Streamed(LimitedBody::new(body, limit))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            RequestBody::Streamed(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Whole(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streamed(body) => body.is_end_stream(),
            RequestBody::Whole(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streamed(body) => body.size_hint(),
            RequestBody::Whole(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// Reads the whole body, refusing it (413) at the first byte past `limit`
/// without reading the rest. `declared` (a `Content-Length` already checked
/// against the limit) sizes the buffer once.
pub async fn read_whole(
    body: Incoming,
    limit: u64,
    declared: Option<u64>,
) -> Result<Bytes, Rejection> {
    let mut body = LimitedBody::new(body, limit);
    // Never trust a declared length for more than the limit allows.
    let mut collected = BytesMut::with_capacity(declared.unwrap_or(0).min(limit) as usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| {
            if is_body_too_large(error.as_ref()) {
                Rejection::BodyTooLarge
            } else {
                Rejection::ClientAborted
            }
        })?;
        if let Ok(data) = frame.into_data() {
            collected.extend_from_slice(&data);
        }
    }
    Ok(collected.freeze())
}
