//! `portcullis gen-cert`: a self-signed development certificate (ECDSA P-256),
//! valid from an hour ago to 90 days from now, and the small DER reader that
//! tells `demo` when such a certificate has run out.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::Failure;

pub const DEFAULT_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// A development certificate's lifetime. rcgen's default (1975 to 4096)
/// would leave a copied or leaked dev key trusted forever by whoever added
/// it to a trust store; 90 days is what public CAs issue, so dev setups
/// meet renewal the way production does.
pub const VALIDITY: Duration = Duration::from_secs(90 * 86_400);

/// Start of validity before "now": a client whose clock lags the machine
/// that made the certificate would otherwise refuse it as not yet valid.
pub const BACKDATE: Duration = Duration::from_secs(3600);

pub fn gen_cert(out: &Path, hosts: &[String], force: bool) -> Result<(), Failure> {
    let (cert_path, key_path) = (out.join("cert.pem"), out.join("key.pem"));
    if !force && (cert_path.exists() || key_path.exists()) {
        return Err(Failure::Usage(format!(
            "{} or {} exists already; pass --force to replace them",
            cert_path.display(),
            key_path.display()
        )));
    }
    let hosts: Vec<String> = if hosts.is_empty() {
        DEFAULT_HOSTS.iter().map(|h| h.to_string()).collect()
    } else {
        hosts.to_vec()
    };
    let validity = write_dev_cert(out, &hosts)?;
    eprintln!(
        "wrote {} and {} (mode 0600) for {}, valid until {}",
        cert_path.display(),
        key_path.display(),
        hosts.join(", "),
        display_date(validity.not_after)
    );
    Ok(())
}

/// A certificate date for people: RFC 3339 in UTC. humantime panics on
/// dates before 1970 and fails after 9999, and a certificate read from disk
/// may say either, so those are named instead.
pub fn display_date(t: SystemTime) -> String {
    const YEAR_10000: Duration = Duration::from_secs(253_402_300_800);
    match t.duration_since(UNIX_EPOCH) {
        Ok(since) if since < YEAR_10000 => humantime::format_rfc3339_seconds(t).to_string(),
        Ok(_) => "a date after the year 9999".into(),
        Err(_) => "a date before 1970".into(),
    }
}

/// When a certificate may be used, as written in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Writes `cert.pem` and `key.pem` into `dir`, the key readable by its owner
/// only, valid for [`VALIDITY`] from [`BACKDATE`] ago.
pub fn write_dev_cert(dir: &Path, hosts: &[String]) -> anyhow::Result<Validity> {
    let (certified, validity) = dev_cert(hosts, SystemTime::now())?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("cert.pem"), certified.cert.pem())
        .with_context(|| format!("cannot write {}", dir.join("cert.pem").display()))?;
    let key_path = dir.join("key.pem");
    // Removed first so that `create_new` below sets mode 0600 on a fresh
    // inode instead of inheriting a wider mode from an old file.
    let _ = std::fs::remove_file(&key_path);
    let mut key_file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .with_context(|| format!("cannot write {}", key_path.display()))?
    };
    key_file.write_all(certified.signing_key.serialize_pem().as_bytes())?;
    Ok(validity)
}

/// A self-signed certificate for `hosts`, valid from `now - BACKDATE` to
/// `now + VALIDITY`.
fn dev_cert(
    hosts: &[String],
    now: SystemTime,
) -> anyhow::Result<(rcgen::CertifiedKey<rcgen::KeyPair>, Validity)> {
    let not_before = now.checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH);
    let not_after = now
        .checked_add(VALIDITY)
        .context("the system clock is too far in the future to date a certificate")?;
    // rcgen takes the `time` crate's dates; reaching them from the Unix
    // epoch keeps that crate out of this crate's own dependencies.
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let date = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|since| since.try_into().ok())
            .and_then(|since| epoch.checked_add(since))
            .with_context(|| format!("cannot date a certificate at {}", display_date(t)))
    };
    let mut params = rcgen::CertificateParams::new(hosts.to_vec())
        .context("cannot use these names in a certificate")?;
    params.not_before = date(not_before)?;
    params.not_after = date(not_after)?;
    let mut name = rcgen::DistinguishedName::new();
    name.push(
        rcgen::DnType::CommonName,
        "portcullis development certificate",
    );
    params.distinguished_name = name;
    let signing_key = rcgen::KeyPair::generate().context("cannot generate a key")?;
    let cert = params
        .self_signed(&signing_key)
        .context("cannot generate the certificate")?;
    // What the certificate says, read back: whole seconds, as DER writes them.
    let validity = validity_der(cert.der()).context("cannot read back the certificate's dates")?;
    Ok((rcgen::CertifiedKey { cert, signing_key }, validity))
}

/// The validity of the first certificate in a PEM file, or `None` when the
/// file holds no certificate this reader understands.
pub fn validity(cert_pem: &[u8]) -> Option<Validity> {
    let der = CertificateDer::from_pem_slice(cert_pem).ok()?;
    validity_der(&der)
}

// A dozen lines of DER walking instead of an X.509 parser: the validity is
// the fifth field of tbsCertificate (RFC 5280 4.1), and rcgen's
// `x509-parser` feature would compile a whole ASN.1 stack into the binary
// for this one read. Anything unexpected yields `None`, never a panic.

const SEQUENCE: u8 = 0x30;
const EXPLICIT_0: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// Splits one DER element off `input`: (tag, content, rest).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        // 0 would be BER's indefinite length; more than 4 bytes of length
        // is no certificate.
        if count == 0 || count > 4 {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(count)?;
        let len = bytes
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b));
        (len, rest)
    };
    let (content, rest) = rest.split_at_checked(len)?;
    Some((tag, content, rest))
}

fn validity_der(der: &[u8]) -> Option<Validity> {
    let (tag, certificate, _) = tlv(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, mut fields, _) = tlv(certificate)?;
    if tag != SEQUENCE {
        return None;
    }
    if fields.first() == Some(&EXPLICIT_0) {
        fields = tlv(fields)?.2;
    }
    // serialNumber, signature, issuer
    for _ in 0..3 {
        fields = tlv(fields)?.2;
    }
    let (tag, validity, _) = tlv(fields)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, not_before, rest) = tlv(validity)?;
    let not_before = der_time(tag, not_before)?;
    let (tag, not_after, _) = tlv(rest)?;
    let not_after = der_time(tag, not_after)?;
    Some(Validity {
        not_before: system_time(not_before)?,
        not_after: system_time(not_after)?,
    })
}

/// Seconds since the Unix epoch of a DER `UTCTime` (`YYMMDDHHMMSSZ`) or
/// `GeneralizedTime` (`YYYYMMDDHHMMSSZ`), the only forms RFC 5280 allows.
fn der_time(tag: u8, text: &[u8]) -> Option<i64> {
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        text.get(range)?.iter().try_fold(0i64, |n, &b| {
            b.is_ascii_digit().then(|| n * 10 + i64::from(b - b'0'))
        })
    };
    let (year, at) = match (tag, text.len()) {
        (UTC_TIME, 13) => {
            // RFC 5280 4.1.2.5.1: YY below 50 is 20YY.
            let yy = number(0..2)?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, 2)
        }
        (GENERALIZED_TIME, 15) => (number(0..4)?, 4),
        _ => return None,
    };
    if text.last() != Some(&b'Z') {
        return None;
    }
    let month = number(at..at + 2)?;
    let day = number(at + 2..at + 4)?;
    let hour = number(at + 4..at + 6)?;
    let minute = number(at + 6..at + 8)?;
    let second = number(at + 8..at + 10)?;
    let valid = (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && hour < 24
        && minute < 60
        && second < 61;
    valid.then(|| days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn system_time(unix_seconds: i64) -> Option<SystemTime> {
    match u64::try_from(unix_seconds) {
        Ok(after) => UNIX_EPOCH.checked_add(Duration::from_secs(after)),
        Err(_) => UNIX_EPOCH.checked_sub(Duration::from_secs(unix_seconds.unsigned_abs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts() -> Vec<String> {
        DEFAULT_HOSTS.iter().map(|h| h.to_string()).collect()
    }

    fn secs(t: SystemTime) -> i64 {
        t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    #[test]
    fn a_dev_certificate_is_valid_from_an_hour_ago_for_90_days() {
        let now = SystemTime::now();
        let (certified, validity) = dev_cert(&hosts(), now).unwrap();
        let written = validity_der(certified.cert.der()).unwrap();
        assert_eq!(written, validity);
        let now = secs(now);
        // DER keeps whole seconds: the dates are truncated, never rounded up.
        assert!((0..=1).contains(&(now - 3600 - secs(written.not_before))));
        assert!((0..=1).contains(&(now + 90 * 86_400 - secs(written.not_after))));
        // And the PEM form, as `demo` reads it from disk.
        assert_eq!(
            super::validity(certified.cert.pem().as_bytes()),
            Some(written)
        );
    }

    #[test]
    fn the_window_follows_the_clock_it_is_given() {
        // 2030-06-15T12:00:00Z
        let now = UNIX_EPOCH + Duration::from_secs(1_907_755_200);
        let (certified, validity) = dev_cert(&hosts(), now).unwrap();
        assert_eq!(secs(validity.not_before), 1_907_755_200 - 3600);
        assert_eq!(secs(validity.not_after), 1_907_755_200 + 90 * 86_400);
        assert_eq!(validity_der(certified.cert.der()), Some(validity));
    }

    #[test]
    fn generalized_time_is_read_too() {
        // rcgen's defaults: 1975-01-01 as UTCTime, 4096-01-01 as GeneralizedTime.
        let certified = rcgen::generate_simple_self_signed(hosts()).unwrap();
        let validity = validity_der(certified.cert.der()).unwrap();
        assert_eq!(secs(validity.not_before), 157_766_400);
        assert_eq!(secs(validity.not_after), 67_090_118_400);
    }

    #[test]
    fn dates_outside_humantimes_range_are_named() {
        assert_eq!(display_date(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            display_date(system_time(-631_152_000).unwrap()),
            "a date before 1970"
        );
        assert_eq!(
            display_date(system_time(253_402_300_800).unwrap()),
            "a date after the year 9999"
        );
    }

    #[test]
    fn der_times() {
        assert_eq!(der_time(UTC_TIME, b"700101000000Z"), Some(0));
        assert_eq!(der_time(UTC_TIME, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(der_time(UTC_TIME, b"500101000000Z"), Some(-631_152_000));
        assert_eq!(
            der_time(GENERALIZED_TIME, b"20000229120000Z"),
            Some(951_825_600)
        );
        for bad in [
            &b"700101000000"[..],
            b"701301000000Z",
            b"70010100000Z",
            b"7001010000a0Z",
            b"\xff\xfe0101000000Z",
        ] {
            assert_eq!(der_time(UTC_TIME, bad), None, "{bad:?}");
        }
        assert_eq!(der_time(0x04, b"700101000000Z"), None);
    }

    #[test]
    fn anything_but_a_certificate_is_none() {
        let der = rcgen::generate_simple_self_signed(hosts())
            .unwrap()
            .cert
            .der()
            .to_vec();
        for cut in 0..der.len() {
            assert_eq!(validity_der(&der[..cut]), None, "cut at {cut}");
        }
        assert_eq!(validity(b"not a PEM file"), None);
        assert_eq!(validity_der(&[0x30, 0x80, 0, 0]), None);
        assert_eq!(validity_der(&[0x30, 0x85, 1, 1, 1, 1, 1]), None);
    }
}
