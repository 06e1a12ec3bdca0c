//! The upstream's response body: read from the upstream connection as the
//! client side asks for more, decoded by the response's framing, and the
//! connection handed back to the pool once the body has been read to the end
//! (or kept for a tunnel after a `101`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body::{Body, Frame, SizeHint};

use super::codec::{self, BodyFraming, ChunkedDecoder, Decoded};
use super::exchange::ExchangeError;
use super::pool::{Connection, Pool};
use super::{SendError, UpstreamUpgrade};

/// Reads of a large body.
const BODY_READ_BYTES: usize = 32 * 1024;

/// The response with its body reading on from `connection`.
pub(super) fn response(
    pool: &Arc<Pool>,
    connection: Connection,
    head: codec::ResponseHead,
    request_finished: bool,
    upgrade: bool,
) -> Result<Response<UpstreamResponseBody>, SendError> {
    let mut response = Response::new(UpstreamResponseBody::empty());
    *response.status_mut() = head.status;
    *response.version_mut() = head.version;
    *response.headers_mut() = head.headers;
    if head.status == StatusCode::SWITCHING_PROTOCOLS {
        if !upgrade {
            return Err(SendError::Exchange(ExchangeError::UnaskedUpgrade));
        }
        *response.body_mut() = UpstreamResponseBody {
            connection: Some(connection),
            decoding: Decoding::Upgraded,
            give_back: None,
            in_flight: None,
        };
        return Ok(response);
    }
    // An upstream that answered before it had the whole request body
    // leaves the connection in an unknown state.
    let reusable = head.keep_alive && request_finished;
    let decoding = match head.framing {
        BodyFraming::Empty => Decoding::Done,
        BodyFraming::Length(0) => Decoding::Done,
        BodyFraming::Length(left) => Decoding::Length(left),
        BodyFraming::Chunked => Decoding::Chunked(ChunkedDecoder::default()),
        BodyFraming::UntilClose => Decoding::UntilClose,
    };
    let mut body = UpstreamResponseBody {
        connection: Some(connection),
        decoding,
        give_back: reusable.then(|| pool.clone()),
        in_flight: None,
    };
    if body.is_end_stream() {
        body.release();
    }
    *response.body_mut() = body;
    Ok(response)
}

enum Decoding {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    Done,
    /// After a 101: no body; the connection is the tunnel's.
    Upgraded,
}

/// The upstream's response body, read from its connection as the client
/// side asks for it; gives the connection back to the pool when read to the
/// end.
pub struct UpstreamResponseBody {
    connection: Option<Connection>,
    decoding: Decoding,
    /// Set when the connection may carry another request afterwards.
    give_back: Option<Arc<Pool>>,
    /// Counts the request as in flight to its server until the body ends.
    in_flight: Option<InFlight>,
}

/// One request in flight to one server, counted in its pool (this worker's
/// `least_request` count) until dropped.
pub(super) struct InFlight(Arc<Pool>);

impl InFlight {
    pub(super) fn begin(pool: &Arc<Pool>) -> Self {
        pool.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(pool.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl UpstreamResponseBody {
    fn empty() -> Self {
        UpstreamResponseBody {
            connection: None,
            decoding: Decoding::Done,
            give_back: None,
            in_flight: None,
        }
    }

    /// Keeps `in_flight` counted until the body has been read to the end
    /// (or dropped); done at once if it already has.
    pub(super) fn hold(&mut self, in_flight: InFlight) {
        if self.connection.is_some()
            && !matches!(self.decoding, Decoding::Done | Decoding::Upgraded)
        {
            self.in_flight = Some(in_flight);
        }
    }

    /// The upstream connection after a `101 Switching Protocols`.
    pub fn take_upgrade(&mut self) -> Option<UpstreamUpgrade> {
        if !matches!(self.decoding, Decoding::Upgraded) {
            return None;
        }
        let mut connection = self.connection.take()?;
        Some(UpstreamUpgrade {
            early_data: connection.read_buffer.split().freeze(),
            stream: connection.stream,
        })
    }

    fn release(&mut self) {
        self.in_flight = None;
        let connection = self.connection.take();
        if let (Some(connection), Some(pool)) = (connection, self.give_back.take()) {
            pool.give_back(connection);
        }
    }

    fn fail(&mut self, error: io::Error) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.give_back = None;
        self.in_flight = None;
        self.connection = None;
        self.decoding = Decoding::Done;
        Poll::Ready(Some(Err(error)))
    }
}

fn invalid_data(error: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error.to_string())
}

impl Body for UpstreamResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            let Some(connection) = this.connection.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.decoding {
                Decoding::Upgraded => return Poll::Ready(None),
                Decoding::Done => {
                    this.release();
                    return Poll::Ready(None);
                }
                Decoding::Length(left) => {
                    let buffer = &mut connection.read_buffer;
                    if !buffer.is_empty() {
                        let take =
                            usize::try_from(*left).map_or(buffer.len(), |l| l.min(buffer.len()));
                        let data = buffer.split_to(take).freeze();
                        *left -= take as u64;
                        if *left == 0 {
                            this.decoding = Decoding::Done;
                            this.release();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Decoding::Chunked(decoder) => match decoder.decode(&mut connection.read_buffer) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::Done) => {
                        this.decoding = Decoding::Done;
                        continue;
                    }
                    Ok(Decoded::NeedMore) => {}
                    Err(error) => return this.fail(invalid_data(error)),
                },
                Decoding::UntilClose => {
                    if !connection.read_buffer.is_empty() {
                        let data = connection.read_buffer.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            let Some(connection) = this.connection.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(connection.poll_read_more(cx, BODY_READ_BYTES)) {
                Ok(0) if matches!(this.decoding, Decoding::UntilClose) => {
                    this.decoding = Decoding::Done;
                    this.give_back = None;
                }
                Ok(0) => {
                    return this.fail(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection before the end of the body",
                    ));
                }
                Ok(_) => {}
                Err(error) => return this.fail(error),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.decoding, Decoding::Done | Decoding::Upgraded)
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoding {
            Decoding::Done | Decoding::Upgraded => SizeHint::with_exact(0),
            Decoding::Length(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }
}
