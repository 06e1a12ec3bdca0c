//! Standard output's records (the access log and security events), written
//! in batches.
//!
//! The access log is on by default and written for every request, so it
//! must cost next to nothing: each record is formatted straight into its
//! worker thread's buffer (no allocation per line; the timestamp's date and
//! time formatted once a second per thread), and a worker hands its buffer
//! to one writer thread when it holds 64 KiB or 100 ms after its first
//! line: one `write` per batch, as nginx's `access_log ... buffer=64k
//! flush=1s`. A worker holding no lines sets no timer.
//!
//! Handing the buffer over whenever the worker went idle (tokio's
//! `on_thread_park`, the first design) woke the writer for every few lines
//! under load: about 7,000 times a second at 74k requests/s, a third thread
//! taking CPU time from two workers on two cores, which put whole benchmark
//! rounds 25–50% above the usual CPU per request. Full 64 KiB batches are
//! about 300 a second at that rate. Security events take the same way
//! (tracing formats them; [`RecordWriter`] appends the line), so the two
//! kinds stay in order and never interleave mid-line.
//!
//! Logging never stalls serving: when the writer is behind (standard output
//! not read: a full pipe, a stuck log shipper) a batch is dropped, its lines
//! counted in `portcullis_log_lines_dropped_total`, with a warning on
//! standard error at most once a second. Threads that do not batch (the
//! control thread) hand each line over at once. A worker's buffer is handed
//! over when the thread ends and at once on SIGHUP ([`flush_all`]), and
//! [`shutdown`] drains the writer.

use std::cell::RefCell;
use std::io::Write as _;
use std::net::IpAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::telemetry::{AccessRecord, LoggedPath};

/// A worker hands its buffer over once it holds this much.
const BATCH_BYTES: usize = 64 * 1024;
/// Bytes waiting for the writer; past it, batches are dropped: about 8k
/// access lines, a few seconds of a stalled reader at full load.
const QUEUE_LIMIT_BYTES: usize = 2 * 1024 * 1024;
/// A worker's lines wait at most this long for the writer (and a tail -f).
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// A batch smaller than this is sent as an exact copy, so that the worker
/// keeps its large buffer and the queue holds only what was written.
const COPY_BELOW: usize = 16 * 1024;

enum Message {
    Batch(Vec<u8>),
    /// Everything sent before has been written: reply when done.
    Drain(SyncSender<()>),
}

struct Writer {
    sender: Sender<Message>,
    json: bool,
    enabled: bool,
}

static WRITER: OnceLock<Writer> = OnceLock::new();
static DROPPED_LINES: AtomicU64 = AtomicU64::new(0);
static QUEUED_BYTES: AtomicUsize = AtomicUsize::new(0);
static LAST_DROP_WARNING: AtomicU64 = AtomicU64::new(0);

/// Starts the writer thread. `enabled`: whether access records are written
/// at all (`[log] level` of `info` or finer); `json`: the format.
pub fn init(json: bool, enabled: bool) {
    let (sender, receiver) = channel();
    // Without the thread nothing is written; the process still serves
    // (batches then count as dropped).
    let _ = std::thread::Builder::new()
        .name("portcullis-records".into())
        .spawn(move || write_batches(receiver));
    let _ = WRITER.set(Writer {
        sender,
        json,
        enabled,
    });
}

/// Lines dropped because standard output was not being read.
pub fn dropped_lines() -> u64 {
    DROPPED_LINES.load(Ordering::Relaxed)
}

fn write_batches(receiver: Receiver<Message>) {
    let stdout = std::io::stdout();
    for message in receiver {
        match message {
            Message::Batch(batch) => {
                // A failed write (stdout closed) cannot be reported on stdout;
                // the lines are gone either way.
                let _ = stdout.lock().write_all(&batch);
                QUEUED_BYTES.fetch_sub(batch.len(), Ordering::Relaxed);
            }
            Message::Drain(done) => {
                let _ = stdout.lock().flush();
                let _ = done.send(());
            }
        }
    }
}

/// Hands every line written so far to the writer and waits (at most
/// `within`) until it has written them: call at exit, after the workers.
pub fn shutdown(within: Duration) {
    flush_this_thread();
    let Some(writer) = WRITER.get() else {
        return;
    };
    let (done, wait) = sync_channel(1);
    if writer.sender.send(Message::Drain(done)).is_ok() {
        let _ = wait.recv_timeout(within);
    }
}

struct LocalBuffer {
    bytes: Vec<u8>,
    lines: u64,
    batching: bool,
    /// The second `date_time` is for, and `YYYY-MM-DDTHH:MM:SS`.
    second: u64,
    date_time: [u8; 19],
    /// A monotonic instant and the wall-clock time (since the epoch) read
    /// just after it: see [`LocalBuffer::wall_clock`].
    clock_anchor: Option<(Instant, Duration)>,
    /// The worker's [`flush_periodically`] while it waits for a first line.
    flusher: Option<Waker>,
}

/// How long a worker dates lines from one reading of the system clock.
const WALL_CLOCK_REREAD: Duration = Duration::from_secs(1);

impl LocalBuffer {
    const fn new() -> Self {
        LocalBuffer {
            bytes: Vec::new(),
            lines: 0,
            batching: false,
            second: u64::MAX,
            date_time: [0; 19],
            clock_anchor: None,
            flusher: None,
        }
    }

    /// The wall-clock time at `at`, a monotonic reading the caller made
    /// anyway: the system clock is read again only once a second per
    /// worker, so a step or slew of the system clock shows in the log
    /// within a second (nginx's cached time is the model).
    fn wall_clock(&mut self, at: Instant) -> Duration {
        if let Some((anchor, wall)) = self.clock_anchor
            && let Some(since) = at.checked_duration_since(anchor)
            && since < WALL_CLOCK_REREAD
        {
            return wall + since;
        }
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.clock_anchor = Some((at, wall));
        wall
    }
}

impl Drop for LocalBuffer {
    fn drop(&mut self) {
        hand_over(self);
    }
}

thread_local! {
    static LOCAL: RefCell<LocalBuffer> = const { RefCell::new(LocalBuffer::new()) };
}

/// Wakes every worker's [`flush_periodically`] at once: see [`flush_all`].
static FLUSH_NOW: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Hands the worker's lines over at most 100 ms after the first of them
/// was written, and at once on [`flush_all`]; spawned on each worker's
/// runtime (the thread must also call [`batch_on_this_thread`]). A worker
/// that holds no lines sets no timer, so an idle proxy does not wake up.
pub async fn flush_periodically() {
    loop {
        // Listening from here on: a flush_all while lines are written or
        // while their 100 ms runs is not missed.
        let flush_now = FLUSH_NOW.notified();
        tokio::pin!(flush_now);
        flush_now.as_mut().enable();
        tokio::select! {
            biased;
            () = flush_now => {}
            () = async {
                lines_held().await;
                tokio::time::sleep(FLUSH_EVERY).await;
            } => {}
        }
        flush_this_thread();
    }
}

/// Ready once this thread's buffer holds a line.
fn lines_held() -> impl Future<Output = ()> {
    std::future::poll_fn(|cx| {
        let held = LOCAL.try_with(|local| {
            let Ok(mut local) = local.try_borrow_mut() else {
                // Only a line being written holds the borrow, and this runs
                // between polls: not reached. Flush 100 ms from now anyway.
                return true;
            };
            if local.bytes.is_empty() {
                local.flusher = Some(cx.waker().clone());
                false
            } else {
                true
            }
        });
        if held.unwrap_or(true) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
}

/// Has every worker hand over the lines it holds now rather than 100 ms
/// after the first of them (SIGHUP: what was served before a reload
/// reaches standard output with the reload). Threads that do not batch
/// hold nothing.
pub fn flush_all() {
    FLUSH_NOW.notify_waiters();
}

/// Makes this thread keep its lines until [`flush_this_thread`] (100 ms
/// after the first on a worker, [`flush_periodically`]) or until 64 KiB.
pub fn batch_on_this_thread() {
    LOCAL.with(|local| {
        if let Ok(mut local) = local.try_borrow_mut() {
            local.batching = true;
            local.bytes.reserve(BATCH_BYTES + 4096);
        }
    });
}

/// Hands this thread's lines to the writer.
pub fn flush_this_thread() {
    let _ = LOCAL.try_with(|local| {
        if let Ok(mut local) = local.try_borrow_mut() {
            hand_over(&mut local);
        }
    });
}

fn hand_over(local: &mut LocalBuffer) {
    if local.bytes.is_empty() {
        return;
    }
    let Some(writer) = WRITER.get() else {
        local.bytes.clear();
        return;
    };
    let lines = std::mem::take(&mut local.lines);
    let len = local.bytes.len();
    if QUEUED_BYTES.fetch_add(len, Ordering::Relaxed) + len > QUEUE_LIMIT_BYTES {
        QUEUED_BYTES.fetch_sub(len, Ordering::Relaxed);
        local.bytes.clear();
        note_dropped(lines);
        return;
    }
    let batch = if len < COPY_BELOW || !local.batching {
        let copy = local.bytes.clone();
        local.bytes.clear();
        copy
    } else {
        std::mem::replace(&mut local.bytes, Vec::with_capacity(BATCH_BYTES + 4096))
    };
    if writer.sender.send(Message::Batch(batch)).is_err() {
        QUEUED_BYTES.fetch_sub(len, Ordering::Relaxed);
        note_dropped(lines);
    }
}

fn note_dropped(lines: u64) {
    DROPPED_LINES.fetch_add(lines, Ordering::Relaxed);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST_DROP_WARNING.load(Ordering::Relaxed);
    if now > last
        && LAST_DROP_WARNING
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            dropped_lines_total = DROPPED_LINES.load(Ordering::Relaxed),
            "standard output is not keeping up: access and security lines were dropped"
        );
    }
}

/// Appends one whole line (a security event tracing formatted).
fn push_line(line: &[u8]) {
    let _ = LOCAL.try_with(|local| {
        let Ok(mut local) = local.try_borrow_mut() else {
            return;
        };
        local.bytes.extend_from_slice(line);
        local.lines += 1;
        after_line(&mut local);
    });
}

fn after_line(local: &mut LocalBuffer) {
    if !local.batching || local.bytes.len() >= BATCH_BYTES {
        hand_over(local);
    } else if let Some(flusher) = local.flusher.take() {
        flusher.wake();
    }
}

/// Writes `record` (its body ended at `ended`, after `bytes` bytes,
/// `duration` after its head arrived).
pub fn write(record: &AccessRecord, bytes: u64, duration: Duration, ended: Instant) {
    let Some(writer) = WRITER.get() else {
        return;
    };
    if !writer.enabled {
        return;
    }
    let json = writer.json;
    let _ = LOCAL.try_with(|local| {
        let Ok(mut local) = local.try_borrow_mut() else {
            return;
        };
        let local = &mut *local;
        let now = local.wall_clock(ended);
        if now.as_secs() != local.second {
            local.second = now.as_secs();
            let text =
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(now.as_secs()))
                    .to_string();
            if let Some(prefix) = text.as_bytes().get(..19) {
                local.date_time.copy_from_slice(prefix);
            }
        }
        let out = &mut local.bytes;
        let micros = now.subsec_micros();
        if json {
            format_json(out, &local.date_time, micros, record, bytes, duration);
        } else {
            format_text(out, &local.date_time, micros, record, bytes, duration);
        }
        local.lines += 1;
        after_line(local);
    });
}

fn timestamp(out: &mut Vec<u8>, date_time: &[u8; 19], micros: u32) {
    out.extend_from_slice(date_time);
    out.push(b'.');
    let mut digits = [b'0'; 6];
    let mut n = micros;
    for slot in digits.iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&digits);
    out.push(b'Z');
}

fn number(out: &mut Vec<u8>, n: u64) {
    let mut buffer = itoa::Buffer::new();
    out.extend_from_slice(buffer.format(n).as_bytes());
}

/// Milliseconds with microsecond precision: `12.345`.
fn millis(out: &mut Vec<u8>, duration: Duration) {
    let micros = duration.as_micros();
    number(out, (micros / 1000) as u64);
    out.push(b'.');
    let fraction = (micros % 1000) as u32;
    out.push(b'0' + (fraction / 100) as u8);
    out.push(b'0' + (fraction / 10 % 10) as u8);
    out.push(b'0' + (fraction % 10) as u8);
}

/// IPv4 octet by octet: `core::fmt` cost about 1,000 instructions per line,
/// a fifth of the whole record. IPv6 keeps the standard text form (zero runs
/// compressed, RFC 5952), which is not worth writing twice.
fn ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (index, octet) in v4.octets().into_iter().enumerate() {
                if index > 0 {
                    out.push(b'.');
                }
                number(out, u64::from(octet));
            }
        }
        IpAddr::V6(_) => {
            let _ = write!(out, "{ip}");
        }
    }
}

/// A JSON string: quotes, backslashes and control characters escaped (the
/// path and route are UTF-8 already; a subject is any string).
fn json_string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    let bytes = text.as_bytes();
    if !bytes.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20) {
        out.extend_from_slice(bytes);
    } else {
        for &b in bytes {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                b if b < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", b);
                }
                b => out.push(b),
            }
        }
    }
    out.push(b'"');
}

fn logged_path(path: &str) -> std::borrow::Cow<'_, str> {
    if path.contains(';') {
        LoggedPath(path).to_string().into()
    } else {
        path.into()
    }
}

fn format_json(
    out: &mut Vec<u8>,
    date_time: &[u8; 19],
    micros: u32,
    record: &AccessRecord,
    bytes: u64,
    duration: Duration,
) {
    out.extend_from_slice(b"{\"timestamp\":\"");
    timestamp(out, date_time, micros);
    out.extend_from_slice(b"\",\"level\":\"INFO\",\"client\":\"");
    ip(out, record.client);
    out.extend_from_slice(b"\",\"method\":");
    json_string(out, record.method.as_str());
    out.extend_from_slice(b",\"path\":");
    json_string(out, &logged_path(&record.path));
    out.extend_from_slice(b",\"route\":");
    json_string(out, &record.route);
    out.extend_from_slice(b",\"status\":");
    number(out, u64::from(record.status));
    out.extend_from_slice(b",\"bytes\":");
    number(out, bytes);
    out.extend_from_slice(b",\"duration_ms\":");
    millis(out, duration);
    if let Some(status) = record.upstream_status {
        out.extend_from_slice(b",\"upstream_status\":");
        number(out, u64::from(status));
    }
    out.extend_from_slice(b",\"tls\":");
    json_string(out, record.tls);
    if let Some(sub) = &record.sub {
        out.extend_from_slice(b",\"sub\":");
        json_string(out, sub);
    }
    out.extend_from_slice(b",\"target\":\"access\"}\n");
}

/// As tracing's text format: `TIMESTAMP  INFO access: client=... ...`.
fn format_text(
    out: &mut Vec<u8>,
    date_time: &[u8; 19],
    micros: u32,
    record: &AccessRecord,
    bytes: u64,
    duration: Duration,
) {
    timestamp(out, date_time, micros);
    out.extend_from_slice(b"  INFO access: client=");
    ip(out, record.client);
    out.extend_from_slice(b" method=");
    out.extend_from_slice(record.method.as_str().as_bytes());
    out.extend_from_slice(b" path=");
    text_value(out, &logged_path(&record.path));
    out.extend_from_slice(b" route=");
    text_value(out, &record.route);
    out.extend_from_slice(b" status=");
    number(out, u64::from(record.status));
    out.extend_from_slice(b" bytes=");
    number(out, bytes);
    out.extend_from_slice(b" duration_ms=");
    millis(out, duration);
    if let Some(status) = record.upstream_status {
        out.extend_from_slice(b" upstream_status=");
        number(out, u64::from(status));
    }
    out.extend_from_slice(b" tls=\"");
    out.extend_from_slice(record.tls.as_bytes());
    out.push(b'"');
    if let Some(sub) = &record.sub {
        out.extend_from_slice(b" sub=");
        let _ = write!(out, "{sub:?}");
    }
    out.push(b'\n');
}

/// A value in the text format: as is, unless a control character would
/// break the line (then Rust's escaping, quoted).
fn text_value(out: &mut Vec<u8>, text: &str) {
    if text.bytes().any(|b| b < 0x20 || b == 0x7f) {
        let _ = write!(out, "{text:?}");
    } else {
        out.extend_from_slice(text.as_bytes());
    }
}

/// tracing's writer for standard output's records (security events): each
/// formatted event becomes one line in the same batches as the access log.
pub struct RecordWriter {
    line: Vec<u8>,
}

impl std::io::Write for RecordWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for RecordWriter {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            push_line(&self.line);
        }
    }
}

/// Makes a [`RecordWriter`] per event.
#[derive(Clone, Copy, Default)]
pub struct Records;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Records {
    type Writer = RecordWriter;

    fn make_writer(&'a self) -> Self::Writer {
        RecordWriter {
            line: Vec::with_capacity(256),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn system_now() -> Duration {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }

    #[test]
    fn lines_are_dated_from_one_system_clock_reading_a_second() {
        let mut local = LocalBuffer::new();
        let start = Instant::now();
        let before = system_now();
        let first = local.wall_clock(start);
        assert!(first >= before && first <= system_now());
        // Within the second: the anchor plus the monotonic distance, exactly.
        let later = start + Duration::from_millis(250);
        assert_eq!(local.wall_clock(later), first + Duration::from_millis(250));
        // An instant before the anchor (read earlier by a slower caller)
        // reads the clock again instead of going back in time.
        let earlier = local.wall_clock(start - Duration::from_millis(5));
        assert!(earlier >= before && earlier <= system_now());
        // A second or more after the anchor: the system clock is read again,
        // so a clock step would show now rather than the anchor's drift.
        let anchor = local.clock_anchor.map(|(at, _)| at);
        let much_later = start + Duration::from_secs(5);
        let reread = local.wall_clock(much_later);
        assert!(
            reread <= system_now(),
            "read from the system clock, not anchor + 5 s"
        );
        assert_eq!(local.clock_anchor.map(|(at, _)| at), Some(much_later));
        assert_ne!(anchor, Some(much_later));
    }

    /// Lines wait 100 ms from the first of them, however long the worker
    /// was idle before: the flusher keeps no tick of its own.
    #[tokio::test(start_paused = true)]
    async fn a_workers_lines_are_handed_over_100_ms_after_the_first() {
        let _alone = FLUSH_ALL_USERS.lock().await;
        batch_on_this_thread();
        let flusher = tokio::spawn(flush_periodically());
        let held = || LOCAL.with(|local| local.borrow().bytes.len());
        // Idle for a while: a ticking flusher would now be 50 ms from a tick.
        tokio::time::sleep(Duration::from_millis(250)).await;
        push_line(b"{\"line\":1}\n");
        tokio::time::sleep(Duration::from_millis(60)).await;
        push_line(b"{\"line\":2}\n");
        tokio::time::sleep(Duration::from_millis(39)).await;
        assert!(
            held() > 0,
            "99 ms after the first line, both are still held"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(held(), 0, "handed over 100 ms after the first line");
        // The next line starts a new 100 ms.
        tokio::time::sleep(Duration::from_millis(500)).await;
        push_line(b"{\"line\":3}\n");
        tokio::time::sleep(Duration::from_millis(99)).await;
        assert!(held() > 0);
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(held(), 0);
        flusher.abort();
    }

    /// [`flush_all`] wakes every thread's flusher: the tests that time a
    /// flusher take turns with the one that calls it.
    static FLUSH_ALL_USERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    #[tokio::test(start_paused = true)]
    async fn flush_all_hands_a_workers_lines_over_before_their_100_ms() {
        let _alone = FLUSH_ALL_USERS.lock().await;
        batch_on_this_thread();
        let flusher = tokio::spawn(flush_periodically());
        // Let the flusher start waiting for a line.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        let started = tokio::time::Instant::now();
        push_line(b"{\"line\":1}\n");
        let held = || LOCAL.with(|local| local.borrow().bytes.len());
        assert!(held() > 0, "a batching thread keeps its line until a flush");
        flush_all();
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        assert_eq!(held(), 0, "the line was handed over");
        assert_eq!(
            tokio::time::Instant::now(),
            started,
            "by the request, not after 100 ms"
        );
        flusher.abort();
    }

    #[test]
    fn addresses_are_written_as_std_formats_them() {
        let samples: [IpAddr; 8] = [
            "0.0.0.0".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
            "255.255.255.255".parse().unwrap(),
            "10.9.99.100".parse().unwrap(),
            "192.168.1.20".parse().unwrap(),
            "::1".parse().unwrap(),
            "2001:db8::8:800:200c:417a".parse().unwrap(),
            "::ffff:192.0.2.1".parse().unwrap(),
        ];
        for address in samples {
            let mut out = Vec::new();
            ip(&mut out, address);
            assert_eq!(out, address.to_string().into_bytes(), "{address}");
        }
        for octet in 0..=255u8 {
            let address = IpAddr::from([octet, 0, 9, octet]);
            let mut out = Vec::new();
            ip(&mut out, address);
            assert_eq!(out, address.to_string().into_bytes());
        }
    }

    fn record() -> AccessRecord {
        AccessRecord {
            client: "192.0.2.7".parse().unwrap(),
            method: http::Method::GET,
            path: "/a\"b\\c;jsessionid=SECRET/d".into(),
            route: Arc::from("/a"),
            status: 200,
            upstream_status: Some(201),
            tls: "1.3",
            sub: Some("al\nice".into()),
        }
    }

    #[test]
    fn json_lines_parse_and_carry_every_field() {
        let mut out = Vec::new();
        format_json(
            &mut out,
            b"2026-12-03T14:23:03",
            42,
            &record(),
            1234,
            Duration::from_micros(12_345),
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with('\n'));
        let value: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(value["timestamp"], "2026-12-03T14:23:03.000042Z");
        assert_eq!(value["level"], "INFO");
        assert_eq!(value["target"], "access");
        assert_eq!(value["client"], "192.0.2.7");
        assert_eq!(value["method"], "GET");
        assert_eq!(value["path"], "/a\"b\\c;jsessionid/d");
        assert_eq!(value["route"], "/a");
        assert_eq!(value["status"], 200);
        assert_eq!(value["bytes"], 1234);
        assert_eq!(value["duration_ms"], 12.345);
        assert_eq!(value["upstream_status"], 201);
        assert_eq!(value["tls"], "1.3");
        assert_eq!(value["sub"], "al\nice");
        assert!(!text.contains("SECRET"));

        let mut bare = record();
        bare.upstream_status = None;
        bare.sub = None;
        let mut out = Vec::new();
        format_json(
            &mut out,
            b"2026-12-03T14:23:03",
            0,
            &bare,
            0,
            Duration::ZERO,
        );
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(value.get("upstream_status").is_none());
        assert!(value.get("sub").is_none());
        assert_eq!(value["duration_ms"], 0.0);
    }

    #[test]
    fn text_lines_stay_one_line() {
        let mut out = Vec::new();
        format_text(
            &mut out,
            b"2026-12-03T14:23:03",
            7,
            &record(),
            5,
            Duration::from_micros(1_000_001),
        );
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        assert!(
            text.starts_with(
                "2026-12-03T14:23:03.000007Z  INFO access: client=192.0.2.7 method=GET"
            )
        );
        assert!(text.contains(" status=200 bytes=5 duration_ms=1000.001 upstream_status=201 tls=\"1.3\" sub=\"al\\nice\""), "{text}");
        assert!(!text.contains("SECRET"));
    }
}
