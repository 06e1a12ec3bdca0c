//! The live side of `[redis]`: rate limits shared by every instance that
//! points at the same Redis, and what happens while it fails.
//!
//! Built once per configuration in `runtime.rs` (and kept across reloads
//! that leave `[redis]` alone). Each worker thread has its own multiplexed
//! connection, opened on the worker's runtime, so a request's round trip
//! never crosses threads; requests on a worker share it, pipelined. One
//! request is one EVALSHA of the GCRA script (`policy/rate_limit/gcra.lua`),
//! loaded again by the client when Redis answers NOSCRIPT (a restarted,
//! empty Redis).
//!
//! # Failure
//!
//! Nothing here makes a request wait longer than `timeout`: the wait for a
//! connection being opened and the script's round trip share one deadline,
//! and a reply later than it is a failure (`timeout`), as is a refused
//! connection (`refused`) or any other error (`error`). Failures feed the
//! [`Circuit`]: once open, requests skip Redis without waiting at all, one
//! probe at a time tries again, and `on_error` decides meanwhile (the
//! pipeline applies it). A frozen Redis (accepting, never answering) costs
//! each request at most `timeout` until the circuit opens, then nothing; a
//! connection that timed out while the circuit is open is dropped and opened
//! afresh, since a peer that vanished without a word would otherwise keep
//! swallowing probes.
//!
//! Connections are opened by a task per worker that retries with back-off
//! (at most [`RECONNECT_MAX_DELAY`] apart) until it succeeds, so a Redis
//! started after the proxy, or restarted, is found again within seconds.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use redis::aio::MultiplexedConnection;
use tokio::sync::watch;

use crate::config::Redis;
use crate::policy::rate_limit::{
    Admit, Circuit, GCRA_SCRIPT, KeyMaterial, OnError, RateLimitInfo, RateLimited, SharedQuota,
    Transition, shared_key,
};
use crate::telemetry::{KindLabels, Metrics};

/// The longest wait between two attempts to open a worker's connection.
pub const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(2);
const RECONNECT_FIRST_DELAY: Duration = Duration::from_millis(100);
/// Opening a connection (TCP, TLS, handshake) is on no request's path, so it
/// may take longer than `timeout`; a frozen Redis still cannot hold it forever.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What the shared limiter says about one request.
#[derive(Debug, PartialEq, Eq)]
pub enum SharedAnswer {
    /// Redis decided: allowed (with the headers) or 429.
    Decided(Result<RateLimitInfo, RateLimited>),
    /// Redis failed, or the circuit is open: `on_error` decides.
    Unavailable,
}

/// Why an operation failed, as the `kind` label of
/// `portcullis_redis_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Timeout,
    Refused,
    Error,
}

impl Failure {
    fn as_str(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Refused => "refused",
            Failure::Error => "error",
        }
    }

    fn of(error: &redis::RedisError) -> Failure {
        if error.is_timeout() {
            Failure::Timeout
        } else if error.is_connection_refusal() {
            Failure::Refused
        } else {
            Failure::Error
        }
    }
}

pub struct RedisLimits {
    settings: Redis,
    client: redis::Client,
    script: redis::Script,
    links: Box<[WorkerLink]>,
    /// The circuit is closed and the last operation succeeded: the fast path
    /// takes no lock. Written only under the circuit's lock.
    healthy: AtomicBool,
    circuit: Mutex<Circuit>,
    up: Gauge,
    errors: Family<KindLabels, Counter>,
}

/// One worker's connection, and whether one is being opened.
struct WorkerLink {
    state: watch::Sender<Link>,
    generation: AtomicU64,
}

#[derive(Clone)]
enum Link {
    /// Nobody has asked for a connection yet.
    Idle,
    /// A connection is being opened: requests wait for it (within their
    /// deadline).
    Opening,
    /// The last attempt failed; the task tries again after a back-off.
    /// Requests do not wait.
    Down,
    Up(u64, MultiplexedConnection),
}

impl RedisLimits {
    /// The client for `settings`, with one (not yet opened) connection slot
    /// per worker. Contacts nobody.
    pub fn new(settings: &Redis, workers: usize, metrics: &Metrics) -> anyhow::Result<Arc<Self>> {
        let client = redis::Client::open(settings.url.as_str()).map_err(|error| {
            anyhow::anyhow!(
                "redis.url: cannot be used ({}): {error}",
                settings.display_url()
            )
        })?;
        let links = (0..workers.max(1))
            .map(|_| WorkerLink {
                state: watch::Sender::new(Link::Idle),
                generation: AtomicU64::new(0),
            })
            .collect();
        Ok(Arc::new(RedisLimits {
            settings: settings.clone(),
            client,
            script: redis::Script::new(GCRA_SCRIPT),
            links,
            healthy: AtomicBool::new(false),
            circuit: Mutex::new(Circuit::new(settings.timeout + Duration::from_millis(100))),
            up: metrics.redis_up.clone(),
            errors: metrics.redis_errors.clone(),
        }))
    }

    /// The settings this client was built from (a reload keeps it when
    /// they are unchanged).
    pub fn settings(&self) -> &Redis {
        &self.settings
    }

    pub fn on_error(&self) -> OnError {
        self.settings.on_error
    }

    /// Starts opening `worker`'s connection now rather than on its first
    /// request. Call on the worker's runtime.
    pub fn warm(self: &Arc<Self>, worker: usize) {
        self.open(worker);
    }

    /// Asks Redis about one request on `route` from `material`, waiting at
    /// most `timeout`. Call on `worker`'s runtime.
    pub async fn check(
        self: &Arc<Self>,
        worker: usize,
        route: &str,
        quota: &SharedQuota,
        material: &KeyMaterial<'_>,
    ) -> SharedAnswer {
        let started = Instant::now();
        if !self.healthy.load(Ordering::Relaxed)
            && self.lock_circuit().admit(started) == Admit::Skip
        {
            return SharedAnswer::Unavailable;
        }
        let deadline = tokio::time::Instant::from_std(started + self.settings.timeout);
        let worker = worker % self.links.len();
        let Some((generation, mut connection)) = self.connection(worker, deadline).await else {
            self.failed(None);
            return SharedAnswer::Unavailable;
        };
        let key = shared_key(&self.settings.key_prefix, route, material);
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(key.as_str())
            .arg(quota.interval_us)
            .arg(quota.tolerance_us);
        let call = invocation.invoke_async::<Vec<i64>>(&mut connection);
        match tokio::time::timeout_at(deadline, call).await {
            Ok(Ok(reply)) => match quota.interpret(&reply) {
                Some(answer) => {
                    self.succeeded();
                    SharedAnswer::Decided(answer)
                }
                None => {
                    self.failed(Some(Failure::Error));
                    SharedAnswer::Unavailable
                }
            },
            Ok(Err(error)) => {
                let failure = Failure::of(&error);
                if error.is_unrecoverable_error() || error.is_io_error() {
                    self.drop_connection(worker, generation);
                }
                self.failed(Some(failure));
                SharedAnswer::Unavailable
            }
            Err(_elapsed) => {
                if self.failed(Some(Failure::Timeout)) {
                    self.drop_connection(worker, generation);
                }
                SharedAnswer::Unavailable
            }
        }
    }

    /// `worker`'s connection, waiting (until `deadline`) for one being
    /// opened; `None` when there is none to be had in time.
    async fn connection(
        self: &Arc<Self>,
        worker: usize,
        deadline: tokio::time::Instant,
    ) -> Option<(u64, MultiplexedConnection)> {
        let link = &self.links[worker];
        match &*link.state.borrow() {
            Link::Up(generation, connection) => return Some((*generation, connection.clone())),
            Link::Down => return None,
            Link::Idle | Link::Opening => {}
        }
        self.open(worker);
        let mut changes = link.state.subscribe();
        let ready = changes.wait_for(|state| !matches!(state, Link::Idle | Link::Opening));
        match tokio::time::timeout_at(deadline, ready).await {
            Ok(Ok(state)) => match &*state {
                Link::Up(generation, connection) => Some((*generation, connection.clone())),
                _ => None,
            },
            _ => None,
        }
    }

    /// Starts the task that opens `worker`'s connection, unless one runs.
    fn open(self: &Arc<Self>, worker: usize) {
        let link = &self.links[worker];
        let started = link.state.send_if_modified(|state| match state {
            Link::Idle => {
                *state = Link::Opening;
                true
            }
            _ => false,
        });
        if started {
            tokio::spawn(open_until_up(Arc::downgrade(self), worker));
        }
    }

    /// Forgets `worker`'s connection `generation` (broken, or swallowing
    /// probes) and opens another.
    fn drop_connection(self: &Arc<Self>, worker: usize, generation: u64) {
        let link = &self.links[worker];
        let dropped = link.state.send_if_modified(|state| match state {
            Link::Up(current, _) if *current == generation => {
                *state = Link::Idle;
                true
            }
            _ => false,
        });
        if dropped {
            self.open(worker);
        }
    }

    fn succeeded(&self) {
        if self.healthy.load(Ordering::Relaxed) {
            return;
        }
        let mut circuit = self.lock_circuit();
        let transition = circuit.success();
        self.healthy.store(true, Ordering::Relaxed);
        drop(circuit);
        self.up.set(1);
        if transition == Some(Transition::Closed) {
            tracing::info!(
                redis = %self.settings.display_url(),
                "redis answers again: rate limits are shared again"
            );
        }
    }

    /// Counts a failure (`None`: no connection to try, already counted by
    /// the task opening it). True when the circuit is open after it.
    fn failed(&self, failure: Option<Failure>) -> bool {
        if let Some(failure) = failure {
            self.count(failure);
        }
        let mut circuit = self.lock_circuit();
        self.healthy.store(false, Ordering::Relaxed);
        let transition = circuit.failure(Instant::now());
        let open = !circuit.is_closed();
        drop(circuit);
        if let Some(Transition::Opened { failures, retry_in }) = transition {
            self.up.set(0);
            tracing::warn!(
                redis = %self.settings.display_url(),
                failures,
                last_error = failure.map_or("no connection", Failure::as_str),
                retry_in_ms = retry_in.as_millis() as u64,
                on_error = self.settings.on_error.as_str(),
                "redis is failing: rate-limited routes stop asking it and follow on_error until a probe succeeds"
            );
        }
        open
    }

    fn count(&self, failure: Failure) {
        self.errors
            .get_or_create(&KindLabels {
                kind: failure.as_str(),
            })
            .inc();
    }

    fn lock_circuit(&self) -> MutexGuard<'_, Circuit> {
        // The circuit is consistent after every method; a panic elsewhere
        // while holding the lock leaves nothing half-done.
        self.circuit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Opens `worker`'s connection, retrying with back-off until it is up or
/// the limiter (its configuration generation) is gone.
async fn open_until_up(limits: Weak<RedisLimits>, worker: usize) {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        // Each request bounds its own wait; the connection must not fail
        // the others' in-flight replies on one slow one.
        .set_response_timeout(None);
    let mut delay = RECONNECT_FIRST_DELAY;
    loop {
        let Some(this) = limits.upgrade() else {
            return;
        };
        let link = &this.links[worker];
        link.state.send_if_modified(|state| match state {
            Link::Down => {
                *state = Link::Opening;
                true
            }
            _ => false,
        });
        let attempt = this
            .client
            .get_multiplexed_async_connection_with_config(&config);
        let failure = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(connection)) => {
                let generation = link.generation.fetch_add(1, Ordering::Relaxed) + 1;
                link.state.send_replace(Link::Up(generation, connection));
                return;
            }
            Ok(Err(error)) => Failure::of(&error),
            Err(_elapsed) => Failure::Timeout,
        };
        this.count(failure);
        link.state.send_replace(Link::Down);
        drop(this);
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RECONNECT_MAX_DELAY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_kinds() {
        let refused: redis::RedisError =
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into();
        assert_eq!(Failure::of(&refused), Failure::Refused);
        let timed_out: redis::RedisError =
            std::io::Error::from(std::io::ErrorKind::TimedOut).into();
        assert_eq!(Failure::of(&timed_out), Failure::Timeout);
        let reset: redis::RedisError =
            std::io::Error::from(std::io::ErrorKind::ConnectionReset).into();
        assert_eq!(Failure::of(&reset), Failure::Error);
    }
}
