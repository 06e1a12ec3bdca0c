//! `[upstream]` and `[upstreams.NAME]`: server addresses, pools, balancing,
//! health checks and ejection.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::file;
use crate::config::{Balance, Eject, HealthCheck, ServerAddress, Upstream};

use super::{Result, invalid};

/// One upstream group; `table` is `upstream` or `upstreams.NAME`.
pub(super) fn upstream(table: &str, name: &str, s: &file::UpstreamSection) -> Result<Upstream> {
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
