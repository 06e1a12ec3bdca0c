//! What the proxy reads from a certificate it serves: its DNS names, its
//! validity and its serial. Used for `portcullis_cert_expiry_seconds`, for
//! `check`'s listing, and by ACME to decide when to renew and to recognise
//! a certificate (ARI's identifier is its authority key identifier and
//! serial).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer as _, X509Certificate};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject alternative names that are DNS names, lower-cased.
    pub names: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The serial number's bytes, as encoded (big-endian).
    pub serial: Vec<u8>,
    pub authority_key_id: Option<Vec<u8>>,
}

impl CertInfo {
    /// Reads the end-entity certificate; `None` if it is not X.509 DER.
    pub fn read(der: &CertificateDer<'_>) -> Option<CertInfo> {
        let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
        let at = |seconds: i64| {
            if seconds >= 0 {
                UNIX_EPOCH + Duration::from_secs(seconds.unsigned_abs())
            } else {
                UNIX_EPOCH
            }
        };
        let mut names = Vec::new();
        let mut authority_key_id = None;
        for extension in cert.extensions() {
            match extension.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        if let GeneralName::DNSName(dns) = name {
                            names.push(dns.to_ascii_lowercase());
                        }
                    }
                }
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    authority_key_id = aki.key_identifier.as_ref().map(|id| id.0.to_vec());
                }
                _ => {}
            }
        }
        Some(CertInfo {
            names,
            not_before: at(cert.validity().not_before.timestamp()),
            not_after: at(cert.validity().not_after.timestamp()),
            serial: cert.raw_serial().to_vec(),
            authority_key_id,
        })
    }

    /// Lower-case hex, no separators (what logs and tests compare).
    pub fn serial_hex(&self) -> String {
        self.serial.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The whole validity period.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    /// Time left at `now` (zero once expired).
    pub fn left_at(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }

    /// Whether every name in `wanted` is one of this certificate's names.
    pub fn covers(&self, wanted: &[String]) -> bool {
        wanted.iter().all(|name| self.names.contains(name))
    }

    /// `not_after` as RFC 3339, for logs and `check`.
    pub fn not_after_text(&self) -> String {
        humantime::format_rfc3339_seconds(self.not_after).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_validity_and_serial_of_a_generated_certificate() {
        let mut params =
            rcgen::CertificateParams::new(vec!["a.example.com".into(), "B.example.com".into()])
                .unwrap();
        params.not_before = rcgen::date_time_ymd(2026, 1, 1);
        params.not_after = rcgen::date_time_ymd(2026, 4, 1);
        params.serial_number = Some(rcgen::SerialNumber::from(vec![0x01, 0xab]));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let info = CertInfo::read(cert.der()).unwrap();
        assert_eq!(info.names, ["a.example.com", "b.example.com"]);
        assert_eq!(info.serial_hex(), "01ab");
        assert_eq!(info.lifetime(), Duration::from_secs(90 * 86_400));
        assert!(info.covers(&["b.example.com".into()]));
        assert!(!info.covers(&["c.example.com".into()]));
        assert_eq!(info.not_after_text(), "2026-04-01T00:00:00Z");
        assert!(CertInfo::read(&CertificateDer::from(vec![1, 2, 3])).is_none());
    }
}
