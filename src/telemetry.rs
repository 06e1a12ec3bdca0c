//! What the proxy tells its operator: the access log (one event per
//! request), security events (one per rejection), diagnostics, and the
//! Prometheus metrics served on the admin listener.
//!
//! Access and security events go to standard output (one JSON object per
//! line in `json` format); everything else goes to standard error, so that
//! standard output can be shipped to a log pipeline untouched.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{FilterFn, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::reject::Rejection;

/// Targets whose events are the operator's records, written to standard output.
pub const ACCESS: &str = "access";
pub const SECURITY: &str = "security";

/// Keeps the background log writers running; dropping it flushes them.
/// Hold it until the process is about to exit.
pub struct LogGuard {
    _stderr: Option<tracing_appender::non_blocking::WorkerGuard>,
}

impl Drop for LogGuard {
    /// Standard output's records are written before the process exits.
    fn drop(&mut self) {
        crate::access_log::shutdown(Duration::from_secs(2));
    }
}

/// Installs the global subscriber and the access log's writer. Called once
/// per process.
///
/// Standard output's records (access lines and security events) are
/// written in batches by `crate::access_log`, which never makes a worker
/// wait: when standard output is not being read, lines are dropped and
/// counted (`portcullis_log_lines_dropped_total`). Diagnostics go to
/// standard error through a background writer of 1k lines, dropping and
/// counting likewise.
pub fn init(json: bool, level: &str) -> LogGuard {
    let level: LevelFilter = level.parse().unwrap_or(LevelFilter::INFO);
    let is_record =
        |meta: &tracing::Metadata<'_>| meta.target() == ACCESS || meta.target() == SECURITY;
    // Access records skip tracing altogether (src/access_log.rs); security
    // events are formatted by tracing into the same batches.
    crate::access_log::init(json, level >= LevelFilter::INFO);
    let (stderr, stderr_guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(1024)
        .thread_name("portcullis-diag")
        .finish(std::io::stderr());
    let _ = DROPPED_LINES.set(stderr.error_counter());
    use std::io::IsTerminal;
    let stdout_layer = layer(
        json,
        crate::access_log::Records,
        std::io::stdout().is_terminal(),
        FilterFn::new(move |meta| is_record(meta)),
    );
    let stderr_layer = layer(
        json,
        stderr,
        std::io::stderr().is_terminal(),
        FilterFn::new(move |meta| !is_record(meta)),
    );
    // A second init (tests, demo) is harmless: the first subscriber stays.
    let installed = tracing_subscriber::registry()
        .with(stdout_layer.and_then(stderr_layer).with_filter(level))
        .try_init()
        .is_ok();
    LogGuard {
        _stderr: installed.then_some(stderr_guard),
    }
}

/// The log writers' counts of lines dropped while their queue was full
/// (standard output, standard error).
static DROPPED_LINES: std::sync::OnceLock<tracing_appender::non_blocking::ErrorCounter> =
    std::sync::OnceLock::new();

fn dropped_log_lines() -> u64 {
    DROPPED_LINES
        .get()
        .map_or(0, |counter| counter.dropped_lines() as u64)
        + crate::access_log::dropped_lines()
}

/// One output: JSON objects with the event's fields at the top level, or
/// text — coloured only on a terminal, since escape codes corrupt log files
/// and pipelines.
fn layer<S, W, F>(json: bool, writer: W, ansi: bool, filter: F) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
    F: tracing_subscriber::layer::Filter<S> + Send + Sync + 'static,
{
    if json {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(writer)
            .with_filter(filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(writer)
            .with_filter(filter)
            .boxed()
    }
}

/// What the access log records about one request; filled in as the request
/// goes through the pipeline and written when its response body ends.
#[derive(Debug, Clone)]
pub struct AccessRecord {
    pub client: IpAddr,
    pub method: http::Method,
    /// The normalized path, or the raw one when it was rejected; never the query.
    pub path: String,
    pub route: Arc<str>,
    pub status: u16,
    pub upstream_status: Option<u16>,
    pub tls: &'static str,
    pub sub: Option<String>,
}

impl AccessRecord {
    pub fn emit(&self, bytes: u64, duration: Duration, ended: std::time::Instant) {
        crate::access_log::write(self, bytes, duration, ended);
    }
}

/// A path as logged: each segment's `;parameters` keep their names and
/// lose their values (`/app;jsessionid=SECRET` → `/app;jsessionid`), since a
/// matrix parameter carries session ids as often as a query does.
pub struct LoggedPath<'a>(pub &'a str);

impl std::fmt::Display for LoggedPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.0.contains(';') {
            return f.write_str(self.0);
        }
        let mut segments = self.0.split('/');
        if let Some(first) = segments.next() {
            write_segment(f, first)?;
        }
        for segment in segments {
            f.write_str("/")?;
            write_segment(f, segment)?;
        }
        Ok(())
    }
}

fn write_segment(f: &mut std::fmt::Formatter<'_>, segment: &str) -> std::fmt::Result {
    let mut parts = segment.split(';');
    f.write_str(parts.next().unwrap_or_default())?;
    for parameter in parts {
        f.write_str(";")?;
        f.write_str(
            parameter
                .split_once('=')
                .map_or(parameter, |(name, _)| name),
        )?;
    }
    Ok(())
}

/// Writes the security event for a rejection. Never includes tokens, cookies or query values.
pub fn security_event(rejection: &Rejection, record: &AccessRecord) {
    if let Some(reason) = rejection.reason() {
        let detail = rejection.detail();
        security_event_with(
            reason,
            detail.as_deref(),
            rejection.origin(),
            record.client,
            Some(record),
        );
    }
}

/// A security event outside a request (a handshake or header timeout, say).
pub fn security_event_with(
    reason: &'static str,
    detail: Option<&str>,
    origin: Option<&str>,
    client: IpAddr,
    record: Option<&AccessRecord>,
) {
    tracing::warn!(
        target: SECURITY,
        reason,
        client = %client,
        method = record.map(|r| tracing::field::display(&r.method)),
        path = record.map(|r| tracing::field::display(LoggedPath(&r.path))),
        route = record.map(|r| &*r.route),
        detail,
        origin,
    );
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: Arc<str>,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamServerLabels {
    pub upstream: Arc<str>,
    pub server: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamRequestLabels {
    pub upstream: Arc<str>,
    pub server: Arc<str>,
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabels {
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: &'static str,
}

/// The `kind` values of `portcullis_upstream_errors_total` (SPEC, "Admin listener").
pub const UPSTREAM_ERROR_KINDS: [&str; 3] = ["connect", "timeout", "reset"];

/// The `reason` values of `portcullis_rejections_total`: SPEC's list, plus
/// `invalid_request` (a request that cannot be forwarded safely).
pub const REJECTION_REASONS: [&str; 14] = [
    "invalid_path",
    "invalid_request",
    "missing_token",
    "invalid_token",
    "insufficient_scope",
    "insufficient_claims",
    "csrf",
    "method_not_allowed",
    "body_too_large",
    "unsupported_media_type",
    "schema",
    "rate_limited",
    "header_too_large",
    "header_timeout",
];

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

/// One route's metric handles, resolved once per configuration so a request
/// does no label lookup in a shared map (the duration histogram up front, a
/// status's counter on its first use).
pub struct RouteMetrics {
    label: Arc<str>,
    requests: Family<RequestLabels, Counter>,
    /// Indexed by status - 100.
    by_status: Box<[std::sync::OnceLock<Counter>]>,
    duration: Histogram,
}

impl RouteMetrics {
    pub fn new(metrics: &Metrics, label: Arc<str>) -> Self {
        let duration = metrics
            .duration
            .get_or_create(&RouteLabels {
                route: label.clone(),
            })
            .clone();
        RouteMetrics {
            requests: metrics.requests.clone(),
            by_status: (100..600).map(|_| std::sync::OnceLock::new()).collect(),
            duration,
            label,
        }
    }

    pub fn record(&self, status: u16, duration: Duration) {
        let labels = || RequestLabels {
            route: self.label.clone(),
            status,
        };
        match self.by_status.get(usize::from(status).wrapping_sub(100)) {
            Some(slot) => slot
                .get_or_init(|| self.requests.get_or_create(&labels()).clone())
                .inc(),
            None => self.requests.get_or_create(&labels()).inc(),
        };
        self.duration.observe(duration.as_secs_f64());
    }
}

/// The process's metrics. Shared by every worker; lives as long as the process
/// (a reload keeps the counts).
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub upstream_errors: Family<KindLabels, Counter>,
    /// Log lines dropped because nobody read standard output (or error);
    /// brought up to date at each scrape.
    log_lines_dropped: Counter,
    /// Requests whose client went away while its body was being forwarded:
    /// not an upstream fault, so kept out of `upstream_errors`.
    pub client_aborts: Counter,
    pub rejections: Family<ReasonLabels, Counter>,
    pub active_connections: Gauge<i64, AtomicI64>,
    pub tls_handshakes: Family<VersionLabels, Counter>,
    /// 1 while the last `[redis]` operation succeeded; 0 before the first,
    /// while the circuit is open, and without `[redis]`.
    pub redis_up: Gauge,
    pub redis_errors: Family<KindLabels, Counter>,
    /// Answers and failures per upstream server, by status class
    /// (`2xx`...`5xx`, or `error` when no answer came).
    pub upstream_requests: Family<UpstreamRequestLabels, Counter>,
    /// 1 while a server takes requests (health checks pass, not ejected);
    /// set at each scrape from the health state.
    pub upstream_healthy: Family<UpstreamServerLabels, Gauge>,
    /// Requests in flight per server, every worker's summed at each scrape.
    pub upstream_in_flight: Family<UpstreamServerLabels, Gauge>,
    /// ACME orders, by result (`success`, `failure`).
    pub acme_renewals: Family<ResultLabels, Counter>,
    /// Seconds left of each certificate served, set at each scrape.
    pub cert_expiry: Family<NameLabels, Gauge>,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let upstream_errors = Family::<KindLabels, Counter>::default();
        let client_aborts = Counter::default();
        let log_lines_dropped = Counter::default();
        let rejections = Family::<ReasonLabels, Counter>::default();
        let active_connections = Gauge::<i64, AtomicI64>::default();
        let tls_handshakes = Family::<VersionLabels, Counter>::default();
        let redis_up = Gauge::default();
        let redis_errors = Family::<KindLabels, Counter>::default();
        let upstream_requests = Family::<UpstreamRequestLabels, Counter>::default();
        let upstream_healthy = Family::<UpstreamServerLabels, Gauge>::default();
        let upstream_in_flight = Family::<UpstreamServerLabels, Gauge>::default();
        let acme_renewals = Family::<ResultLabels, Counter>::default();
        let cert_expiry = Family::<NameLabels, Gauge>::default();
        let mut registry = Registry::with_prefix("portcullis");
        registry.register(
            "acme_renewals",
            "ACME certificate orders, by result (success, failure)",
            acme_renewals.clone(),
        );
        registry.register(
            "cert_expiry_seconds",
            "Seconds left before each served certificate expires, by name",
            cert_expiry.clone(),
        );
        registry.register(
            "upstream_requests",
            "Requests sent to each upstream server, by status class (error: no answer)",
            upstream_requests.clone(),
        );
        registry.register(
            "upstream_healthy",
            "1 while an upstream server takes requests (health checks pass, not ejected)",
            upstream_healthy.clone(),
        );
        registry.register(
            "upstream_in_flight",
            "Requests in flight to each upstream server",
            upstream_in_flight.clone(),
        );
        registry.register(
            "requests",
            "Requests answered, by route and status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request head to response head, by route",
            duration.clone(),
        );
        registry.register(
            "upstream_errors",
            "Failures talking to the upstream, by kind (connect, timeout, reset)",
            upstream_errors.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because standard output (or error) was not being read",
            log_lines_dropped.clone(),
        );
        registry.register(
            "client_aborts",
            "Requests whose client stopped sending its body before the end",
            client_aborts.clone(),
        );
        registry.register(
            "rejections",
            "Requests refused by a policy, by reason",
            rejections.clone(),
        );
        registry.register(
            "active_connections",
            "Client connections currently open",
            active_connections.clone(),
        );
        registry.register(
            "tls_handshakes",
            "Completed TLS handshakes, by protocol version",
            tls_handshakes.clone(),
        );
        registry.register(
            "redis_up",
            "1 while the last [redis] operation succeeded, else 0",
            redis_up.clone(),
        );
        registry.register(
            "redis_errors",
            "Failed [redis] operations, by kind (timeout, refused, error)",
            redis_errors.clone(),
        );
        // Every known label value starts at 0, so each family is exposed from
        // the first scrape and `rate()`/`increase()` see the first event.
        for kind in UPSTREAM_ERROR_KINDS {
            let _ = upstream_errors.get_or_create(&KindLabels { kind });
        }
        for reason in REJECTION_REASONS {
            let _ = rejections.get_or_create(&ReasonLabels { reason });
        }
        for kind in ["timeout", "refused", "error"] {
            let _ = redis_errors.get_or_create(&KindLabels { kind });
        }
        for version in ["1.2", "1.3"] {
            let _ = tls_handshakes.get_or_create(&VersionLabels { version });
        }
        for result in ["success", "failure"] {
            let _ = acme_renewals.get_or_create(&ResultLabels { result });
        }
        Metrics {
            acme_renewals,
            cert_expiry,
            upstream_requests,
            upstream_healthy,
            upstream_in_flight,
            requests,
            duration,
            upstream_errors,
            client_aborts,
            log_lines_dropped,
            rejections,
            active_connections,
            tls_handshakes,
            redis_up,
            redis_errors,
            registry,
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let dropped = dropped_log_lines();
        let counted = self.log_lines_dropped.get();
        if dropped > counted {
            self.log_lines_dropped.inc_by(dropped - counted);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::LoggedPath;

    #[test]
    fn parameter_values_never_reach_the_log() {
        let logged = |p: &str| LoggedPath(p).to_string();
        assert_eq!(logged("/app;jsessionid=SECRET"), "/app;jsessionid");
        assert_eq!(logged("/a;x=1;y/b;z=2=3/c;flag"), "/a;x;y/b;z/c;flag");
        assert_eq!(logged("/plain/path"), "/plain/path");
        assert_eq!(logged(";k=v"), ";k");
        assert_eq!(logged("/"), "/");
    }
}
