//! What the rest of the proxy reads from ACME: the certificate to serve for
//! the ACME domains (a temporary self-signed one until the first is
//! obtained), the http-01 answers, and the tls-alpn-01 certificates. The
//! TLS resolver reads it in every handshake, the HTTP listener on every
//! challenge request; the ACME task writes it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;

use super::shared::SharedStore;
use crate::cert_info::CertInfo;

/// The ALPN protocol of tls-alpn-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The certificate being served and what is known of it.
pub struct Served {
    pub key: Arc<CertifiedKey>,
    /// `None` for the temporary self-signed certificate.
    pub info: Option<CertInfo>,
}

pub struct AcmeCerts {
    domains: Vec<String>,
    current: ArcSwap<Served>,
    /// http-01: token → key authorization.
    http_tokens: Mutex<HashMap<String, String>>,
    /// tls-alpn-01: domain → the challenge certificate.
    alpn_certs: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    /// With `[redis]`: where other instances publish their http-01 answers.
    shared: Option<Arc<SharedStore>>,
}

impl AcmeCerts {
    /// Serving `temporary` until [`Self::install`] is called.
    pub fn new(
        domains: Vec<String>,
        temporary: Arc<CertifiedKey>,
        shared: Option<Arc<SharedStore>>,
    ) -> Self {
        AcmeCerts {
            domains,
            current: ArcSwap::from_pointee(Served {
                key: temporary,
                info: None,
            }),
            http_tokens: Mutex::default(),
            alpn_certs: Mutex::default(),
            shared,
        }
    }

    pub fn shared(&self) -> Option<&SharedStore> {
        self.shared.as_deref()
    }

    pub fn domains(&self) -> &[String] {
        &self.domains
    }

    pub fn serves(&self, server_name: &str) -> bool {
        self.domains.iter().any(|d| d == server_name)
    }

    /// The certificate for a handshake: new connections get the newest;
    /// those already open keep the one they started with.
    pub fn current_key(&self) -> Arc<CertifiedKey> {
        self.current.load().key.clone()
    }

    /// What is served now (`info` is `None` while the temporary one is).
    pub fn current(&self) -> Arc<Served> {
        self.current.load_full()
    }

    pub fn install(&self, key: Arc<CertifiedKey>, info: CertInfo) {
        self.current.store(Arc::new(Served {
            key,
            info: Some(info),
        }));
    }

    /// The answer to `GET /.well-known/acme-challenge/TOKEN`, if the token
    /// is one of ours.
    pub fn http_answer(&self, token: &str) -> Option<String> {
        lock(&self.http_tokens).get(token).cloned()
    }

    pub fn publish_http(&self, token: &str, key_authorization: &str) {
        lock(&self.http_tokens).insert(token.to_owned(), key_authorization.to_owned());
    }

    pub fn withdraw_http(&self, token: &str) {
        lock(&self.http_tokens).remove(token);
    }

    /// The tls-alpn-01 certificate for a handshake that offered
    /// `acme-tls/1` with this server name.
    pub fn alpn_cert(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        lock(&self.alpn_certs).get(server_name).cloned()
    }

    pub fn publish_alpn(&self, domain: &str, cert: Arc<CertifiedKey>) {
        lock(&self.alpn_certs).insert(domain.to_owned(), cert);
    }

    pub fn withdraw_alpn(&self, domain: &str) {
        lock(&self.alpn_certs).remove(domain);
    }
}

/// The maps stay consistent whatever panicked while holding them: each
/// operation is one insert, remove or lookup.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
