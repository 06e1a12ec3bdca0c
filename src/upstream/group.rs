//! The upstream groups of one runtime generation: for each group, one pool
//! per worker and server, the servers' shared health, and the loop that
//! sends a request — choose a server, try it, and when that fails and the
//! request is safe to send again, another one, within the group's `timeout`
//! in total.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use http::{HeaderValue, Response};
use prometheus_client::metrics::counter::Counter;

use crate::config::{Config, Upstream};
use crate::policy::limits::is_body_too_large;
use crate::reject::{Rejection, UpstreamErrorKind};
use crate::telemetry::{Metrics, UpstreamRequestLabels, UpstreamServerLabels};

use super::balance::{self, Choice};
use super::health::{self, CheckedGroup, GroupHealth, LazyNow, ServerHealth};
use super::pool::{Outgoing, Pool};
use super::response_body::InFlight;
use super::{SendError, UpstreamRequest, UpstreamResponseBody};
use crate::background::Background;

/// Servers in one group, at most: a request's tried servers fit a `u64`.
pub const MAX_SERVERS: usize = 64;

/// Every group of a runtime generation; index 0 is `[upstream]`.
pub struct Upstreams {
    groups: Vec<Group>,
    /// Stops the active checks when this generation goes.
    _checker: Option<Background>,
}

struct Group {
    config: Upstream,
    health: Arc<GroupHealth>,
    /// By worker, then by server.
    workers: Vec<WorkerPools>,
    server_hashes: Vec<u64>,
    /// By server: answers by status class 1xx..5xx, then failures.
    counters: Vec<[Counter; 6]>,
    default_host: HeaderValue,
}

struct WorkerPools {
    pools: Vec<Arc<Pool>>,
    /// Round robin's turn; only this worker's thread touches it.
    turn: AtomicUsize,
    /// xorshift state; only this worker's thread touches it.
    random: AtomicU64,
}

const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

impl Upstreams {
    /// The groups of `config`. A server that stays in a group across a
    /// reload keeps its health (checks, ejection) and its pools. Without
    /// `active_checks` (`portcullis explain`) nothing is contacted.
    pub fn build(
        config: &Config,
        workers: usize,
        previous: Option<&Upstreams>,
        metrics: &Metrics,
        active_checks: bool,
    ) -> std::io::Result<Upstreams> {
        let workers = workers.max(1);
        let mut groups = Vec::new();
        for group in config.upstream_groups() {
            let old = previous.and_then(|p| p.groups.iter().find(|g| g.config.name == group.name));
            let servers: Vec<Arc<ServerHealth>> = group
                .servers
                .iter()
                .map(|address| {
                    old.and_then(|o| o.health.servers.iter().find(|s| s.address == *address))
                        .cloned()
                        .unwrap_or_else(|| Arc::new(ServerHealth::new(address.clone())))
                })
                .collect();
            let worker_pools = (0..workers)
                .map(|worker| WorkerPools {
                    pools: group
                        .servers
                        .iter()
                        .map(|address| {
                            old.filter(|o| o.workers.len() == workers)
                                .and_then(|o| {
                                    o.workers[worker]
                                        .pools
                                        .iter()
                                        .find(|pool| pool.fits(address, group))
                                })
                                .cloned()
                                .unwrap_or_else(|| Arc::new(Pool::new(address.clone(), group)))
                        })
                        .collect(),
                    turn: AtomicUsize::new(worker),
                    random: AtomicU64::new(random_seed(worker)),
                })
                .collect();
            let counters = servers
                .iter()
                .map(|server| {
                    STATUS_CLASSES.map(|status_class| {
                        metrics
                            .upstream_requests
                            .get_or_create(&UpstreamRequestLabels {
                                upstream: group.name.clone(),
                                server: server.label.clone(),
                                status_class,
                            })
                            .clone()
                    })
                })
                .collect();
            groups.push(Group {
                server_hashes: servers
                    .iter()
                    .map(|s| balance::hash_bytes(s.label.as_bytes()))
                    .collect(),
                health: Arc::new(GroupHealth::new(
                    group.name.clone(),
                    servers,
                    group.eject.clone(),
                )),
                workers: worker_pools,
                counters,
                default_host: HeaderValue::from_str(&group.default_host())
                    .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
                config: group.clone(),
            });
        }
        // Servers that went: their gauges go too.
        if let Some(previous) = previous {
            for old in &previous.groups {
                for server in &old.health.servers {
                    let stays = groups.iter().any(|g| {
                        g.config.name == old.config.name
                            && g.health.servers.iter().any(|s| s.address == server.address)
                    });
                    if !stays {
                        let labels = UpstreamServerLabels {
                            upstream: old.config.name.clone(),
                            server: server.label.clone(),
                        };
                        metrics.upstream_healthy.remove(&labels);
                        metrics.upstream_in_flight.remove(&labels);
                    }
                }
            }
        }
        let checked: Vec<CheckedGroup> = groups
            .iter()
            .filter_map(|g| {
                g.config.health_check.clone().map(|check| CheckedGroup {
                    health: g.health.clone(),
                    check,
                    default_host: g.config.default_host(),
                })
            })
            .collect();
        let checker = if checked.is_empty() || !active_checks {
            None
        } else {
            Some(health::start_checks(checked)?)
        };
        let upstreams = Upstreams {
            groups,
            _checker: checker,
        };
        upstreams.refresh_gauges(metrics);
        Ok(upstreams)
    }

    /// Sends `request` to a server of group `group` (a route's
    /// [`crate::config::Route::upstream`]) over worker `worker`'s pools.
    ///
    /// Not an `async fn`: the group's future is handed back as it is, so
    /// the request's future does not carry (and copy) one more level of it.
    pub fn send(
        &self,
        group: usize,
        worker: usize,
        client: IpAddr,
        request: UpstreamRequest,
    ) -> impl Future<Output = Result<Response<UpstreamResponseBody>, Rejection>> + '_ {
        // `[upstream]` is always group 0.
        let group = self.groups.get(group).unwrap_or(&self.groups[0]);
        group.send(worker, client, request)
    }

    /// Groups with no server taking requests now (for `/readyz`).
    pub fn unavailable_groups(&self) -> Vec<Arc<str>> {
        self.groups
            .iter()
            .filter(|g| !g.health.any_available())
            .map(|g| g.config.name.clone())
            .collect()
    }

    /// Every server of every group (for `/readyz`, without health checks).
    pub fn groups(&self) -> impl Iterator<Item = (&Upstream, &GroupHealth)> {
        self.groups.iter().map(|g| (&g.config, &*g.health))
    }

    /// Brings `portcullis_upstream_healthy` and `_in_flight` up to date
    /// (called before each scrape).
    pub fn refresh_gauges(&self, metrics: &Metrics) {
        let mut now = LazyNow::default();
        for group in &self.groups {
            for (index, server) in group.health.servers.iter().enumerate() {
                let labels = UpstreamServerLabels {
                    upstream: group.config.name.clone(),
                    server: server.label.clone(),
                };
                metrics
                    .upstream_healthy
                    .get_or_create(&labels)
                    .set(i64::from(server.available(&mut now)));
                let in_flight: usize = group
                    .workers
                    .iter()
                    .filter_map(|w| w.pools.get(index))
                    .map(|pool| pool.in_flight())
                    .sum();
                metrics
                    .upstream_in_flight
                    .get_or_create(&labels)
                    .set(i64::try_from(in_flight).unwrap_or(i64::MAX));
            }
        }
    }

    /// Closes idle connections past `pool_idle_timeout`, and those the
    /// servers closed. Called periodically from any thread.
    pub fn sweep(&self) {
        for group in &self.groups {
            for worker in &group.workers {
                for pool in &worker.pools {
                    pool.sweep();
                }
            }
        }
    }

    /// Idle connections in every pool now (for tests and diagnostics).
    pub fn idle_connections(&self) -> usize {
        self.groups
            .iter()
            .flat_map(|g| g.workers.iter())
            .flat_map(|w| w.pools.iter())
            .map(|pool| pool.idle_connections())
            .sum()
    }
}

impl Group {
    /// Sends `request` to a server of this group, retrying where it may.
    /// A plain fn around an `async move` block: the request becomes the
    /// encoded `Outgoing` before the future exists, so the future holds
    /// only that (an `async fn` keeps room for its arguments for its whole
    /// life: 400 bytes more in every request's future).
    fn send(
        &self,
        worker: usize,
        client: IpAddr,
        request: UpstreamRequest,
    ) -> impl Future<Output = Result<Response<UpstreamResponseBody>, Rejection>> + '_ {
        let mut out = Outgoing::new(request, &self.default_host);
        async move { self.send_outgoing(worker, client, &mut out).await }
    }

    async fn send_outgoing(
        &self,
        worker: usize,
        client: IpAddr,
        out: &mut Outgoing,
    ) -> Result<Response<UpstreamResponseBody>, Rejection> {
        let pools = &self.workers[worker % self.workers.len()];
        let started = std::time::Instant::now();
        let deadline = tokio::time::Instant::from_std(started) + self.config.timeout;
        let mut tried: u64 = 0;
        let mut last_failure = UpstreamErrorKind::Connect;
        for attempt in 0..=self.config.retries {
            let Some(index) = self.choose(pools, client, tried) else {
                if attempt == 0 {
                    // Each health change is logged once already.
                    tracing::debug!(
                        upstream = %self.config.name,
                        "no upstream server takes requests (all unhealthy or ejected)"
                    );
                }
                break;
            };
            tried |= 1 << index;
            let pool = &pools.pools[index];
            let in_flight = InFlight::begin(pool);
            // A retry comes after a failure that may have taken a while.
            let now = if attempt == 0 {
                started
            } else {
                std::time::Instant::now()
            };
            let sent = tokio::time::timeout_at(deadline, pool.send(out, now)).await;
            let (kind, text) = match sent {
                Ok(Ok(mut response)) => {
                    let status = response.status().as_u16();
                    if matches!(status, 502..=504) {
                        self.health.record_failure(index);
                    } else {
                        self.health.record_success(index);
                    }
                    self.counters[index][usize::from(status / 100).clamp(1, 5) - 1].inc();
                    response.body_mut().hold(in_flight);
                    return Ok(response);
                }
                Err(_elapsed) => {
                    self.failed(index);
                    let label = &self.health.servers[index].label;
                    tracing::warn!(
                        upstream = %self.config.name,
                        server = %label,
                        timeout = ?self.config.timeout,
                        kind = "timeout",
                        "upstream request failed"
                    );
                    return Err(Rejection::Upstream(UpstreamErrorKind::Timeout));
                }
                Ok(Err(SendError::Body(error))) => {
                    if is_body_too_large(error.as_ref()) {
                        return Err(Rejection::BodyTooLarge);
                    }
                    tracing::debug!(%error, "the client stopped sending its request body");
                    return Err(Rejection::ClientAborted);
                }
                Ok(Err(SendError::Connect(text))) => (UpstreamErrorKind::Connect, text),
                Ok(Err(SendError::Exchange(error))) => {
                    (UpstreamErrorKind::Reset, error.to_string())
                }
            };
            self.failed(index);
            let again = out.resendable && attempt < self.config.retries;
            tracing::warn!(
                upstream = %self.config.name,
                server = %self.health.servers[index].label,
                error = %text,
                kind = kind.as_str(),
                retried = again,
                method = %out.method(),
                "upstream request failed"
            );
            last_failure = kind;
            if !out.resendable {
                break;
            }
        }
        Err(Rejection::Upstream(last_failure))
    }

    fn failed(&self, index: usize) {
        self.health.record_failure(index);
        self.counters[index][5].inc();
    }

    /// A server that takes requests and was not tried yet for this one.
    fn choose(&self, pools: &WorkerPools, client: IpAddr, tried: u64) -> Option<usize> {
        let servers = &self.health.servers;
        if servers.len() == 1 {
            return (tried == 0 && servers[0].available(&mut LazyNow::default())).then_some(0);
        }
        let mut now = LazyNow::default();
        let mut candidates = [0usize; MAX_SERVERS];
        let mut count = 0;
        for (index, server) in servers.iter().enumerate().take(MAX_SERVERS) {
            if tried & (1 << index) == 0 && server.available(&mut now) {
                candidates[count] = index;
                count += 1;
            }
        }
        if count == 0 {
            return None;
        }
        let in_flight = |i: usize| pools.pools.get(i).map_or(0, |p| p.in_flight());
        let turn = pools.turn.fetch_add(1, Ordering::Relaxed);
        let random = [next_random(&pools.random), next_random(&pools.random)];
        Some(balance::choose(
            self.config.balance,
            &Choice {
                candidates: &candidates[..count],
                in_flight: &in_flight,
                server_hashes: &self.server_hashes,
                client,
                turn,
                random,
            },
        ))
    }
}

/// A different xorshift state per process, worker and reload: instances
/// behind one load balancer (and successive generations) must not make the
/// same "random" choices in step. Never 0, xorshift's one fixed point.
fn random_seed(worker: usize) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    balance::mix(nanos ^ (u64::from(std::process::id()) << 32) ^ (worker as u64 + 1)) | 1
}

/// xorshift64*: plenty for picking servers, and no shared state.
fn next_random(state: &AtomicU64) -> u64 {
    let mut x = state.load(Ordering::Relaxed);
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    state.store(x, Ordering::Relaxed);
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}
