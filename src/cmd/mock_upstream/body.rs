//! What the mock answers with: the JSON echo held in one buffer, or a
//! generated download streamed from one static pattern.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Response, header};
use hyper::body::{Body, Frame, SizeHint};

pub(super) const CHUNK_BYTES: usize = 64 * 1024;

/// Every download chunk is a slice of this one static buffer, so a download
/// allocates nothing per chunk. As the length is a multiple of 256, byte `i`
/// of any download is `i % 256` across chunk boundaries, which lets tests
/// check that nothing was lost or reordered.
pub(super) static PATTERN: [u8; CHUNK_BYTES] = pattern();

const fn pattern() -> [u8; CHUNK_BYTES] {
    let mut bytes = [0u8; CHUNK_BYTES];
    let mut i = 0;
    while i < CHUNK_BYTES {
        bytes[i] = i as u8;
        i += 1;
    }
    bytes
}

pub(super) fn download(length: u64) -> Response<MockBody> {
    let mut response = Response::new(MockBody::Pattern { remaining: length });
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
}

/// Response bodies: a JSON echo held in one buffer, or a generated download.
pub(super) enum MockBody {
    Once(Option<Bytes>),
    Pattern { remaining: u64 },
}

impl MockBody {
    pub(super) fn empty() -> Self {
        MockBody::Once(None)
    }

    pub(super) fn bytes(bytes: Bytes) -> Self {
        if bytes.is_empty() {
            MockBody::empty()
        } else {
            MockBody::Once(Some(bytes))
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            MockBody::Once(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Pattern { remaining } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                let n = usize::try_from(*remaining).map_or(CHUNK_BYTES, |r| r.min(CHUNK_BYTES));
                *remaining -= n as u64;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&PATTERN[..n])))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MockBody::Once(bytes) => bytes.is_none(),
            MockBody::Pattern { remaining } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Once(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            MockBody::Pattern { remaining } => SizeHint::with_exact(*remaining),
        }
    }
}
