//! `proxy.toml` as written: serde structures that mirror the file one to one.
//!
//! Everything here is syntax: unknown keys are refused (`deny_unknown_fields`),
//! and values with a unit are parsed by [`super::units`] while the TOML
//! position is still known. Meaning (files exist, keys match certificates,
//! routes don't collide) is checked in [`super::validate`].

use std::collections::BTreeMap;

use serde::Deserialize;

use super::units::{DurationValue, SizeValue};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub server: ServerSection,
    pub tls: Option<TlsSection>,
    pub upstream: UpstreamSection,
    /// Named upstream groups (`[upstreams.billing]`), reached by a route's `upstream`.
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamSection>,
    #[serde(default)]
    pub hsts: HstsSection,
    #[serde(default)]
    pub cookies: CookiesSection,
    #[serde(default)]
    pub headers: HeadersSection,
    pub jwt: Option<JwtSection>,
    #[serde(default)]
    pub log: LogSection,
    pub redis: Option<RedisSection>,
    pub acme: Option<AcmeSection>,
    #[serde(default)]
    pub routes: Vec<RouteSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub https_listen: String,
    pub http_listen: Option<String>,
    pub redirect_https_port: Option<u16>,
    pub admin_listen: Option<String>,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    #[serde(default = "defaults::header_read_timeout")]
    pub header_read_timeout: DurationValue,
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: DurationValue,
    #[serde(default = "defaults::shutdown_timeout")]
    pub shutdown_timeout: DurationValue,
    #[serde(default = "defaults::send_timeout")]
    pub send_timeout: DurationValue,
    #[serde(default = "defaults::websocket_idle_timeout")]
    pub websocket_idle_timeout: DurationValue,
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: SizeValue,
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: SizeValue,
    #[serde(default)]
    pub case_insensitive_routes: bool,
    /// Not in SPEC: worker threads, each with its own runtime and listener
    /// (SO_REUSEPORT). Defaults to the number of cores.
    pub workers: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: Option<String>,
    pub key: Option<String>,
    #[serde(default = "defaults::min_version")]
    pub min_version: String,
    #[serde(default = "defaults::alpn")]
    pub alpn: Vec<String>,
    #[serde(default)]
    pub sni: Vec<SniSection>,
}

/// `[tls]` left out (with `[acme]`): every key at its default.
impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            cert: None,
            key: None,
            min_version: defaults::min_version(),
            alpn: defaults::alpn(),
            sni: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniSection {
    pub server_name: String,
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// One server; `servers` names several replicas instead.
    pub url: Option<String>,
    pub servers: Option<Vec<String>>,
    #[serde(default = "defaults::balance")]
    pub balance: String,
    #[serde(default = "defaults::retries")]
    pub retries: u32,
    pub health_check: Option<HealthCheckSection>,
    pub eject: Option<EjectSection>,
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: DurationValue,
    #[serde(default = "defaults::upstream_timeout")]
    pub timeout: DurationValue,
    #[serde(default = "defaults::pool_idle_timeout")]
    pub pool_idle_timeout: DurationValue,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSection {
    pub path: String,
    #[serde(default = "defaults::health_interval")]
    pub interval: DurationValue,
    #[serde(default = "defaults::health_timeout")]
    pub timeout: DurationValue,
    #[serde(default = "defaults::health_healthy")]
    pub healthy: u32,
    #[serde(default = "defaults::health_unhealthy")]
    pub unhealthy: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EjectSection {
    #[serde(default = "defaults::eject_failures")]
    pub consecutive_failures: u32,
    #[serde(default = "defaults::eject_duration")]
    pub duration: DurationValue,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HstsSection {
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    #[serde(default = "defaults::hsts_max_age")]
    pub max_age: u64,
    #[serde(default = "defaults::yes")]
    pub include_subdomains: bool,
    #[serde(default)]
    pub preload: bool,
}

impl Default for HstsSection {
    fn default() -> Self {
        HstsSection {
            enabled: true,
            max_age: defaults::hsts_max_age(),
            include_subdomains: true,
            preload: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CookiesSection {
    #[serde(default = "defaults::yes")]
    pub secure: bool,
    #[serde(default = "defaults::yes")]
    pub http_only: bool,
    #[serde(default = "defaults::same_site")]
    pub same_site: String,
}

impl Default for CookiesSection {
    fn default() -> Self {
        CookiesSection {
            secure: true,
            http_only: true,
            same_site: defaults::same_site(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadersSection {
    #[serde(default = "defaults::headers_add")]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default = "defaults::headers_remove")]
    pub remove: Vec<String>,
}

impl Default for HeadersSection {
    fn default() -> Self {
        HeadersSection {
            add: defaults::headers_add(),
            set: BTreeMap::new(),
            remove: defaults::headers_remove(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSection {
    #[serde(default = "defaults::jwt_algorithms")]
    pub algorithms: Vec<String>,
    #[serde(default = "defaults::secret_env")]
    pub secret_env: String,
    pub public_key: Option<String>,
    pub jwks: Option<String>,
    pub jwks_url: Option<String>,
    #[serde(default = "defaults::jwks_refresh")]
    pub jwks_refresh: DurationValue,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    #[serde(default = "defaults::leeway")]
    pub leeway: DurationValue,
    #[serde(default = "defaults::forward_claims")]
    pub forward_claims: BTreeMap<String, String>,
    pub token_cookie: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    #[serde(default = "defaults::log_format")]
    pub format: String,
    #[serde(default = "defaults::log_level")]
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: defaults::log_format(),
            level: defaults::log_level(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSection {
    #[serde(default = "defaults::redis_url")]
    pub url: String,
    #[serde(default = "defaults::redis_prefix")]
    pub key_prefix: String,
    #[serde(default = "defaults::redis_timeout")]
    pub timeout: DurationValue,
    #[serde(default = "defaults::redis_on_error")]
    pub on_error: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeSection {
    pub domains: Vec<String>,
    pub email: Option<String>,
    #[serde(default = "defaults::acme_directory")]
    pub directory: String,
    #[serde(default = "defaults::acme_challenge")]
    pub challenge: String,
    #[serde(default = "defaults::acme_cache_dir")]
    pub cache_dir: String,
    #[serde(default = "defaults::acme_renew_before")]
    pub renew_before: DurationValue,
    pub directory_ca: Option<String>,
    /// External account binding (ZeroSSL, Google, a corporate CA): the key
    /// id the CA gave, and the environment variable holding its base64url
    /// MAC key (a secret, so never in the file).
    pub eab_kid: Option<String>,
    pub eab_hmac_key_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub path: String,
    pub methods: Option<Vec<String>>,
    #[serde(default)]
    pub jwt: bool,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Claim path → a value or a list of values (checked in validate.rs).
    pub claims: Option<toml::Table>,
    pub rate_limit: Option<RateLimitSection>,
    #[serde(default)]
    pub csrf: bool,
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    pub json_schema: Option<String>,
    pub max_body_bytes: Option<SizeValue>,
    /// A named upstream group (`[upstreams.NAME]`); the default group without it.
    pub upstream: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    pub rate: String,
    pub burst: Option<u32>,
    #[serde(default = "defaults::rate_limit_key")]
    pub key: String,
}

/// The defaults written in SPEC's example; each is the secure choice.
mod defaults {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::{DurationValue, SizeValue};

    pub fn yes() -> bool {
        true
    }
    pub fn max_connections() -> usize {
        10_000
    }
    pub fn header_read_timeout() -> DurationValue {
        DurationValue(Duration::from_secs(10))
    }
    pub fn idle_timeout() -> DurationValue {
        DurationValue(Duration::from_secs(60))
    }
    pub fn send_timeout() -> DurationValue {
        DurationValue(Duration::from_secs(60))
    }
    pub fn websocket_idle_timeout() -> DurationValue {
        DurationValue(Duration::from_secs(3600))
    }
    pub fn shutdown_timeout() -> DurationValue {
        DurationValue(Duration::from_secs(30))
    }
    pub fn max_header_bytes() -> SizeValue {
        SizeValue(16 << 10)
    }
    pub fn max_body_bytes() -> SizeValue {
        SizeValue(10 << 20)
    }
    pub fn min_version() -> String {
        "1.2".into()
    }
    pub fn alpn() -> Vec<String> {
        vec!["h2".into(), "http/1.1".into()]
    }
    pub fn connect_timeout() -> DurationValue {
        DurationValue(Duration::from_secs(5))
    }
    pub fn balance() -> String {
        "least_request".into()
    }

    pub fn retries() -> u32 {
        1
    }

    pub fn health_interval() -> DurationValue {
        DurationValue(Duration::from_secs(5))
    }

    pub fn health_timeout() -> DurationValue {
        DurationValue(Duration::from_secs(1))
    }

    pub fn health_healthy() -> u32 {
        2
    }

    pub fn health_unhealthy() -> u32 {
        3
    }

    pub fn eject_failures() -> u32 {
        5
    }

    pub fn eject_duration() -> DurationValue {
        DurationValue(Duration::from_secs(30))
    }

    pub fn upstream_timeout() -> DurationValue {
        DurationValue(Duration::from_secs(30))
    }
    pub fn pool_idle_timeout() -> DurationValue {
        DurationValue(Duration::from_secs(90))
    }
    pub fn hsts_max_age() -> u64 {
        31_536_000
    }
    pub fn same_site() -> String {
        "Lax".into()
    }
    pub fn headers_add() -> BTreeMap<String, String> {
        [
            ("X-Content-Type-Options", "nosniff"),
            ("X-Frame-Options", "DENY"),
            ("Referrer-Policy", "strict-origin-when-cross-origin"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
    pub fn headers_remove() -> Vec<String> {
        vec!["Server".into(), "X-Powered-By".into()]
    }
    pub fn jwt_algorithms() -> Vec<String> {
        vec!["HS256".into()]
    }
    pub fn jwks_refresh() -> DurationValue {
        DurationValue(Duration::from_secs(600))
    }
    pub fn leeway() -> DurationValue {
        DurationValue(Duration::from_secs(30))
    }
    pub fn log_format() -> String {
        "json".into()
    }
    pub fn log_level() -> String {
        "info".into()
    }
    pub fn secret_env() -> String {
        "JWT_SECRET".into()
    }
    pub fn forward_claims() -> BTreeMap<String, String> {
        [("sub", "X-Auth-Subject"), ("scope", "X-Auth-Scope")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
    pub fn redis_url() -> String {
        "redis://127.0.0.1:6379".into()
    }
    pub fn redis_prefix() -> String {
        "portcullis".into()
    }
    pub fn redis_timeout() -> DurationValue {
        DurationValue(Duration::from_millis(25))
    }
    pub fn redis_on_error() -> String {
        "local".into()
    }
    pub fn acme_directory() -> String {
        "https://acme-v02.api.letsencrypt.org/directory".into()
    }
    pub fn acme_challenge() -> String {
        "http-01".into()
    }
    pub fn acme_cache_dir() -> String {
        "certs/acme".into()
    }
    pub fn acme_renew_before() -> DurationValue {
        DurationValue(Duration::from_secs(30 * 86400))
    }
    pub fn rate_limit_key() -> String {
        "ip".into()
    }
}
