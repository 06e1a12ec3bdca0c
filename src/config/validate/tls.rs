//! `[tls]` and `[acme]`: certificates and keys loaded and matched, ACME's
//! directory, account and challenge settings.

use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::file;
use crate::config::{Acme, AcmeChallenge, ExternalAccount, SniCert, Tls, TlsVersion};

use super::{Result, invalid, read_file, resolve};

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
pub(super) fn tls(s: &file::TlsSection, base_dir: &Path, acme: bool) -> Result<Tls> {
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

pub(super) fn acme(s: &file::AcmeSection, base_dir: &Path) -> Result<Acme> {
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
