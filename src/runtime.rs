//! The ready-to-serve state built from a validated [`Config`]: route table
//! with limiters, response filters, TLS acceptor, one upstream pool per
//! worker, the JWT verifier and its `jwks_url` fetcher. The configuration
//! is plain data; every live object is made here. Built once per
//! configuration and swapped whole on reload
//! ([`Shared::runtime`] is an `ArcSwap`), so a request sees one consistent
//! generation from start to end.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::SystemTime;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use http::HeaderName;
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acme::AcmeManager;
use crate::cert_info::CertInfo;
use crate::config::Config;
use crate::filters::ResponseFilters;
use crate::policy::jwt::{JwtVerifier, KeyFetcher, RemoteKeys, VerifierConfig};
use crate::policy::method;
use crate::policy::rate_limit::{RouteLimiter, SharedQuota};
use crate::redis_limits::RedisLimits;
use crate::routes::{RouteRuntime, RouteTable};
use crate::telemetry::{Metrics, NameLabels, RouteMetrics};
use crate::upstream::Upstreams;

pub struct Runtime {
    pub config: Config,
    pub tls: TlsAcceptor,
    pub routes: RouteTable,
    pub filters: ResponseFilters,
    /// The upstream groups, each with a pool per worker and server.
    pub upstreams: Upstreams,
    /// `forward_claims` header names, removed from every client request.
    pub identity_headers: Vec<HeaderName>,
    /// The verifier and its key fetcher; `None` without `[jwt]`.
    pub jwt: Option<JwtRuntime>,
    /// The shared rate limiter; `None` without `[redis]` or without any
    /// rate-limited route (then nothing ever contacts Redis).
    pub redis: Option<Arc<RedisLimits>>,
    /// `[acme]`'s certificates and the task that keeps them; kept across
    /// reloads that leave `[acme]` unchanged. `None` for `explain`.
    pub acme: Option<Arc<AcmeManager>>,
    /// `tls.cert` and the `[[tls.sni]]` certificates, by metric name, with
    /// their expiry (for `portcullis_cert_expiry_seconds`).
    pub static_certs: Vec<(String, SystemTime)>,
}

/// The live side of `[jwt]`.
pub struct JwtRuntime {
    pub verifier: JwtVerifier,
    /// Keeps the `jwks_url` keys fresh; goes with this runtime generation,
    /// and dropping it stops the task.
    _fetcher: Option<KeyFetcher>,
}

impl JwtRuntime {
    /// The verifier, and with `jwks_url` its fetcher, started now; requests
    /// that need the fetched keys wait for the start fetch.
    fn build(config: &VerifierConfig) -> anyhow::Result<JwtRuntime> {
        let remote = RemoteKeys::for_jwks_url(config);
        let fetcher = remote
            .as_ref()
            .map(KeyFetcher::start)
            .transpose()
            .context("jwt.jwks_url: cannot start the key fetcher")?;
        Ok(JwtRuntime {
            verifier: JwtVerifier::new(config.clone(), remote),
            _fetcher: fetcher,
        })
    }
}

impl Runtime {
    /// Builds the runtime. `previous` lets a reload keep what did not change:
    /// a route's limiter (and its counts) when its limit is the same, each
    /// upstream server's health and pools when it stays, and the Redis
    /// connections when `[redis]` is. The JWT verifier is
    /// always new: a reload re-reads the secret and the key files, refetches
    /// `jwks_url` at once, and empties the verified-token cache (which the
    /// README promises).
    pub fn build(
        config: Config,
        workers: usize,
        previous: Option<&Runtime>,
        metrics: &Metrics,
    ) -> anyhow::Result<Self> {
        Self::build_for(config, workers, previous, metrics, Purpose::Serve)
    }

    /// The runtime `portcullis explain` judges with: the same routes,
    /// limiters, filters and verifier, but nothing that contacts anyone:
    /// no Redis, and a `jwks_url` fetched only when `online`.
    pub fn build_for_explain(config: Config, online: bool) -> anyhow::Result<Self> {
        let metrics = Metrics::new();
        Self::build_for(config, 1, None, &metrics, Purpose::Explain { online })
    }

    fn build_for(
        config: Config,
        workers: usize,
        previous: Option<&Runtime>,
        metrics: &Metrics,
        purpose: Purpose,
    ) -> anyhow::Result<Self> {
        let acme = match (&config.acme, previous) {
            _ if matches!(purpose, Purpose::Explain { .. }) => None,
            (Some(settings), Some(p))
                if p.acme
                    .as_ref()
                    .is_some_and(|a| a.started_for(settings, config.redis.as_ref())) =>
            {
                p.acme.clone()
            }
            (Some(settings), _) => Some(AcmeManager::start(
                settings,
                config.redis.as_ref(),
                metrics,
            )?),
            (None, _) => None,
        };
        let tls = TlsAcceptor::from(crate::tls::server_config(&config.tls, acme.as_deref())?);
        let static_certs = static_cert_expiries(&config.tls);
        let routes = config
            .routes
            .iter()
            .map(|route| {
                let reused = previous.and_then(|p| {
                    p.routes
                        .iter()
                        .find(|old| old.config.path == route.path)
                        .and_then(|old| old.limiter.clone())
                        .filter(|old| Some(old.spec()) == route.rate_limit.as_ref())
                });
                let limiter = reused.or_else(|| {
                    route
                        .rate_limit
                        .clone()
                        .map(|spec| Arc::new(RouteLimiter::new(spec).with_route(&route.path)))
                });
                let label: Arc<str> = Arc::from(route.path.as_str());
                RouteRuntime {
                    shared_quota: route.rate_limit.as_ref().map(SharedQuota::new),
                    metrics: RouteMetrics::new(metrics, label.clone()),
                    label,
                    allow: route.methods.as_deref().and_then(method::allow_header),
                    limiter,
                    max_body_bytes: route.max_body_bytes.unwrap_or(config.server.max_body_bytes),
                    config: route.clone(),
                }
            })
            .collect();
        let upstreams = Upstreams::build(
            &config,
            workers,
            previous.map(|p| &p.upstreams),
            metrics,
            matches!(purpose, Purpose::Serve),
        )
        .context("cannot start the upstream health checks")?;
        let identity_headers = config
            .jwt
            .as_ref()
            .map(|jwt| jwt.forward_claims.iter().map(|(_, h)| h.clone()).collect())
            .unwrap_or_default();
        let jwt = config
            .jwt
            .as_ref()
            .map(|jwt| match purpose {
                Purpose::Explain { online: false } => Ok(JwtRuntime {
                    verifier: JwtVerifier::new(jwt.verifier.clone(), None),
                    _fetcher: None,
                }),
                _ => JwtRuntime::build(&jwt.verifier),
            })
            .transpose()?;
        let rate_limited = config.routes.iter().any(|r| r.rate_limit.is_some());
        let redis = match (&config.redis, previous) {
            _ if matches!(purpose, Purpose::Explain { .. }) => None,
            (Some(_), _) if !rate_limited => {
                tracing::info!(
                    "[redis] is configured but no route has a rate_limit: Redis is not contacted"
                );
                None
            }
            (Some(settings), Some(p))
                if p.redis.as_ref().is_some_and(|r| r.settings() == settings) =>
            {
                p.redis.clone()
            }
            (Some(settings), _) => Some(RedisLimits::new(settings, workers, metrics)?),
            (None, _) => None,
        };
        Ok(Runtime {
            acme,
            static_certs,
            redis,
            filters: ResponseFilters::from_config(&config),
            tls,
            routes: RouteTable::new(routes, metrics, config.server.case_insensitive_routes),
            upstreams,
            identity_headers,
            jwt,
            config,
        })
    }
}

impl Runtime {
    /// Brings `portcullis_cert_expiry_seconds` up to date (called before
    /// each scrape): a certificate no longer served loses its series.
    pub fn refresh_cert_gauges(&self, metrics: &Metrics) {
        let now = SystemTime::now();
        let left = |not_after: SystemTime| match not_after.duration_since(now) {
            Ok(left) => i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            Err(past) => -i64::try_from(past.duration().as_secs()).unwrap_or(i64::MAX),
        };
        metrics.cert_expiry.clear();
        for (name, not_after) in &self.static_certs {
            metrics
                .cert_expiry
                .get_or_create(&NameLabels { name: name.clone() })
                .set(left(*not_after));
        }
        if let Some(acme) = &self.acme
            && let Some(info) = &acme.certs.current().info
            && let Some(first) = acme.certs.domains().first()
        {
            metrics
                .cert_expiry
                .get_or_create(&NameLabels {
                    name: first.clone(),
                })
                .set(left(info.not_after));
        }
    }
}

/// `tls.cert` as "default", each `[[tls.sni]]` by its name.
fn static_cert_expiries(tls: &crate::config::Tls) -> Vec<(String, SystemTime)> {
    let expiry = |cert: &rustls::sign::CertifiedKey| {
        cert.end_entity_cert()
            .ok()
            .and_then(CertInfo::read)
            .map(|info| info.not_after)
    };
    let default = tls
        .default_cert
        .as_deref()
        .and_then(expiry)
        .map(|at| ("default".to_owned(), at));
    default
        .into_iter()
        .chain(
            tls.sni
                .iter()
                .filter_map(|sni| Some((sni.server_name.clone(), expiry(&sni.cert)?))),
        )
        .collect()
}

/// What a runtime is built for.
#[derive(Clone, Copy)]
enum Purpose {
    Serve,
    /// `portcullis explain`: contacts nothing (a `jwks_url` only when `online`).
    Explain {
        online: bool,
    },
}

/// State shared by every worker for the life of the process.
pub struct Shared {
    pub runtime: ArcSwap<Runtime>,
    pub metrics: Metrics,
    /// `max_connections`: an accept loop takes a permit before accepting, so
    /// connections beyond the limit wait in the kernel backlog.
    pub permits: Arc<Semaphore>,
    /// Woken when an accept loop takes the last free permit: see
    /// `server::worker::worker_loop`.
    pub slots_ran_out: Notify,
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them to drain.
    pub connections: TaskTracker,
    pub listeners_ready: AtomicBool,
    pub workers: usize,
}

impl Shared {
    pub fn new(runtime: Runtime, workers: usize, metrics: Metrics) -> Arc<Self> {
        let max_connections = runtime.config.server.max_connections;
        Arc::new(Shared {
            runtime: ArcSwap::from_pointee(runtime),
            metrics,
            permits: Arc::new(Semaphore::new(max_connections)),
            slots_ran_out: Notify::new(),
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
            listeners_ready: AtomicBool::new(false),
            workers,
        })
    }
}
