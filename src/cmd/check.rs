//! `portcullis check`: validate everything the configuration names and print
//! a summary; nothing is started or written.

use std::path::Path;

use super::Failure;
use crate::cert_info::CertInfo;

/// Certificates with less than this left are flagged.
const EXPIRY_WARNING: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

fn expiry_warning(info: &CertInfo) -> &'static str {
    let left = info.left_at(std::time::SystemTime::now());
    if left.is_zero() {
        "  WARNING: expired"
    } else if left < EXPIRY_WARNING {
        "  WARNING: less than 30 days left"
    } else {
        ""
    }
}

/// Each static certificate's names and expiry.
fn print_certificates(config: &crate::config::Config) {
    let certs = config
        .tls
        .default_cert
        .iter()
        .map(|cert| ("tls.cert".to_owned(), cert))
        .chain(
            config
                .tls
                .sni
                .iter()
                .map(|sni| (format!("tls.sni {}", sni.server_name), &sni.cert)),
        );
    for (label, cert) in certs {
        let Some(info) = cert.end_entity_cert().ok().and_then(CertInfo::read) else {
            continue;
        };
        println!(
            "certificate {label}: {} (expires {}){}",
            info.names.join(", "),
            info.not_after_text(),
            expiry_warning(&info)
        );
    }
}

pub fn check(config_path: &Path) -> Result<(), Failure> {
    let config = crate::config::load(config_path)?;
    let s = &config.server;
    println!("{}: configuration is valid", config_path.display());
    println!("listeners:");
    println!(
        "  https  {} (TLS {}+, {} SNI certificate(s))",
        s.https_listen,
        match config.tls.min_version {
            crate::config::TlsVersion::Tls12 => "1.2",
            crate::config::TlsVersion::Tls13 => "1.3",
        },
        config.tls.sni.len()
    );
    if let Some(addr) = s.http_listen {
        println!("  http   {addr} (redirects to HTTPS)");
    }
    if let Some(addr) = s.admin_listen {
        println!("  admin  {addr} (/healthz, /readyz, /metrics)");
    }
    for group in config.upstream_groups() {
        let servers: Vec<String> = group.servers.iter().map(|s| s.to_string()).collect();
        let mut line = format!("upstream {}: {}", group.name, servers.join(", "));
        if group.servers.len() > 1 {
            line.push_str(&format!(
                " (balance {}, retries {}, eject after {} failures for {:?})",
                group.balance.as_str(),
                group.retries,
                group.eject.consecutive_failures,
                group.eject.duration
            ));
        }
        if let Some(check) = &group.health_check {
            line.push_str(&format!(
                "; health check GET {} every {:?} (timeout {:?}, healthy after {}, unhealthy after {})",
                check.path, check.interval, check.timeout, check.healthy, check.unhealthy
            ));
        }
        println!("{line}");
    }
    if let Some(jwt) = &config.jwt {
        println!("jwt: {}", jwt.verifier.summary());
    }
    if let Some(redis) = &config.redis {
        println!(
            "redis: {} (rate limits shared under \"{}:\", timeout {:?}, on_error {}; not contacted by check)",
            redis.display_url(),
            redis.key_prefix,
            redis.timeout,
            redis.on_error.as_str()
        );
    }
    print_certificates(&config);
    if let Some(acme) = &config.acme {
        let cached = match crate::acme::cached_info(acme) {
            Some(info) => format!(
                "cached certificate expires {}{}",
                info.not_after_text(),
                expiry_warning(&info)
            ),
            None => format!(
                "no usable certificate cached in {} yet",
                acme.cache_dir.display()
            ),
        };
        let eab = acme
            .eab
            .as_ref()
            .map(|eab| format!(", external account {} (key from ${})", eab.kid, eab.key_env))
            .unwrap_or_default();
        println!(
            "acme: {} ({}, directory {}{eab}, renew {} before expiry; {cached})",
            acme.domains.join(", "),
            acme.challenge.as_str(),
            acme.directory,
            humantime::format_duration(acme.renew_before)
        );
    }
    if config.routes.is_empty() {
        println!("routes: none (every request gets the global policies)");
    } else {
        println!("routes:");
    }
    for route in &config.routes {
        let mut policies = Vec::new();
        if let Some(methods) = &route.methods {
            policies.push(format!(
                "methods {}",
                methods
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ));
        }
        if route.jwt {
            policies.push("jwt".into());
        }
        if !route.scopes.is_empty() {
            policies.push(format!("scopes {}", route.scopes.join(" ")));
        }
        if !route.claims.is_empty() {
            let names: Vec<&str> = route.claims.iter().map(|c| c.name.as_str()).collect();
            policies.push(format!("claims {}", names.join(", ")));
        }
        if let Some(rl) = &route.rate_limit {
            policies.push(format!(
                "rate_limit {} burst {} by {}",
                rl.rate, rl.burst, rl.key
            ));
        }
        if route.csrf {
            let mut csrf = "csrf".to_owned();
            if !route.allowed_origins.is_empty() {
                let origins: Vec<&str> = route.allowed_origins.iter().map(|o| o.as_str()).collect();
                csrf.push_str(&format!(" (also {})", origins.join(", ")));
            }
            policies.push(csrf);
        }
        if let Some(schema) = &route.json_schema {
            policies.push(format!("json_schema {}", schema.file));
        }
        if let Some(max) = route.max_body_bytes {
            policies.push(format!("max_body_bytes {max}"));
        }
        println!(
            "  {:<24} {}",
            route.path,
            if policies.is_empty() {
                "-".into()
            } else {
                policies.join("; ")
            }
        );
    }
    Ok(())
}
