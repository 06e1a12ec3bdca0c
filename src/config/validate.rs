//! From the file's syntax to a [`Config`] that cannot be invalid: addresses
//! parsed, header names checked, certificates and keys loaded and matched,
//! JWT keys decoded, routes normalized and unique.
//!
//! Errors carry the dotted key (`routes[2].rate_limit.rate`); [`super::load_str`]
//! turns the key into a line and column.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use http::{HeaderName, HeaderValue, Method};
use ipnet::IpNet;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::file::{self, FileConfig};
use super::{
    Acme, AcmeChallenge, Balance, Config, Eject, ExternalAccount, HeaderRules, HealthCheck, Jwt,
    Log, Redis, Route, Server, ServerAddress, SniCert, Tls, TlsVersion, Upstream,
};
use crate::filters::cookies::{CookiePolicy, SameSite};
use crate::policy::claims::{ClaimRule, ClaimValue};
use crate::policy::csrf::Origin;
use crate::policy::jwt::{JwtSettings, KeyFile, VerifierConfig};
use crate::policy::rate_limit::{KeySource, Rate, RateLimitSpec};
use crate::policy::schema::RouteSchema;

/// A validation failure at a dotted key.
#[derive(Debug)]
pub struct Invalid {
    pub key: String,
    pub message: String,
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        key: key.into(),
        message: message.into(),
    }
}

type Result<T> = std::result::Result<T, Invalid>;

pub fn validate(file: FileConfig, base_dir: &Path, config_path: &Path) -> Result<Config> {
    let server = server(&file.server)?;
    let acme = file
        .acme
        .as_ref()
        .map(|section| acme(section, base_dir))
        .transpose()?;
    let tls = match (&file.tls, &acme) {
        (Some(section), _) => tls(section, base_dir, acme.is_some())?,
        (None, Some(_)) => tls(&file::TlsSection::default(), base_dir, true)?,
        (None, None) => {
            return Err(invalid(
                "tls",
                "missing: the [tls] section with cert and key (or an [acme] section) is required",
            ));
        }
    };
    if let Some(acme) = &acme
        && acme.challenge == AcmeChallenge::Http01
        && server.http_listen.is_none()
    {
        return Err(invalid(
            "acme.challenge",
            r#""http-01" is answered on server.http_listen, which is not set (set it, or use "tls-alpn-01")"#,
        ));
    }
    let jwt = match &file.jwt {
        Some(section) => Some(jwt(section, base_dir)?),
        None => None,
    };
    let default_upstream = upstream("upstream", "default", &file.upstream)?;
    let upstreams = file
        .upstreams
        .iter()
        .map(|(name, section)| upstream(&format!("upstreams.{name}"), name, section))
        .collect::<Result<Vec<_>>>()?;
    let routes = routes(&file.routes, jwt.is_some(), &server, base_dir, &upstreams)?;
    Ok(Config {
        path: config_path.to_path_buf(),
        server,
        tls,
        upstream: default_upstream,
        upstreams,
        hsts: hsts(&file.hsts)?,
        cookies: cookies(&file.cookies)?,
        headers: headers(&file.headers)?,
        jwt,
        log: log(&file.log)?,
        redis: file.redis.as_ref().map(redis).transpose()?,
        acme,
        routes,
    })
}

fn socket_addr(key: &str, text: &str) -> Result<SocketAddr> {
    text.parse().map_err(|_| {
        invalid(
            key,
            format!(r#"expected an address such as "0.0.0.0:8443" or "[::1]:8443", got "{text}""#),
        )
    })
}

fn server(s: &file::ServerSection) -> Result<Server> {
    let https_listen = socket_addr("server.https_listen", &s.https_listen)?;
    let http_listen = s
        .http_listen
        .as_deref()
        .map(|a| socket_addr("server.http_listen", a))
        .transpose()?;
    let admin_listen = s
        .admin_listen
        .as_deref()
        .map(|a| socket_addr("server.admin_listen", a))
        .transpose()?;
    if s.redirect_https_port == Some(0) {
        return Err(invalid(
            "server.redirect_https_port",
            "must be a port from 1 to 65535",
        ));
    }
    let trusted_proxies = s
        .trusted_proxies
        .iter()
        .enumerate()
        .map(|(i, text)| {
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    invalid(
                        format!("server.trusted_proxies[{i}]"),
                        format!(
                            r#"expected an address or CIDR such as "10.0.0.0/8", got "{text}""#
                        ),
                    )
                })
        })
        .collect::<Result<Vec<_>>>()?;
    if s.max_connections == 0 {
        return Err(invalid("server.max_connections", "must be at least 1"));
    }
    for (key, value) in [
        ("server.header_read_timeout", s.header_read_timeout),
        ("server.idle_timeout", s.idle_timeout),
        ("server.send_timeout", s.send_timeout),
        ("server.websocket_idle_timeout", s.websocket_idle_timeout),
    ] {
        if value.0.is_zero() {
            return Err(invalid(key, "must be longer than 0s"));
        }
    }
    let max_header_bytes = usize::try_from(s.max_header_bytes.0)
        .ok()
        .filter(|n| (1024..=1 << 20).contains(n))
        .ok_or_else(|| invalid("server.max_header_bytes", "must be between 1KiB and 1MiB"))?;
    let workers = match s.workers {
        Some(0) => return Err(invalid("server.workers", "must be at least 1")),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    Ok(Server {
        https_listen,
        http_listen,
        redirect_https_port: s.redirect_https_port,
        admin_listen,
        trusted_proxies,
        max_connections: s.max_connections,
        header_read_timeout: s.header_read_timeout.0,
        idle_timeout: s.idle_timeout.0,
        shutdown_timeout: s.shutdown_timeout.0,
        send_timeout: s.send_timeout.0,
        websocket_idle_timeout: s.websocket_idle_timeout.0,
        max_header_bytes,
        max_body_bytes: s.max_body_bytes.0,
        case_insensitive_routes: s.case_insensitive_routes,
        workers,
    })
}

fn resolve(base_dir: &Path, name: &str) -> PathBuf {
    let path = Path::new(name);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base_dir.join(path)
    }
}

fn read_file(key: &str, base_dir: &Path, name: &str) -> Result<Vec<u8>> {
    let path = resolve(base_dir, name);
    std::fs::read(&path).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound => "no such file".to_string(),
            _ => e.to_string(),
        };
        let hint = if key.starts_with("tls.") {
            " (for development, `portcullis gen-cert` writes one)"
        } else {
            ""
        };
        invalid(key, format!("cannot read {}: {why}{hint}", path.display()))
    })
}

/// Loads a PEM certificate chain and its private key and checks that they belong together.
pub fn load_certified_key(
    base_dir: &Path,
    cert_key: &str,
    cert_name: &str,
    key_key: &str,
    key_name: &str,
) -> Result<Arc<CertifiedKey>> {
    let cert_pem = read_file(cert_key, base_dir, cert_name)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| invalid(cert_key, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(invalid(cert_key, "no certificate found in the PEM file"));
    }
    let key_pem = read_file(key_key, base_dir, key_name)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        invalid(
            key_key,
            format!("not a PKCS#8, PKCS#1 or SEC1 PEM private key: {e}"),
        )
    })?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| invalid(key_key, format!("unsupported private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|_| {
        invalid(
            key_key,
            format!("this key does not match the certificate in {cert_name}"),
        )
    })?;
    Ok(Arc::new(certified))
}

/// `[tls]`; with `[acme]`, `cert` and `key` may be left out (then ACME's
/// certificate is the default one).
fn tls(s: &file::TlsSection, base_dir: &Path, acme: bool) -> Result<Tls> {
    let default_cert = match (s.cert.as_deref(), s.key.as_deref()) {
        (Some(cert_name), Some(key_name)) => Some((
            load_certified_key(base_dir, "tls.cert", cert_name, "tls.key", key_name)?,
            resolve(base_dir, cert_name),
        )),
        (None, None) if acme => None,
        (None, None) => {
            return Err(invalid(
                "tls.cert",
                "missing: tls.cert and tls.key are required (or an [acme] section)",
            ));
        }
        (Some(_), None) => return Err(invalid("tls.key", "missing: required with tls.cert")),
        (None, Some(_)) => return Err(invalid("tls.cert", "missing: required with tls.key")),
    };
    let (default_cert, cert_path) = default_cert.unzip();
    let min_version = match s.min_version.as_str() {
        "1.2" => TlsVersion::Tls12,
        "1.3" => TlsVersion::Tls13,
        other => {
            return Err(invalid(
                "tls.min_version",
                format!(
                    r#"expected "1.2" or "1.3" (older versions are never offered), got "{other}""#
                ),
            ));
        }
    };
    let mut alpn = Vec::new();
    for (i, proto) in s.alpn.iter().enumerate() {
        match proto.as_str() {
            "h2" | "http/1.1" => alpn.push(proto.as_bytes().to_vec()),
            other => {
                return Err(invalid(
                    format!("tls.alpn[{i}]"),
                    format!(r#"expected "h2" or "http/1.1", got "{other}""#),
                ));
            }
        }
    }
    let mut sni = Vec::new();
    for (i, entry) in s.sni.iter().enumerate() {
        let name = entry.server_name.trim_end_matches('.').to_ascii_lowercase();
        if rustls_pki_types::DnsName::try_from(name.as_str()).is_err() {
            return Err(invalid(
                format!("tls.sni[{i}].server_name"),
                format!(
                    r#"expected a DNS name such as "api.example.com", got "{}""#,
                    entry.server_name
                ),
            ));
        }
        if sni.iter().any(|c: &SniCert| c.server_name == name) {
            return Err(invalid(format!("tls.sni[{i}].server_name"), "listed twice"));
        }
        let cert = load_certified_key(
            base_dir,
            &format!("tls.sni[{i}].cert"),
            &entry.cert,
            &format!("tls.sni[{i}].key"),
            &entry.key,
        )?;
        sni.push(SniCert {
            server_name: name,
            cert,
        });
    }
    Ok(Tls {
        default_cert,
        cert_path,
        sni,
        min_version,
        alpn,
    })
}

/// One upstream group; `table` is `upstream` or `upstreams.NAME`.
fn upstream(table: &str, name: &str, s: &file::UpstreamSection) -> Result<Upstream> {
    let key = |k: &str| format!("{table}.{k}");
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(invalid(
            table,
            format!(r#"an upstream's name is letters, digits, '_' and '-', got "{name}""#),
        ));
    }
    if table != "upstream" && name == "default" {
        return Err(invalid(
            table,
            "\"default\" is the [upstream] table's name: choose another",
        ));
    }
    let servers = match (&s.url, &s.servers) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                key("servers"),
                "url and servers together: write one server in url, or several in servers",
            ));
        }
        (None, None) => {
            return Err(invalid(
                table,
                "missing: url (one server) or servers (several) is required",
            ));
        }
        (Some(url), None) => vec![server_address(&key("url"), url)?],
        (None, Some(list)) => {
            if list.is_empty() {
                return Err(invalid(
                    key("servers"),
                    "list at least one server, such as \"http://10.0.0.1:3000\"",
                ));
            }
            if list.len() > crate::upstream::MAX_SERVERS {
                return Err(invalid(
                    key("servers"),
                    format!(
                        "at most {} servers in a group",
                        crate::upstream::MAX_SERVERS
                    ),
                ));
            }
            let mut servers: Vec<ServerAddress> = Vec::with_capacity(list.len());
            for (i, text) in list.iter().enumerate() {
                let item = format!("{table}.servers[{i}]");
                let address = server_address(&item, text)?;
                if let Some(first) = servers.iter().position(|other| *other == address) {
                    return Err(invalid(
                        item,
                        format!("the same server as servers[{first}]"),
                    ));
                }
                servers.push(address);
            }
            servers
        }
    };
    let balance = match s.balance.as_str() {
        "least_request" => Balance::LeastRequest,
        "round_robin" => Balance::RoundRobin,
        "random" => Balance::Random,
        "client_ip" => Balance::ClientIp,
        other => {
            return Err(invalid(
                key("balance"),
                format!(
                    r#"expected "least_request", "round_robin", "random" or "client_ip", got "{other}""#
                ),
            ));
        }
    };
    if s.retries > 10 {
        return Err(invalid(key("retries"), "at most 10"));
    }
    if s.connect_timeout.0.is_zero() || s.timeout.0.is_zero() {
        let which = if s.timeout.0.is_zero() {
            "timeout"
        } else {
            "connect_timeout"
        };
        return Err(invalid(key(which), "must be longer than 0s"));
    }
    let health_check = s
        .health_check
        .as_ref()
        .map(|h| {
            if !h.path.starts_with('/') || h.path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return Err(invalid(
                    key("health_check.path"),
                    format!(r#"expected a path such as "/healthz", got "{}""#, h.path),
                ));
            }
            for (k, value) in [("interval", h.interval), ("timeout", h.timeout)] {
                if value.0.is_zero() {
                    return Err(invalid(
                        key(&format!("health_check.{k}")),
                        "must be longer than 0s",
                    ));
                }
            }
            for (k, value) in [("healthy", h.healthy), ("unhealthy", h.unhealthy)] {
                if value == 0 {
                    return Err(invalid(
                        key(&format!("health_check.{k}")),
                        "must be at least 1",
                    ));
                }
            }
            Ok(HealthCheck {
                path: h.path.clone(),
                interval: h.interval.0,
                timeout: h.timeout.0,
                healthy: h.healthy,
                unhealthy: h.unhealthy,
            })
        })
        .transpose()?;
    let eject = match &s.eject {
        None => Eject {
            consecutive_failures: 5,
            duration: std::time::Duration::from_secs(30),
        },
        Some(e) => {
            if e.consecutive_failures == 0 {
                return Err(invalid(
                    key("eject.consecutive_failures"),
                    "must be at least 1",
                ));
            }
            if e.duration.0.is_zero() {
                return Err(invalid(key("eject.duration"), "must be longer than 0s"));
            }
            Eject {
                consecutive_failures: e.consecutive_failures,
                duration: e.duration.0,
            }
        }
    };
    Ok(Upstream {
        name: Arc::from(name),
        servers,
        balance,
        retries: s.retries,
        health_check,
        eject,
        connect_timeout: s.connect_timeout.0,
        timeout: s.timeout.0,
        pool_idle_timeout: s.pool_idle_timeout.0,
    })
}

/// `http://host:port` or `unix:/path/to.sock`.
fn server_address(key: &str, text: &str) -> Result<ServerAddress> {
    let bad = |why: &str| invalid(key, format!(r#"{why}, got "{text}""#));
    if let Some(path) = text.strip_prefix("unix:") {
        if path.is_empty() || !path.starts_with('/') {
            return Err(bad(
                "a Unix socket is written with its absolute path, such as \"unix:/run/app.sock\"",
            ));
        }
        return Ok(ServerAddress::Unix(PathBuf::from(path)));
    }
    let uri: http::Uri = text.parse().map_err(|_| {
        bad("expected a URL such as \"http://127.0.0.1:3000\" or \"unix:/run/app.sock\"")
    })?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err(bad("the upstream is spoken to in plain HTTP: use http://")),
        _ => {
            return Err(bad(
                "expected a URL such as \"http://127.0.0.1:3000\" or \"unix:/run/app.sock\"",
            ));
        }
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| bad("expected a host in the URL"))?;
    if authority.as_str().contains('@') {
        return Err(bad("credentials in the upstream URL are not supported"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad(
            "the upstream URL cannot have a path or query; requests keep their own path",
        ));
    }
    Ok(ServerAddress::Tcp(authority))
}

fn hsts(s: &file::HstsSection) -> Result<Option<HeaderValue>> {
    if !s.enabled {
        return Ok(None);
    }
    let mut value = format!("max-age={}", s.max_age);
    if s.include_subdomains {
        value.push_str("; includeSubDomains");
    }
    if s.preload {
        value.push_str("; preload");
    }
    HeaderValue::from_str(&value)
        .map(Some)
        .map_err(|_| invalid("hsts", "cannot build the header"))
}

fn cookies(s: &file::CookiesSection) -> Result<CookiePolicy> {
    let same_site = match s.same_site.to_ascii_lowercase().as_str() {
        "strict" => SameSite::Strict,
        "lax" => SameSite::Lax,
        "none" => SameSite::None,
        "keep" => SameSite::Keep,
        _ => {
            return Err(invalid(
                "cookies.same_site",
                format!(
                    r#"expected "Strict", "Lax", "None" or "keep", got "{}""#,
                    s.same_site
                ),
            ));
        }
    };
    Ok(CookiePolicy {
        secure: s.secure,
        http_only: s.http_only,
        same_site,
    })
}

/// Headers a `forward_claims` entry may not name: the proxy writes the
/// first four itself, and the rest decide how the upstream frames the
/// request or treats the connection.
const PROXY_OWNED_HEADERS: [&str; 11] = [
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
];

fn header_name(key: &str, name: &str) -> Result<HeaderName> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| invalid(key, format!(r#"not a valid header name: "{name}""#)))
}

fn header_pairs(
    section: &str,
    map: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<(HeaderName, HeaderValue)>> {
    map.iter()
        .map(|(name, value)| {
            let key = format!("{section}.{name}");
            let name = header_name(&key, name)?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| invalid(&key, "not a valid header value (control characters?)"))?;
            Ok((name, value))
        })
        .collect()
}

fn headers(s: &file::HeadersSection) -> Result<HeaderRules> {
    let remove = s
        .remove
        .iter()
        .enumerate()
        .map(|(i, name)| header_name(&format!("headers.remove[{i}]"), name))
        .collect::<Result<Vec<_>>>()?;
    Ok(HeaderRules {
        add: header_pairs("headers.add", &s.add)?,
        set: header_pairs("headers.set", &s.set)?,
        remove,
    })
}

fn key_file(key: &str, base_dir: &Path, name: &str) -> Result<KeyFile> {
    Ok(KeyFile {
        name: name.to_string(),
        contents: read_file(key, base_dir, name)?,
    })
}

fn jwt(s: &file::JwtSection, base_dir: &Path) -> Result<Jwt> {
    let uses_hmac = s
        .algorithms
        .iter()
        .any(|a| a.to_ascii_uppercase().starts_with("HS"));
    let secret = if uses_hmac {
        std::env::var_os(&s.secret_env).map(|v| v.as_encoded_bytes().to_vec())
    } else {
        None
    };
    let settings = JwtSettings {
        algorithms: s.algorithms.clone(),
        secret,
        secret_env: Some(s.secret_env.clone()),
        public_key: s
            .public_key
            .as_deref()
            .map(|name| key_file("jwt.public_key", base_dir, name))
            .transpose()?,
        jwks: s
            .jwks
            .as_deref()
            .map(|name| key_file("jwt.jwks", base_dir, name))
            .transpose()?,
        jwks_url: s.jwks_url.clone(),
        jwks_refresh: s.jwks_refresh.0,
        issuer: s.issuer.clone(),
        audience: s.audience.clone(),
        leeway: s.leeway.0,
    };
    // Checked before the key material: a wrong header name is the error to
    // report even where the secret is not set (as under `portcullis check`).
    let mut forward_claims = Vec::new();
    for (claim, header) in &s.forward_claims {
        let key = format!("jwt.forward_claims.{claim}");
        let name = header_name(&key, header)?;
        if PROXY_OWNED_HEADERS.contains(&name.as_str()) {
            return Err(invalid(
                &key,
                format!(
                    r#""{header}" is a header the proxy sets itself or that frames the request; name another, e.g. "X-Auth-{claim}""#
                ),
            ));
        }
        forward_claims.push((claim.clone(), name));
    }
    let verifier = VerifierConfig::new(settings.clone())
        .map_err(|e| invalid(format!("jwt.{}", e.key), e.message))?;
    if let Some(cookie) = &s.token_cookie
        && (cookie.is_empty() || cookie.contains([';', '=', ' ', ',']))
    {
        return Err(invalid(
            "jwt.token_cookie",
            format!(r#"not a valid cookie name: "{cookie}""#),
        ));
    }
    Ok(Jwt {
        settings,
        verifier,
        forward_claims,
        token_cookie: s.token_cookie.clone(),
    })
}

fn log(s: &file::LogSection) -> Result<Log> {
    let json = match s.format.as_str() {
        "json" => true,
        "text" => false,
        other => {
            return Err(invalid(
                "log.format",
                format!(r#"expected "json" or "text", got "{other}""#),
            ));
        }
    };
    if !matches!(
        s.level.as_str(),
        "trace" | "debug" | "info" | "warn" | "error"
    ) {
        return Err(invalid(
            "log.level",
            format!(
                r#"expected "trace", "debug", "info", "warn" or "error", got "{}""#,
                s.level
            ),
        ));
    }
    Ok(Log {
        json,
        level: s.level.clone(),
    })
}

fn redis(s: &file::RedisSection) -> Result<Redis> {
    use redis::IntoConnectionInfo as _;
    let shown = super::redacted_url(&s.url);
    let scheme_ok = ["redis://", "rediss://", "unix://", "redis+unix://"]
        .iter()
        .any(|scheme| s.url.starts_with(scheme));
    if !scheme_ok {
        return Err(invalid(
            "redis.url",
            format!(
                r#"expected "redis://HOST:PORT", "rediss://HOST:PORT" (TLS) or "unix:///PATH", got "{shown}""#
            ),
        ));
    }
    // Parsing only: `check` never contacts Redis.
    if let Err(error) = s.url.as_str().into_connection_info() {
        return Err(invalid(
            "redis.url",
            format!(r#"cannot be used ("{shown}"): {error}"#),
        ));
    }
    if s.timeout.0.is_zero() {
        return Err(invalid(
            "redis.timeout",
            "must be more than 0 (a slower answer counts as a failure)",
        ));
    }
    if s.key_prefix.is_empty()
        || s.key_prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid(
            "redis.key_prefix",
            format!(
                "expected a non-empty prefix without spaces or control characters, got {:?}",
                s.key_prefix
            ),
        ));
    }
    let on_error = s
        .on_error
        .parse()
        .map_err(|message: String| invalid("redis.on_error", message))?;
    Ok(Redis {
        url: s.url.clone(),
        key_prefix: s.key_prefix.clone(),
        timeout: s.timeout.0,
        on_error,
    })
}

fn acme(s: &file::AcmeSection, base_dir: &Path) -> Result<Acme> {
    if s.domains.is_empty() {
        return Err(invalid("acme.domains", "list at least one domain"));
    }
    let mut domains: Vec<String> = Vec::with_capacity(s.domains.len());
    for (i, domain) in s.domains.iter().enumerate() {
        let name = domain.trim_end_matches('.').to_ascii_lowercase();
        let dns_name_ok = rustls_pki_types::DnsName::try_from(name.as_str()).is_ok()
            && name.contains('.')
            && name.parse::<std::net::IpAddr>().is_err()
            && !name.starts_with("*.");
        if !dns_name_ok {
            return Err(invalid(
                format!("acme.domains[{i}]"),
                format!(
                    r#"expected a DNS name such as "www.example.com" (no IP address, no wildcard), got "{domain}""#
                ),
            ));
        }
        if domains.contains(&name) {
            return Err(invalid(format!("acme.domains[{i}]"), "listed twice"));
        }
        domains.push(name);
    }
    let challenge = match s.challenge.as_str() {
        "http-01" => AcmeChallenge::Http01,
        "tls-alpn-01" => AcmeChallenge::TlsAlpn01,
        other => {
            return Err(invalid(
                "acme.challenge",
                format!(r#"expected "http-01" or "tls-alpn-01", got "{other}""#),
            ));
        }
    };
    let directory_ok = s.directory.parse::<http::Uri>().ok().is_some_and(|uri| {
        matches!(uri.scheme_str(), Some("https" | "http")) && uri.host().is_some()
    });
    if !directory_ok {
        return Err(invalid(
            "acme.directory",
            format!(
                r#"expected an absolute https:// URL such as "https://acme-v02.api.letsencrypt.org/directory", got "{}""#,
                s.directory
            ),
        ));
    }
    if s.renew_before.0.is_zero() {
        return Err(invalid(
            "acme.renew_before",
            "must be more than 0 (how long before expiry to renew)",
        ));
    }
    if s.cache_dir.trim().is_empty() {
        return Err(invalid("acme.cache_dir", "must not be empty"));
    }
    if let Some(email) = &s.email
        && (email.is_empty() || !email.contains('@') || email.contains(char::is_whitespace))
    {
        return Err(invalid(
            "acme.email",
            format!(r#"expected an address such as "ops@example.com", got "{email}""#),
        ));
    }
    let directory_ca = match &s.directory_ca {
        Some(name) => {
            let pem = read_file("acme.directory_ca", base_dir, name)?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| invalid("acme.directory_ca", format!("not a PEM certificate: {e}")))?;
            if certs.is_empty() {
                return Err(invalid(
                    "acme.directory_ca",
                    "no certificate found in the PEM file",
                ));
            }
            certs
        }
        None => Vec::new(),
    };
    let eab = match (&s.eab_kid, &s.eab_hmac_key_env) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(invalid(
                "acme.eab_kid",
                "needs eab_hmac_key_env (the variable holding the CA's MAC key)",
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                "acme.eab_hmac_key_env",
                "needs eab_kid (the key id the CA gave with the MAC key)",
            ));
        }
        (Some(kid), Some(env)) => {
            if kid.trim().is_empty() {
                return Err(invalid("acme.eab_kid", "must not be empty"));
            }
            let value = std::env::var(env).map_err(|_| {
                invalid(
                    "acme.eab_hmac_key_env",
                    format!("the environment variable {env} is not set (or not UTF-8)"),
                )
            })?;
            let hmac_key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(value.trim().trim_end_matches('='))
                .ok()
                .filter(|key| !key.is_empty())
                .ok_or_else(|| {
                    invalid(
                        "acme.eab_hmac_key_env",
                        format!("{env} does not hold a base64url MAC key"),
                    )
                })?;
            Some(ExternalAccount {
                kid: kid.clone(),
                key_env: env.clone(),
                hmac_key,
            })
        }
    };
    Ok(Acme {
        eab,
        domains,
        email: s.email.clone(),
        directory: s.directory.clone(),
        challenge,
        cache_dir: resolve(base_dir, &s.cache_dir),
        renew_before: s.renew_before.0,
        directory_ca,
    })
}

/// The body limit of a `json_schema` route that sets none. The body is read
/// whole and judged in place (`policy::json_tape`: an index under its
/// size), but the validator keeps every error it finds before the first 10
/// are reported: a body that fails everywhere takes up to ~40 times its
/// size while it is judged, so the server-wide 10 MiB default would let one
/// request cost 400 MiB.
pub const SCHEMA_DEFAULT_MAX_BODY_BYTES: u64 = 1 << 20;

/// A route's `claims` table as rules: each key a claim path, each value a
/// string, an integer, a boolean or a non-empty list of them.
fn claim_rules(table: &toml::Table, jwt: bool, i: usize) -> Result<Vec<ClaimRule>> {
    let at = |claim: &str| {
        // `locate` walks dotted keys: a claim path with a dot or a quote in
        // it is pointed at by its table, and named in the message.
        if claim.contains(['.', '"']) || claim.is_empty() {
            format!("routes[{i}].claims")
        } else {
            format!("routes[{i}].claims.{claim}")
        }
    };
    if !jwt {
        return Err(invalid(
            format!("routes[{i}].claims"),
            "claims need jwt = true on the same route",
        ));
    }
    if table.is_empty() {
        return Err(invalid(
            format!("routes[{i}].claims"),
            "list at least one claim, or leave the key out",
        ));
    }
    let one = |claim: &str, value: &toml::Value| match value {
        toml::Value::String(s) => Ok(ClaimValue::String(s.clone())),
        toml::Value::Integer(n) => Ok(ClaimValue::Integer(*n)),
        toml::Value::Boolean(b) => Ok(ClaimValue::Bool(*b)),
        other => Err(invalid(
            at(claim),
            format!(
                r#"claim "{claim}": expected a string, an integer, a boolean or a list of them, got {}"#,
                other.type_str()
            ),
        )),
    };
    table
        .iter()
        .map(|(claim, value)| {
            let accepted = match value {
                toml::Value::Array(items) if items.is_empty() => {
                    return Err(invalid(
                        at(claim),
                        format!(r#"claim "{claim}": an empty list would refuse every token"#),
                    ));
                }
                toml::Value::Array(items) => items
                    .iter()
                    .map(|item| one(claim, item))
                    .collect::<Result<Vec<_>>>()?,
                single => vec![one(claim, single)?],
            };
            ClaimRule::parse(claim, accepted).map_err(|why| {
                invalid(
                    at(claim),
                    format!(
                        r#"claim "{claim}": not a claim path ({why}); write a segment with a dot in double quotes, as in '"https://example.com/roles"'"#
                    ),
                )
            })
        })
        .collect()
}

fn routes(
    sections: &[file::RouteSection],
    has_jwt: bool,
    server: &Server,
    base_dir: &Path,
    named_upstreams: &[Upstream],
) -> Result<Vec<Route>> {
    let case_insensitive = server.case_insensitive_routes;
    let mut routes: Vec<Route> = Vec::with_capacity(sections.len());
    for (i, r) in sections.iter().enumerate() {
        let key = |k: &str| format!("routes[{i}].{k}");
        let normalized = crate::path::normalize(&r.path)
            .map_err(|e| invalid(key("path"), format!("not a valid path: {}", e.message())))?;
        if normalized.path != r.path
            || r.path.contains(';')
            || (r.path.len() > 1 && r.path.ends_with('/'))
        {
            return Err(invalid(
                key("path"),
                format!(
                    r#"write the path in normalized form without ';' or a trailing '/', e.g. "{}""#,
                    normalized
                        .match_path()
                        .trim_end_matches('/')
                        .replace("//", "/")
                ),
            ));
        }
        if let Some(first) = routes.iter().position(|other| other.path == r.path) {
            return Err(invalid(
                key("path"),
                format!("the same path as routes[{first}]"),
            ));
        }
        if case_insensitive
            && let Some(first) = routes
                .iter()
                .position(|other| other.path.eq_ignore_ascii_case(&r.path))
        {
            return Err(invalid(
                key("path"),
                format!(
                    "the same path as routes[{first}] when routes match case-insensitively (server.case_insensitive_routes)"
                ),
            ));
        }
        let methods = r
            .methods
            .as_ref()
            .map(|list| {
                if list.is_empty() {
                    return Err(invalid(
                        key("methods"),
                        "list at least one method, or leave the key out",
                    ));
                }
                list.iter()
                    .enumerate()
                    .map(|(j, m)| {
                        let upper = m.to_ascii_uppercase();
                        if upper != *m {
                            return Err(invalid(
                                format!("routes[{i}].methods[{j}]"),
                                format!(r#"methods are upper case: "{upper}""#),
                            ));
                        }
                        Method::from_bytes(m.as_bytes()).map_err(|_| {
                            invalid(
                                format!("routes[{i}].methods[{j}]"),
                                format!(r#"not a method: "{m}""#),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?;
        if r.jwt && !has_jwt {
            return Err(invalid(
                key("jwt"),
                "a route with jwt = true needs a [jwt] section",
            ));
        }
        if let Some((j, bad)) = r
            .scopes
            .iter()
            .enumerate()
            .find(|(_, s)| !crate::policy::scopes::is_valid_scope_token(s))
        {
            return Err(invalid(
                format!("routes[{i}].scopes[{j}]"),
                format!(
                    r#"not a valid scope (RFC 6750: printable ASCII, no space, '"' or '\'): "{bad}""#
                ),
            ));
        }
        if !r.scopes.is_empty() && !r.jwt {
            return Err(invalid(
                key("scopes"),
                "scopes need jwt = true on the same route",
            ));
        }
        let claims = match &r.claims {
            None => Vec::new(),
            Some(table) => claim_rules(table, r.jwt, i)?,
        };
        let rate_limit = r
            .rate_limit
            .as_ref()
            .map(|rl| {
                let rate: Rate = rl
                    .rate
                    .parse()
                    .map_err(|e: String| invalid(key("rate_limit.rate"), e))?;
                let burst = rl.burst.unwrap_or(rate.count);
                if burst == 0 {
                    return Err(invalid(key("rate_limit.burst"), "must be at least 1"));
                }
                let source: KeySource = rl
                    .key
                    .parse()
                    .map_err(|e: String| invalid(key("rate_limit.key"), e))?;
                if source == KeySource::Sub && !r.jwt {
                    return Err(invalid(
                        key("rate_limit.key"),
                        r#""sub" needs jwt = true on the same route"#,
                    ));
                }
                Ok(RateLimitSpec {
                    rate,
                    burst,
                    key: source,
                })
            })
            .transpose()?;
        if !r.allowed_origins.is_empty() && !r.csrf {
            return Err(invalid(
                key("allowed_origins"),
                "allowed_origins has no effect without csrf = true on the same route",
            ));
        }
        let allowed_origins = r
            .allowed_origins
            .iter()
            .enumerate()
            .map(|(j, origin)| {
                Origin::parse(origin)
                    .map_err(|why| invalid(format!("routes[{i}].allowed_origins[{j}]"), why))
            })
            .collect::<Result<Vec<_>>>()?;
        let json_schema = r
            .json_schema
            .as_deref()
            .map(|name| {
                RouteSchema::load(name, &resolve(base_dir, name))
                    .map(Arc::new)
                    .map_err(|why| invalid(key("json_schema"), format!("{name}: {why}")))
            })
            .transpose()?;
        let max_body_bytes = r.max_body_bytes.map(|s| s.0).or_else(|| {
            json_schema
                .as_ref()
                .map(|_| SCHEMA_DEFAULT_MAX_BODY_BYTES.min(server.max_body_bytes))
        });
        let upstream = match &r.upstream {
            None => 0,
            Some(name) => {
                let found = named_upstreams.iter().position(|u| *u.name == **name);
                match found {
                    Some(index) => index + 1,
                    None if name == "default" => 0,
                    None => {
                        let known: Vec<&str> = named_upstreams.iter().map(|u| &*u.name).collect();
                        return Err(invalid(
                            key("upstream"),
                            if known.is_empty() {
                                format!(
                                    r#"no upstream named "{name}": add an [upstreams.{name}] table"#
                                )
                            } else {
                                format!(
                                    r#"no upstream named "{name}" (named upstreams: {})"#,
                                    known.join(", ")
                                )
                            },
                        ));
                    }
                }
            }
        };
        routes.push(Route {
            upstream,
            path: r.path.clone(),
            methods,
            jwt: r.jwt,
            scopes: r.scopes.clone(),
            claims,
            rate_limit,
            csrf: r.csrf,
            allowed_origins,
            json_schema,
            max_body_bytes,
        });
    }
    Ok(routes)
}
