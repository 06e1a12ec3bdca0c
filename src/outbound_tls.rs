//! TLS for the proxy's own outgoing HTTPS: the ACME directory and an
//! `https://` `jwks_url`. Servers are checked against the system's trusted
//! roots (`rustls-native-certs`, which also honours `SSL_CERT_FILE` and
//! `SSL_CERT_DIR`), plus, for ACME, `directory_ca`. HTTP/1.1 only: each
//! use is one small exchange every few minutes.

use std::sync::{Arc, OnceLock};

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::CertificateDer;
use tokio_rustls::TlsConnector;

/// A connector trusting the system's roots and `extra_roots`.
pub fn connector(extra_roots: &[CertificateDer<'static>]) -> Result<TlsConnector, rustls::Error> {
    let mut roots = RootCertStore::empty();
    // A system store that cannot be read leaves the extra roots alone
    // trusted; the first handshake then says which certificate failed.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    for cert in extra_roots {
        roots.add(cert.clone())?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The connector with the system's roots only, made once: reading the
/// system store costs milliseconds.
pub fn system_connector() -> Result<TlsConnector, String> {
    static SYSTEM: OnceLock<Result<TlsConnector, String>> = OnceLock::new();
    SYSTEM
        .get_or_init(|| connector(&[]).map_err(|e| e.to_string()))
        .clone()
}
