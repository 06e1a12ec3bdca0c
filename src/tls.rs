//! TLS termination: the rustls server configuration built from `[tls]`.
//!
//! Only TLS 1.2 and 1.3 are ever offered; rustls has no CBC, RC4 or static-RSA
//! suites, so every suite it offers is an AEAD with forward secrecy. Server
//! names pick a certificate from `[[tls.sni]]`, then ACME's for its domains,
//! falling back to the default one (`tls.cert`, else ACME's). A handshake
//! that offers only the `acme-tls/1` protocol is a CA validating a
//! tls-alpn-01 challenge and gets that challenge's certificate. Session
//! tickets and a session cache are on, so returning clients resume instead
//! of paying for a full handshake.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;

use crate::acme::{ACME_TLS_ALPN, AcmeCerts, AcmeManager};
use crate::config::{AcmeChallenge, Tls, TlsVersion};

/// Chooses the certificate by SNI name; the default for unknown or absent names.
struct SniResolver {
    default: Option<Arc<CertifiedKey>>,
    by_name: HashMap<String, Arc<CertifiedKey>>,
    acme: Option<Arc<AcmeCerts>>,
}

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SniResolver")
            .field("names", &self.by_name.keys())
            .field("acme", &self.acme.as_ref().map(|a| a.domains()))
            .finish()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name();
        if let Some(acme) = &self.acme
            && offers_only_acme_tls(&hello)
        {
            // Only the challenge certificate; none (no handshake) when no
            // order of ours is waiting on this name.
            return acme.alpn_cert(name?);
        }
        if let Some(cert) = name.and_then(|n| self.by_name.get(n)) {
            return Some(cert.clone());
        }
        match &self.acme {
            Some(acme) if self.default.is_none() || name.is_some_and(|n| acme.serves(n)) => {
                Some(acme.current_key())
            }
            _ => self.default.clone(),
        }
    }
}

/// A tls-alpn-01 validator offers `acme-tls/1` and nothing else (RFC 8737
/// §3); a client that also offers `h2` negotiates `h2` as usual.
fn offers_only_acme_tls(hello: &ClientHello<'_>) -> bool {
    hello.alpn().is_some_and(|mut offered| {
        offered.next() == Some(ACME_TLS_ALPN) && offered.all(|p| p == ACME_TLS_ALPN)
    })
}

/// The suites offered, best first. AES-128-GCM with SHA-256 leads: as
/// strong as needed, and the cheapest handshake — clients such as OpenSSL
/// list AES-256-GCM-SHA384 first, and SHA-384 has no hardware path on AMD
/// CPUs in aws-lc (it was a tenth of the proxy's CPU per new connection).
/// ChaCha20 before AES-256, for clients without AES instructions.
static PREFERRED_CIPHER_SUITES: &[rustls::SupportedCipherSuite] = {
    use rustls::crypto::aws_lc_rs::cipher_suite::*;
    &[
        TLS13_AES_128_GCM_SHA256,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ]
};

/// Builds the server configuration; `acme` when `[acme]` provides
/// certificates. Fails only if the crypto provider refuses the protocol
/// versions, which a validated [`Tls`] never asks for.
pub fn server_config(
    tls: &Tls,
    acme: Option<&AcmeManager>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: PREFERRED_CIPHER_SUITES.to_vec(),
        secure_random: &crate::tls_random::BUFFERED_RANDOM,
        ..rustls::crypto::aws_lc_rs::default_provider()
    });
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let resolver = SniResolver {
        default: tls.default_cert.clone(),
        by_name: tls
            .sni
            .iter()
            .map(|sni| (sni.server_name.clone(), sni.cert.clone()))
            .collect(),
        acme: acme.map(|manager| manager.certs.clone()),
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = tls.alpn.clone();
    if acme.is_some_and(|manager| manager.settings().challenge == AcmeChallenge::TlsAlpn01) {
        // Last: a client offering h2 or http/1.1 still gets it, and the
        // validator, which offers nothing else, gets this.
        config.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    }
    // Our order, not the client's (as Go's crypto/tls, hence Caddy, does).
    config.ignore_client_order = true;
    config.session_storage = ServerSessionMemoryCache::new(16 * 1024);
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    // TLS 1.3 tickets are sent after the handshake; two lets a browser open a
    // second connection with resumption too.
    config.send_tls13_tickets = 2;
    Ok(Arc::new(config))
}

/// The `tls` field of the access log and the `version` label of the handshake metric.
pub fn version_label(version: Option<rustls::ProtocolVersion>) -> &'static str {
    match version {
        Some(rustls::ProtocolVersion::TLSv1_3) => "1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "1.2",
        _ => "unknown",
    }
}
