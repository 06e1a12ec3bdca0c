//! Configuration: `proxy.toml` in, a validated [`Config`] out.
//!
//! Loading is two steps kept apart on purpose: [`file`] is the file's syntax
//! (serde structures, unknown keys refused), [`validate`] turns it into types
//! that cannot be invalid (addresses, header names, decoded keys, loaded
//! certificates). The request path never parses configuration. Every error
//! names the file, line, column and key: `proxy.toml:14:9: routes[2].rate_limit.rate: ...`.

pub mod file;
pub mod units;
pub mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use ipnet::IpNet;
use rustls::sign::CertifiedKey;

use crate::filters::cookies::CookiePolicy;
use crate::policy::csrf::Origin;
use crate::policy::jwt::{JwtSettings, VerifierConfig};
use crate::policy::rate_limit::RateLimitSpec;
use crate::policy::schema::RouteSchema;

/// The validated configuration: everything the runtime needs, already checked
/// and decoded (certificates loaded, keys parsed, headers built).
pub struct Config {
    pub path: PathBuf,
    pub server: Server,
    pub tls: Tls,
    /// `[upstream]`, the group routes use unless they name another.
    pub upstream: Upstream,
    /// `[upstreams.NAME]`, in name order.
    pub upstreams: Vec<Upstream>,
    /// The `Strict-Transport-Security` value, or `None` when disabled.
    pub hsts: Option<HeaderValue>,
    pub cookies: CookiePolicy,
    pub headers: HeaderRules,
    pub jwt: Option<Jwt>,
    pub log: Log,
    pub redis: Option<Redis>,
    pub acme: Option<Acme>,
    pub routes: Vec<Route>,
}

pub struct Server {
    pub https_listen: SocketAddr,
    pub http_listen: Option<SocketAddr>,
    /// The port written in redirects when set; otherwise the HTTPS listener's
    /// bound port. Omitted from the redirect when it is 443.
    pub redirect_https_port: Option<u16>,
    pub admin_listen: Option<SocketAddr>,
    pub trusted_proxies: Vec<IpNet>,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// A response write (or a tunnel's) that makes no progress this long
    /// closes the connection and releases the upstream side.
    pub send_timeout: Duration,
    /// A WebSocket tunnel with no bytes either way this long is closed.
    pub websocket_idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
    /// Routes match ASCII case-insensitively (for upstreams that route so);
    /// the upstream still gets the path as sent.
    pub case_insensitive_routes: bool,
    pub workers: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

pub struct Tls {
    /// `tls.cert` and `tls.key`; `None` with `[acme]` alone, whose
    /// certificate is then the default one.
    pub default_cert: Option<Arc<CertifiedKey>>,
    pub cert_path: Option<PathBuf>,
    pub sni: Vec<SniCert>,
    pub min_version: TlsVersion,
    pub alpn: Vec<Vec<u8>>,
}

pub struct SniCert {
    /// Lower-cased DNS name, as rustls hands SNI to the resolver.
    pub server_name: String,
    pub cert: Arc<CertifiedKey>,
}

impl Config {
    /// Every upstream group: `[upstream]` first, then the named ones; a
    /// route's [`Route::upstream`] indexes this order.
    pub fn upstream_groups(&self) -> impl Iterator<Item = &Upstream> {
        std::iter::once(&self.upstream).chain(self.upstreams.iter())
    }
}

/// One upstream group: the servers of one app and how requests spread over them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `default` for `[upstream]`, else the table's name; a metric and log label.
    pub name: Arc<str>,
    /// At least one.
    pub servers: Vec<ServerAddress>,
    pub balance: Balance,
    /// Extra attempts on another server, when the request is safe to send again.
    pub retries: u32,
    pub health_check: Option<HealthCheck>,
    pub eject: Eject,
    pub connect_timeout: Duration,
    /// To the response head, every attempt included.
    pub timeout: Duration,
    pub pool_idle_timeout: Duration,
}

impl Upstream {
    /// The `Host` sent when the client's request carried none (HTTP/1.0):
    /// the first TCP server's `host:port`, or `localhost` behind a socket.
    pub fn default_host(&self) -> String {
        self.servers
            .iter()
            .find_map(|server| match server {
                ServerAddress::Tcp(authority) => Some(authority.to_string()),
                ServerAddress::Unix(_) => None,
            })
            .unwrap_or_else(|| "localhost".into())
    }
}

/// Where one upstream server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ServerAddress {
    /// `http://host:port`: `host:port` as written (port 80 when none).
    Tcp(http::uri::Authority),
    /// `unix:/run/app.sock`.
    Unix(PathBuf),
}

impl fmt::Display for ServerAddress {
    /// As written in `proxy.toml`: the `server` label of the metrics.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerAddress::Tcp(authority) => write!(f, "http://{authority}"),
            ServerAddress::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Two random servers, the one with fewer requests in flight (per worker).
    LeastRequest,
    RoundRobin,
    Random,
    /// Rendezvous hashing on the client address: a client stays on its
    /// server, and a server added or removed moves only its share.
    ClientIp,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::LeastRequest => "least_request",
            Balance::RoundRobin => "round_robin",
            Balance::Random => "random",
            Balance::ClientIp => "client_ip",
        }
    }
}

/// `health_check`: `GET path` on every server every `interval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Successes in a row that make an unhealthy server healthy.
    pub healthy: u32,
    /// Failures in a row that make a healthy server unhealthy.
    pub unhealthy: u32,
}

/// `eject`: passive ejection after failures seen by requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eject {
    pub consecutive_failures: u32,
    /// The first ejection's length; doubled for each one that follows
    /// without a success in between.
    pub duration: Duration,
}

#[derive(Default)]
pub struct HeaderRules {
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

pub struct Jwt {
    /// Kept for `portcullis token`, which signs with the same settings.
    pub settings: JwtSettings,
    /// The same settings checked, every static key decoded; the runtime
    /// builds the verifier (and its `jwks_url` fetcher) from it.
    pub verifier: VerifierConfig,
    /// claim name → header sent upstream.
    pub forward_claims: Vec<(String, HeaderName)>,
    pub token_cookie: Option<String>,
}

pub struct Log {
    pub json: bool,
    pub level: String,
}

/// `[redis]`: where rate limits are shared between instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redis {
    /// As written; it may carry a password, so logs use [`Redis::display_url`].
    pub url: String,
    pub key_prefix: String,
    /// Per operation; a slower answer counts as a failure.
    pub timeout: Duration,
    pub on_error: crate::policy::rate_limit::OnError,
}

impl Redis {
    /// The URL without its user information (`redis://:secret@host` →
    /// `redis://host`) or query, for logs and errors.
    pub fn display_url(&self) -> String {
        redacted_url(&self.url)
    }
}

/// `url` without user information (anything between `://` and the last `@`
/// of its authority) or query (`unix:///run/redis.sock?pass=...`).
pub fn redacted_url(url: &str) -> String {
    let url = url.split_once('?').map_or(url, |(before, _)| before);
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Parsed and checked, not yet used by this build (see README, "Not yet built").
/// `[acme]`. Compared whole on reload: the ACME manager is kept when
/// nothing here changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Acme {
    /// Lower-cased DNS names, in the order written: one certificate for all.
    pub domains: Vec<String>,
    pub email: Option<String>,
    pub directory: String,
    pub challenge: AcmeChallenge,
    /// Resolved against the configuration file's directory.
    pub cache_dir: PathBuf,
    pub renew_before: Duration,
    /// Extra roots trusted for the directory's HTTPS only (a test CA).
    pub directory_ca: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// External account binding, for a CA that requires it.
    pub eab: Option<ExternalAccount>,
}

/// `eab_kid` and the MAC key read from `eab_hmac_key_env`.
#[derive(Clone, PartialEq)]
pub struct ExternalAccount {
    pub kid: String,
    /// The environment variable the key came from, for `check`.
    pub key_env: String,
    pub hmac_key: Vec<u8>,
}

/// The key never reaches a log, even through `{:?}`.
impl fmt::Debug for ExternalAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExternalAccount")
            .field("kid", &self.kid)
            .field("key_env", &self.key_env)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeChallenge {
    /// Answered on `http_listen` at `/.well-known/acme-challenge/TOKEN`.
    Http01,
    /// Answered in the TLS handshake on `https_listen` (ALPN `acme-tls/1`).
    TlsAlpn01,
}

impl AcmeChallenge {
    pub fn as_str(self) -> &'static str {
        match self {
            AcmeChallenge::Http01 => "http-01",
            AcmeChallenge::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

#[derive(Clone)]
pub struct Route {
    /// The route's `path` as written (already normalized), also its log label.
    pub path: String,
    pub methods: Option<Vec<Method>>,
    pub jwt: bool,
    pub scopes: Vec<String>,
    /// Claim rules, in the order written; empty when none.
    pub claims: Vec<crate::policy::claims::ClaimRule>,
    pub rate_limit: Option<RateLimitSpec>,
    pub csrf: bool,
    /// Origins accepted by the CSRF check besides the request's own.
    pub allowed_origins: Vec<Origin>,
    /// Compiled once per load; shared by the route's runtime across reloads of other keys.
    pub json_schema: Option<Arc<RouteSchema>>,
    pub max_body_bytes: Option<u64>,
    /// Index into [`Config::upstream_groups`]: 0 is `[upstream]`.
    pub upstream: usize,
}

/// A configuration error with its place: `file:line:col: key: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based; `None` when the error has no place in the file (it cannot be read, say).
    pub position: Option<(usize, usize)>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, col)) => write!(f, "{}:{line}:{col}: ", self.file)?,
            None => write!(f, "{}: ", self.file)?,
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Reads, parses and validates `path`, loading every file it names.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let display = path.display().to_string();
    let source = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: display.clone(),
        position: None,
        key: String::new(),
        message: format!("cannot read the configuration file: {e}"),
    })?;
    load_str(&source, path)
}

/// Validates configuration text as if read from `path` (relative file names
/// in it are resolved against `path`'s directory).
pub fn load_str(source: &str, path: &Path) -> Result<Config, ConfigError> {
    let display = path.display().to_string();
    let file = parse(source).map_err(|(span, key, message)| ConfigError {
        position: span.map(|s| line_col(source, s.start)),
        file: display.clone(),
        key,
        message,
    })?;
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    validate::validate(file, &base_dir, path).map_err(|e| ConfigError {
        position: locate(source, &e.key).map(|offset| line_col(source, offset)),
        file: display,
        key: e.key,
        message: e.message,
    })
}

type ParseFailure = (Option<std::ops::Range<usize>>, String, String);

fn parse(source: &str) -> Result<file::FileConfig, ParseFailure> {
    let deserializer = toml::Deserializer::parse(source)
        .map_err(|e| (e.span(), String::new(), e.message().to_string()))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let key = if path == "." { String::new() } else { path };
        (inner.span(), key, inner.message().to_string())
    })
}

/// Byte offset of the value at a dotted key path such as `routes[2].rate_limit.rate`.
fn locate(source: &str, key: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(source).ok()?;
    let mut current: Option<&toml::Spanned<DeValue>> = None;
    let mut table = Some(root.get_ref());
    let mut span = root.span();
    for part in key.split('.') {
        let (name, indices) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            let value = table?.get(name)?;
            span = value.span();
            current = Some(value);
        }
        for index in indices.split(['[', ']']).filter(|s| !s.is_empty()) {
            let index: usize = index.parse().ok()?;
            let value = current?.get_ref().as_array()?.get(index)?;
            span = value.span();
            current = Some(value);
        }
        table = current.and_then(|v| v.get_ref().as_table());
    }
    Some(span.start)
}

fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let before = &source[..offset.min(source.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("a\nbc = 1", 2), (2, 1));
        assert_eq!(line_col("a\nbc = 1", 7), (2, 6));
    }

    #[test]
    fn locate_walks_arrays_of_tables() {
        let src = "[server]\nx = 1\n[[routes]]\npath = \"/a\"\n[[routes]]\npath = \"/b\"\nrate_limit = { rate = \"ten\" }\n";
        let offset = locate(src, "routes[1].rate_limit.rate").unwrap();
        assert_eq!(line_col(src, offset), (7, 23));
    }
}

#[cfg(test)]
mod redis_url_tests {
    use super::redacted_url;

    #[test]
    fn a_password_never_reaches_a_log() {
        assert_eq!(
            redacted_url("redis://:s3cret@10.0.0.5:6379/0"),
            "redis://10.0.0.5:6379/0"
        );
        assert_eq!(
            redacted_url("rediss://user:p@ss@cache.internal:6380"),
            "rediss://cache.internal:6380"
        );
        assert_eq!(
            redacted_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redacted_url("unix:///run/redis.sock"),
            "unix:///run/redis.sock"
        );
        assert_eq!(
            redacted_url("unix:///run/redis.sock?db=1&pass=s3cret"),
            "unix:///run/redis.sock"
        );
        assert_eq!(redacted_url("redis://host:1/0#a@b"), "redis://host:1/0#a@b");
    }
}
