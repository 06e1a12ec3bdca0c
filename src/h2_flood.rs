//! A guard against HTTP/2 control-frame floods: PING, SETTINGS and PRIORITY
//! frames sent only to make the proxy work (CVE-2019-9512 "ping flood",
//! CVE-2019-9515 "settings flood", CVE-2019-9513's PRIORITY churn).
//!
//! The h2 crate answers each PING and SETTINGS with an ACK, but holds at
//! most one unsent answer, so a flood costs CPU rather than memory, and h2
//! has no knob to refuse one. [`ControlFrameGuard`] sits between the
//! decrypted TLS stream and hyper on HTTP/2 connections, follows the frame
//! boundaries of what the client sends (a 9-byte header, then the payload
//! it announces) without decoding anything else, and counts the frames
//! that carry no request. Past [`MAX_CONTROL_FRAMES`] within
//! [`CONTROL_WINDOW`] it stops reading and tells the connection's driver
//! through [`Activity::cut_off_flood`], which closes the connection.
//!
//! Browsers send one SETTINGS frame and a handful of PINGs and PRIORITYs per
//! connection; h2 itself sends the ACKs, which are not counted (only frames
//! without the ACK flag are). A malformed frame header does not matter here:
//! h2 reads the same bytes and ends the connection on it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, ReadBuf};

use crate::connection::Activity;
use crate::socket::ResetOnClose;

/// Control frames a client may send within one [`CONTROL_WINDOW`].
pub const MAX_CONTROL_FRAMES: u32 = 1_000;
/// The period [`MAX_CONTROL_FRAMES`] is counted over.
pub const CONTROL_WINDOW: Duration = Duration::from_secs(10);

/// The client connection preface (RFC 9113 §3.4), before the first frame.
const PREFACE_LEN: u32 = 24;
const FRAME_HEADER_LEN: usize = 9;
const PRIORITY: u8 = 0x2;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

/// Where the counter stands in the client's byte stream.
#[derive(Debug, Clone, Copy)]
enum Position {
    /// Bytes of something that is not a frame header left to skip: the
    /// preface, then each frame's payload.
    Skipping(u32),
    /// Part of a frame header read so far.
    Header([u8; FRAME_HEADER_LEN], usize),
}

/// The pure part: fed the client's bytes in order, it says when the
/// client has sent too many control frames.
#[derive(Debug)]
pub struct ControlFrameCounter {
    position: Position,
    window_started: Option<Instant>,
    in_window: u32,
}

impl Default for ControlFrameCounter {
    fn default() -> Self {
        ControlFrameCounter {
            position: Position::Skipping(PREFACE_LEN),
            window_started: None,
            in_window: 0,
        }
    }
}

impl ControlFrameCounter {
    /// Reads `bytes`; false once the client is flooding. `now` is asked
    /// only when a control frame arrives.
    pub fn feed(&mut self, mut bytes: &[u8], now: impl Fn() -> Instant) -> bool {
        while !bytes.is_empty() {
            match &mut self.position {
                Position::Skipping(left) => {
                    let skipped = (*left as usize).min(bytes.len());
                    bytes = &bytes[skipped..];
                    *left -= skipped as u32;
                    if *left == 0 {
                        self.position = Position::Header([0; FRAME_HEADER_LEN], 0);
                    }
                }
                Position::Header(header, have) => {
                    let taken = (FRAME_HEADER_LEN - *have).min(bytes.len());
                    header[*have..*have + taken].copy_from_slice(&bytes[..taken]);
                    *have += taken;
                    bytes = &bytes[taken..];
                    if *have < FRAME_HEADER_LEN {
                        return true;
                    }
                    let header = *header;
                    let payload = u32::from_be_bytes([0, header[0], header[1], header[2]]);
                    self.position = if payload == 0 {
                        Position::Header([0; FRAME_HEADER_LEN], 0)
                    } else {
                        Position::Skipping(payload)
                    };
                    if is_control(header[3], header[4]) && !self.count(&now) {
                        return false;
                    }
                }
            }
        }
        true
    }

    fn count(&mut self, now: &impl Fn() -> Instant) -> bool {
        let now = now();
        match self.window_started {
            Some(started) if now.duration_since(started) < CONTROL_WINDOW => {
                self.in_window += 1;
            }
            _ => {
                self.window_started = Some(now);
                self.in_window = 1;
            }
        }
        self.in_window <= MAX_CONTROL_FRAMES
    }
}

fn is_control(kind: u8, flags: u8) -> bool {
    match kind {
        PING | SETTINGS => flags & ACK == 0,
        PRIORITY => true,
        _ => false,
    }
}

/// The client's HTTP/2 stream, read through a [`ControlFrameCounter`].
pub struct ControlFrameGuard<IO: ResetOnClose> {
    io: IO,
    counter: ControlFrameCounter,
    activity: Arc<Activity>,
    flooded: bool,
}

impl<IO: ResetOnClose> ControlFrameGuard<IO> {
    pub fn new(io: IO, activity: Arc<Activity>) -> Self {
        ControlFrameGuard {
            io,
            counter: ControlFrameCounter::default(),
            activity,
            flooded: false,
        }
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: ResetOnClose> Drop for ControlFrameGuard<IO> {
    fn drop(&mut self) {
        // A flood, or a rapid reset judged by the pipeline: the client is
        // still sending, and nothing it sends will be read.
        if self.flooded || self.activity.was_cut_off() {
            self.io.reset_on_close();
        }
    }
}

impl<IO: ResetOnClose + AsyncRead + Unpin> AsyncRead for ControlFrameGuard<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.flooded {
            // Nothing more is read; the driver, told once, drops the connection.
            return Poll::Pending;
        }
        let already_filled = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result
            && !this
                .counter
                .feed(&buf.filled()[already_filled..], Instant::now)
        {
            this.flooded = true;
            this.activity.cut_off_flood();
            // The bytes just read are handed over: they hold at most the
            // flood's own frames, which h2 answers before the driver acts.
        }
        result
    }
}

crate::socket::pass_writes_through!(ControlFrameGuard<IO>, ResetOnClose);

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = len.to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, flags, 0, 0, 0, 0]);
        out.extend_from_slice(payload);
        out
    }

    fn feed_all(counter: &mut ControlFrameCounter, bytes: &[u8], at: Instant) -> bool {
        counter.feed(bytes, || at)
    }

    #[test]
    fn a_ping_flood_trips_past_the_limit_within_the_window() {
        let t0 = Instant::now();
        let mut counter = ControlFrameCounter::default();
        assert!(feed_all(&mut counter, PREFACE, t0));
        let ping = frame(PING, 0, b"abusive!");
        for _ in 0..MAX_CONTROL_FRAMES {
            assert!(feed_all(&mut counter, &ping, t0));
        }
        assert!(!feed_all(&mut counter, &ping, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn acks_data_and_headers_are_not_counted() {
        let t0 = Instant::now();
        let mut counter = ControlFrameCounter::default();
        let mut stream = PREFACE.to_vec();
        for _ in 0..(MAX_CONTROL_FRAMES * 3) {
            stream.extend(frame(PING, ACK, b"answered"));
            stream.extend(frame(SETTINGS, ACK, b""));
            stream.extend(frame(0x0, 0, &[7; 300])); // DATA
            stream.extend(frame(0x1, 0x4, &[0x82])); // HEADERS
            stream.extend(frame(0x8, 0, &[0, 0, 1, 0])); // WINDOW_UPDATE
        }
        assert!(feed_all(&mut counter, &stream, t0));
    }

    #[test]
    fn frames_split_anywhere_are_counted_once() {
        let t0 = Instant::now();
        let mut stream = PREFACE.to_vec();
        for _ in 0..=MAX_CONTROL_FRAMES {
            stream.extend(frame(SETTINGS, 0, &[0, 4, 0, 1, 0, 0]));
            stream.extend(frame(0x0, 0, &[1; 17]));
        }
        for piece in [1, 2, 5, 9, 10, 31, 4096] {
            let mut counter = ControlFrameCounter::default();
            let mut verdicts = stream.chunks(piece).map(|c| feed_all(&mut counter, c, t0));
            let tripped_at = verdicts.position(|ok| !ok);
            assert!(tripped_at.is_some(), "piece {piece}: never tripped");
            // One frame fewer never trips.
            let mut counter = ControlFrameCounter::default();
            let last_pair = (FRAME_HEADER_LEN + 6) + (FRAME_HEADER_LEN + 17);
            let short = &stream[..stream.len() - last_pair];
            assert!(
                short.chunks(piece).all(|c| feed_all(&mut counter, c, t0)),
                "piece {piece}: tripped early"
            );
        }
    }

    #[test]
    fn a_steady_trickle_never_trips() {
        let t0 = Instant::now();
        let mut counter = ControlFrameCounter::default();
        assert!(feed_all(&mut counter, PREFACE, t0));
        let priority = frame(PRIORITY, 0, &[0, 0, 0, 0, 16]);
        // 500 frames every 6 s: under the limit in every 10 s window
        // this counter opens.
        for round in 0..20u64 {
            let at = t0 + Duration::from_secs(6 * round);
            for _ in 0..500 {
                assert!(feed_all(&mut counter, &priority, at), "round {round}");
            }
        }
    }
}
