//! One request on one upstream connection: the head and the streamed body
//! are written while the response head is read, so that an early answer is
//! heard before the request is finished.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http::{HeaderMap, Method, StatusCode};
use http_body::Body;

use super::codec::{self, RequestFraming};
use super::pool::Connection;
use super::{SendError, UpstreamBody};

/// Read buffer reserved for a response: most heads and small bodies arrive
/// in one read.
const READ_BUFFER_BYTES: usize = 8 * 1024;
/// Request body pieces queued for one vectored write.
const MAX_WRITE_SLICES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub(super) enum ExchangeError {
    #[error("writing the request: {0}")]
    Write(io::Error),
    #[error("reading the response: {0}")]
    Read(io::Error),
    #[error("the upstream closed the connection before a response")]
    Closed,
    #[error("{0}")]
    Head(#[from] codec::HeadError),
    #[error("101 Switching Protocols to a request that asked for no upgrade")]
    UnaskedUpgrade,
    #[error("more than {MAX_INTERIM_RESPONSES} interim (1xx) responses before the final one")]
    TooManyInterim,
}

/// Interim responses (100 Continue, 103 Early Hints) skipped before the
/// final one: a real upstream sends one or two; an endless stream of them
/// would hold the request (and its worker's attention) for ever.
pub(super) const MAX_INTERIM_RESPONSES: usize = 8;

/// One request on one connection: writes the head and streams the body
/// while reading the response head, so an upstream that answers early (a
/// 413 before reading a large upload) is heard at once.
pub(super) struct Exchange<'a> {
    connection: &'a mut Connection,
    head: &'a [u8],
    /// How much of `head` the socket has accepted.
    head_written: usize,
    body: &'a mut UpstreamBody,
    framing: RequestFraming,
    /// Body bytes (with chunk framing) taken from the client, not yet written.
    body_pending: Vec<Bytes>,
    pub(super) body_started: bool,
    body_done: bool,
    /// Request bytes the socket has accepted.
    pub(super) written: usize,
    pub(super) response_started: bool,
    method: &'a Method,
    /// Memory for the response's header map.
    spare_headers: &'a mut HeaderMap,
    /// Why the request could not be written in full; the response is still
    /// read.
    write_error: Option<io::Error>,
    interim_responses: usize,
}

impl<'a> Exchange<'a> {
    pub(super) fn new(
        connection: &'a mut Connection,
        head: &'a [u8],
        body: &'a mut UpstreamBody,
        framing: RequestFraming,
        method: &'a Method,
        spare_headers: &'a mut HeaderMap,
    ) -> Self {
        Exchange {
            connection,
            head,
            head_written: 0,
            body,
            framing,
            body_pending: Vec::new(),
            body_started: false,
            body_done: framing == RequestFraming::Empty,
            written: 0,
            response_started: false,
            method,
            spare_headers,
            write_error: None,
            interim_responses: 0,
        }
    }

    pub(super) fn request_finished(&self) -> bool {
        self.head_written == self.head.len() && self.body_pending.is_empty() && self.body_done
    }

    pub(super) fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<codec::ResponseHead, SendError>> {
        if self.write_error.is_none() && !self.request_finished() {
            // Pending here only means the request waits (on the socket or the
            // client's body); the response may still come.
            match self.poll_write_request(cx) {
                // An upstream that answered and closed before taking the
                // whole request (a 413 to a large upload) makes the write
                // fail; its answer may be waiting to be read all the same.
                Poll::Ready(Err(SendError::Exchange(ExchangeError::Write(error)))) => {
                    self.write_error = Some(error);
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(())) | Poll::Pending => {}
            }
        }
        match self.poll_read_head(cx) {
            // No answer after all: the write's failure is the one to report
            // (it decides whether a stale pooled connection is retried).
            Poll::Ready(Err(_)) if self.write_error.is_some() => {
                let error = self
                    .write_error
                    .take()
                    .unwrap_or_else(|| io::ErrorKind::BrokenPipe.into());
                Poll::Ready(Err(SendError::Exchange(ExchangeError::Write(error))))
            }
            polled => polled,
        }
    }

    fn poll_write_request(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        loop {
            let head_rest = &self.head[self.head_written..];
            if !head_rest.is_empty() || !self.body_pending.is_empty() {
                let written = {
                    let mut slices = [io::IoSlice::new(&[]); MAX_WRITE_SLICES + 1];
                    let mut count = 0;
                    if !head_rest.is_empty() {
                        slices[0] = io::IoSlice::new(head_rest);
                        count = 1;
                    }
                    for piece in self.body_pending.iter().take(MAX_WRITE_SLICES) {
                        slices[count] = io::IoSlice::new(piece);
                        count += 1;
                    }
                    ready!(crate::socket::poll_write_slices(
                        Pin::new(&mut self.connection.stream),
                        cx,
                        &slices[..count]
                    ))
                    .map_err(|e| SendError::Exchange(ExchangeError::Write(e)))?
                };
                if written == 0 {
                    return Poll::Ready(Err(SendError::Exchange(ExchangeError::Write(
                        io::ErrorKind::WriteZero.into(),
                    ))));
                }
                self.written += written;
                self.consume_written(written);
                continue;
            }
            if self.body_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut *self.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    self.body_started = true;
                    // Trailers are not forwarded: few HTTP/1.1 upstreams read them.
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        if self.framing == RequestFraming::Chunked {
                            self.body_pending
                                .push(Bytes::from(format!("{:x}\r\n", data.len())));
                            self.body_pending.push(data);
                            self.body_pending.push(Bytes::from_static(b"\r\n"));
                        } else {
                            self.body_pending.push(data);
                        }
                    }
                }
                None => {
                    self.body_done = true;
                    if self.framing == RequestFraming::Chunked {
                        self.body_pending.push(Bytes::from_static(b"0\r\n\r\n"));
                    }
                }
                Some(Err(error)) => {
                    self.body_started = true;
                    return Poll::Ready(Err(SendError::Body(error)));
                }
            }
        }
    }

    fn consume_written(&mut self, mut written: usize) {
        let from_head = written.min(self.head.len() - self.head_written);
        self.head_written += from_head;
        written -= from_head;
        let mut whole = 0;
        for piece in &mut self.body_pending {
            if written == 0 {
                break;
            }
            let taken = written.min(piece.len());
            piece.advance(taken);
            written -= taken;
            if piece.is_empty() {
                whole += 1;
            }
        }
        self.body_pending.drain(..whole);
    }

    fn poll_read_head(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<codec::ResponseHead, SendError>> {
        loop {
            if !self.connection.read_buffer.is_empty() {
                self.response_started = true;
                match codec::parse_response_head(
                    &mut self.connection.read_buffer,
                    self.method,
                    self.spare_headers,
                ) {
                    Ok(Some(head))
                        if head.status.is_informational()
                            && head.status != StatusCode::SWITCHING_PROTOCOLS =>
                    {
                        // 100 Continue, 103 Early Hints: the final answer follows.
                        self.interim_responses += 1;
                        if self.interim_responses > MAX_INTERIM_RESPONSES {
                            return Poll::Ready(Err(SendError::Exchange(
                                ExchangeError::TooManyInterim,
                            )));
                        }
                        continue;
                    }
                    Ok(Some(head)) => return Poll::Ready(Ok(head)),
                    Ok(None) => {}
                    Err(error) => {
                        return Poll::Ready(Err(SendError::Exchange(error.into())));
                    }
                }
            }
            let read = ready!(self.connection.poll_read_more(cx, READ_BUFFER_BYTES))
                .map_err(|e| SendError::Exchange(ExchangeError::Read(e)))?;
            if read == 0 {
                return Poll::Ready(Err(SendError::Exchange(ExchangeError::Closed)));
            }
        }
    }
}
