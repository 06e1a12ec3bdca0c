//! Whether each upstream server takes requests: the active checks' verdict
//! and the passive ejections, shared by every worker through atomics.
//!
//! The request path only loads two atomics per candidate server (and writes
//! one after a failure, or after the first success that follows failures);
//! the one lock, the group's ejection lock, is taken only when a server
//! reaches `eject.consecutive_failures`, so that two workers ejecting at once
//! cannot together eject more than half of the group.
//!
//! The active checks ([`start_checks`]) run on a thread of their own, one
//! task per server: `GET path` every `interval`, a verdict after `healthy`
//! successes or `unhealthy` failures in a row. A reload hands the same
//! [`ServerHealth`] to the new generation for every server that stays.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::background::Background;

use crate::config::{Eject, HealthCheck, ServerAddress};

use super::stream::UpstreamStream;

/// The longest ejection, however often a server keeps failing (Envoy's
/// `max_ejection_time` default), unless `duration` itself is longer.
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// Milliseconds since the process's first use of this clock: what the
/// atomics store.
pub(super) fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One server's state, shared by every worker and kept across reloads.
pub struct ServerHealth {
    pub address: ServerAddress,
    /// As written in `proxy.toml`: the `server` label.
    pub label: Arc<str>,
    /// The active checks' verdict; true until a check says otherwise.
    checks_pass: AtomicBool,
    /// [`now_ms`] until which the server is ejected; 0 when it is not.
    ejected_until: AtomicU64,
    /// Failures seen by requests since the last success.
    failures: AtomicU32,
    /// Ejections since the last success: each one lasts twice the previous.
    ejections: AtomicU32,
}

impl ServerHealth {
    pub fn new(address: ServerAddress) -> Self {
        ServerHealth {
            label: Arc::from(address.to_string()),
            address,
            checks_pass: AtomicBool::new(true),
            ejected_until: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
        }
    }

    /// Takes requests now: checks pass and not ejected.
    pub fn available(&self, now: &mut LazyNow) -> bool {
        self.checks_pass.load(Ordering::Relaxed) && !self.ejected(now)
    }

    fn ejected(&self, now: &mut LazyNow) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && until > now.get()
    }
}

/// The clock read at most once per decision, and only when an ejection
/// needs comparing.
#[derive(Default)]
pub struct LazyNow(Option<u64>);

impl LazyNow {
    pub fn get(&mut self) -> u64 {
        *self.0.get_or_insert_with(now_ms)
    }
}

/// The servers of one group.
pub struct GroupHealth {
    pub name: Arc<str>,
    pub servers: Vec<Arc<ServerHealth>>,
    eject: Eject,
    eject_lock: Mutex<()>,
}

impl GroupHealth {
    pub fn new(name: Arc<str>, servers: Vec<Arc<ServerHealth>>, eject: Eject) -> Self {
        GroupHealth {
            name,
            servers,
            eject,
            eject_lock: Mutex::new(()),
        }
    }

    /// Some server takes requests now.
    pub fn any_available(&self) -> bool {
        let mut now = LazyNow::default();
        self.servers.iter().any(|s| s.available(&mut now))
    }

    /// A request got an answer that is not 502, 503 or 504.
    pub fn record_success(&self, index: usize) {
        let Some(server) = self.servers.get(index) else {
            return;
        };
        // Loads first: the common case writes nothing shared.
        if server.failures.load(Ordering::Relaxed) != 0 {
            server.failures.store(0, Ordering::Relaxed);
        }
        if server.ejections.load(Ordering::Relaxed) != 0 {
            server.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// A connect error, a reset, a timeout or a 502/503/504 answer.
    pub fn record_failure(&self, index: usize) {
        let Some(server) = self.servers.get(index) else {
            return;
        };
        let failures = server.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= self.eject.consecutive_failures {
            self.try_eject(index);
        }
    }

    fn try_eject(&self, index: usize) {
        let _guard = self
            .eject_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut now = LazyNow::default();
        let Some(server) = self.servers.get(index) else {
            return;
        };
        if server.ejected(&mut now) {
            return;
        }
        let ejected = self.servers.iter().filter(|s| s.ejected(&mut now)).count();
        // A bad check (or a bad deploy answering 503 everywhere) must not
        // empty the group: at most half of it is ever ejected.
        if ejected + 1 > self.servers.len() / 2 {
            server.failures.store(0, Ordering::Relaxed);
            tracing::debug!(
                upstream = %self.name,
                server = %server.label,
                "not ejected: half of the group is ejected already"
            );
            return;
        }
        let previous = server.ejections.fetch_add(1, Ordering::Relaxed);
        let length = ejection_length(self.eject.duration, previous);
        let until = now.get() + u64::try_from(length.as_millis()).unwrap_or(u64::MAX / 2);
        server.ejected_until.store(until, Ordering::Relaxed);
        server.failures.store(0, Ordering::Relaxed);
        tracing::warn!(
            upstream = %self.name,
            server = %server.label,
            ejected_for = ?length,
            "upstream server ejected after consecutive failures"
        );
    }
}

/// `base`, doubled for every ejection before it, capped.
fn ejection_length(base: Duration, previous: u32) -> Duration {
    let cap = MAX_EJECTION.max(base);
    base.checked_mul(1u32 << previous.min(16))
        .unwrap_or(cap)
        .min(cap)
}

/// What the checker needs of one group.
pub struct CheckedGroup {
    pub health: Arc<GroupHealth>,
    pub check: HealthCheck,
    /// The `Host` of a check on a Unix socket (TCP servers get their own).
    pub default_host: String,
}

/// Starts the active health checks of one runtime generation, one task
/// per server; dropping the handle stops them.
pub fn start_checks(groups: Vec<CheckedGroup>) -> std::io::Result<Background> {
    Background::start("portcullis-health", move || async move {
        let mut tasks = tokio::task::JoinSet::new();
        for group in &groups {
            for server in &group.health.servers {
                tasks.spawn(check_loop(
                    group.health.name.clone(),
                    server.clone(),
                    group.check.clone(),
                    group.default_host.clone(),
                ));
            }
        }
        // The tasks run until the handle is dropped (then this future and
        // the JoinSet with it, which aborts them).
        while tasks.join_next().await.is_some() {}
    })
}

async fn check_loop(group: Arc<str>, server: Arc<ServerHealth>, check: HealthCheck, host: String) {
    let host = match &server.address {
        ServerAddress::Tcp(authority) => authority.to_string(),
        ServerAddress::Unix(_) => host,
    };
    let mut tick = tokio::time::interval(check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut streak = Streak::default();
    loop {
        tick.tick().await;
        let outcome = probe(&server.address, &check.path, &host, check.timeout).await;
        let passing = server.checks_pass.load(Ordering::Relaxed);
        if let Some(verdict) = streak.record(outcome.is_ok(), passing, &check) {
            server.checks_pass.store(verdict, Ordering::Relaxed);
            if verdict {
                tracing::warn!(upstream = %group, server = %server.label, "upstream server is healthy again");
            } else {
                let why = outcome.err().unwrap_or_default();
                tracing::warn!(upstream = %group, server = %server.label, why, "upstream server is unhealthy");
            }
        }
    }
}

/// Successes or failures in a row.
#[derive(Default)]
struct Streak {
    successes: u32,
    failures: u32,
}

impl Streak {
    /// The new verdict, when this result changes it.
    fn record(&mut self, ok: bool, passing: bool, check: &HealthCheck) -> Option<bool> {
        if ok {
            self.successes += 1;
            self.failures = 0;
            (!passing && self.successes >= check.healthy).then_some(true)
        } else {
            self.failures += 1;
            self.successes = 0;
            (passing && self.failures >= check.unhealthy).then_some(false)
        }
    }
}

/// One `GET path`: `Ok` on a 2xx or 3xx status line within `timeout`.
async fn probe(
    server: &ServerAddress,
    path: &str,
    host: &str,
    timeout: Duration,
) -> Result<(), String> {
    let attempt = async {
        let mut stream = UpstreamStream::connect(server)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: portcullis-health-check\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("cannot send the check: {e}"))?;
        let mut head = Vec::with_capacity(64);
        let mut buffer = [0u8; 256];
        while !head.contains(&b'\n') && head.len() < 1024 {
            let read = stream
                .read(&mut buffer)
                .await
                .map_err(|e| format!("cannot read the answer: {e}"))?;
            if read == 0 {
                break;
            }
            head.extend_from_slice(&buffer[..read]);
        }
        match status_of(&head) {
            Some(status) if (200..400).contains(&status) => Ok(()),
            Some(status) => Err(format!("the check answered {status}")),
            None => Err("the check's answer is not HTTP".to_string()),
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// The status code of an HTTP/1.x status line.
fn status_of(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let mut words = line.split(|&b| b == b' ');
    if !words.next()?.starts_with(b"HTTP/1.") {
        return None;
    }
    std::str::from_utf8(words.next()?).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(n: usize, failures: u32) -> GroupHealth {
        let servers = (0..n)
            .map(|i| {
                Arc::new(ServerHealth::new(ServerAddress::Tcp(
                    format!("10.0.0.{i}:80").parse().unwrap(),
                )))
            })
            .collect();
        GroupHealth::new(
            Arc::from("default"),
            servers,
            Eject {
                consecutive_failures: failures,
                duration: Duration::from_secs(30),
            },
        )
    }

    fn available(group: &GroupHealth) -> Vec<bool> {
        let mut now = LazyNow::default();
        group
            .servers
            .iter()
            .map(|s| s.available(&mut now))
            .collect()
    }

    #[test]
    fn a_server_is_ejected_after_consecutive_failures_only() {
        let g = group(4, 3);
        g.record_failure(1);
        g.record_failure(1);
        g.record_success(1);
        g.record_failure(1);
        g.record_failure(1);
        assert_eq!(available(&g), [true; 4]);
        g.record_failure(1);
        assert_eq!(available(&g), [true, false, true, true]);
    }

    #[test]
    fn never_more_than_half_of_a_group_is_ejected() {
        let g = group(5, 1);
        for i in 0..5 {
            g.record_failure(i);
        }
        assert_eq!(available(&g).iter().filter(|a| !**a).count(), 2);
        let one = group(1, 1);
        one.record_failure(0);
        assert_eq!(available(&one), [true]);
    }

    #[test]
    fn ejections_double_while_failing_and_are_capped() {
        let base = Duration::from_secs(30);
        assert_eq!(ejection_length(base, 0), base);
        assert_eq!(ejection_length(base, 1), base * 2);
        assert_eq!(ejection_length(base, 3), base * 8);
        assert_eq!(ejection_length(base, 40), MAX_EJECTION);
        let long = Duration::from_secs(900);
        assert_eq!(ejection_length(long, 5), long);
    }

    #[test]
    fn a_verdict_changes_after_its_streak() {
        let check = HealthCheck {
            path: "/healthz".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy: 2,
            unhealthy: 3,
        };
        let mut streak = Streak::default();
        assert_eq!(streak.record(false, true, &check), None);
        assert_eq!(streak.record(false, true, &check), None);
        assert_eq!(streak.record(false, true, &check), Some(false));
        assert_eq!(streak.record(true, false, &check), None);
        assert_eq!(streak.record(false, false, &check), None);
        assert_eq!(streak.record(true, false, &check), None);
        assert_eq!(streak.record(true, false, &check), Some(true));
    }

    #[test]
    fn status_lines_are_read() {
        assert_eq!(status_of(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(status_of(b"HTTP/1.0 503 Busy\r\nx"), Some(503));
        assert_eq!(status_of(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_of(b""), None);
    }
}
