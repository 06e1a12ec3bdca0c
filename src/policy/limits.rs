//! Request limits: the size of the request head (431), the size of the body
//! (413, decided from `Content-Length` before any byte is read, and counted
//! while streaming otherwise), and `Content-Length` framing a proxy must
//! never pass on (conflicting or list-valued lengths — the raw material of
//! request smuggling; `Content-Length` with `Transfer-Encoding` is caught by
//! the request-head sniffer, since hyper drops the length).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::request::Parts;
use http_body::{Body, Frame, SizeHint};

use crate::reject::Rejection;

/// Bytes of the request head as a client sent it, near enough: request line
/// plus each header's name, value and separators.
pub fn head_bytes(parts: &Parts) -> usize {
    let target = parts.uri.path_and_query().map_or(1, |pq| pq.as_str().len())
        + parts.uri.authority().map_or(0, |a| a.as_str().len());
    let line = parts.method.as_str().len() + target + 12;
    parts.headers.iter().fold(line, |sum, (name, value)| {
        sum + name.as_str().len() + value.len() + 4
    })
}

pub fn check_head(parts: &Parts, max_header_bytes: usize) -> Result<(), Rejection> {
    if head_bytes(parts) > max_header_bytes {
        return Err(Rejection::HeaderTooLarge);
    }
    Ok(())
}

/// Checks the body framing and, when the length is declared, the limit.
/// Returns the declared length.
///
/// `Content-Length` beside `Transfer-Encoding` never reaches this point:
/// hyper drops the length while parsing an HTTP/1 head (HTTP/2 has no
/// `Transfer-Encoding`), so the request-head sniffer sees the pair on the
/// wire and the pipeline refuses it at step 0.
pub fn check_body_framing(parts: &Parts, max_body_bytes: u64) -> Result<Option<u64>, Rejection> {
    let mut lengths = parts.headers.get_all(CONTENT_LENGTH).iter();
    let declared = match lengths.next() {
        None => None,
        Some(first) => {
            let parse = |v: &http::HeaderValue| -> Result<u64, Rejection> {
                let text = v
                    .to_str()
                    .map_err(|_| Rejection::BadRequest("invalid Content-Length"))?;
                // A comma list of equal values is legal in RFC 9110 but has
                // served smuggling too often; one plain number only.
                if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(Rejection::BadRequest("invalid Content-Length"));
                }
                text.parse()
                    .map_err(|_| Rejection::BadRequest("invalid Content-Length"))
            };
            let length = parse(first)?;
            for other in lengths {
                if parse(other)? != length {
                    return Err(Rejection::BadRequest("conflicting Content-Length headers"));
                }
            }
            Some(length)
        }
    };
    if let Some(length) = declared
        && length > max_body_bytes
    {
        return Err(Rejection::BodyTooLarge);
    }
    Ok(declared)
}

/// The error a [`LimitedBody`] yields when the body outgrows its limit; the
/// pipeline recognises it in the upstream error's source chain and answers 413.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than the limit")]
pub struct BodyTooLarge;

/// A request body that fails once more than `remaining` bytes have passed.
pub struct LimitedBody<B> {
    inner: B,
    remaining: u64,
}

impl<B> LimitedBody<B> {
    pub fn new(inner: B, limit: u64) -> Self {
        LimitedBody {
            inner,
            remaining: limit,
        }
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > self.remaining {
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                    self.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// True if `error` (or anything in its source chain) is a [`BodyTooLarge`].
pub fn is_body_too_large(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<BodyTooLarge>() {
            return true;
        }
        current = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().uri("/x");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).map(|r| r.into_parts().0).unwrap()
    }

    #[test]
    fn framing() {
        assert!(matches!(check_body_framing(&parts(&[]), 10), Ok(None)));
        assert!(matches!(
            check_body_framing(&parts(&[("content-length", "5")]), 10),
            Ok(Some(5))
        ));
        assert!(matches!(
            check_body_framing(&parts(&[("content-length", "11")]), 10),
            Err(Rejection::BodyTooLarge)
        ));
        assert!(matches!(
            check_body_framing(
                &parts(&[("content-length", "5"), ("content-length", "6")]),
                10
            ),
            Err(Rejection::BadRequest(_))
        ));
        assert!(matches!(
            check_body_framing(&parts(&[("content-length", "+5")]), 10),
            Err(Rejection::BadRequest(_))
        ));
    }

    #[test]
    fn head_size() {
        let big = "x".repeat(2000);
        assert!(check_head(&parts(&[("a", &big)]), 1024).is_err());
        assert!(check_head(&parts(&[("a", "b")]), 1024).is_ok());
    }
}
