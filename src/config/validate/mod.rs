//! From the file's syntax to a [`Config`] that cannot be invalid: addresses
//! parsed, header names checked, certificates and keys loaded and matched,
//! JWT keys decoded, routes normalized and unique.
//!
//! Errors carry the dotted key (`routes[2].rate_limit.rate`); [`super::load_str`]
//! turns the key into a line and column.
//!
//! This file has the entry point and the server-wide sections (`[server]`,
//! `[hsts]`, `[cookies]`, `[headers]`, `[log]`, `[redis]`); `tls` has
//! `[tls]` and `[acme]`, `upstream` the upstream groups, `routes` `[jwt]`
//! and the routes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use http::{HeaderName, HeaderValue};
use ipnet::IpNet;

use super::file::{self, FileConfig};
use super::{AcmeChallenge, Config, HeaderRules, Log, Redis, Server};
use crate::filters::cookies::{CookiePolicy, SameSite};

mod routes;
mod tls;
mod upstream;

use routes::{jwt, routes};
pub use tls::load_certified_key;
use tls::{acme, tls};
use upstream::upstream;

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
