//! Which client a request counts against: the key source of a route
//! (`ip`, `sub`, `header:NAME`), the [`LimitKey`] built from it, and the real
//! client address behind trusted proxies.
//!
//! # Who the client is
//!
//! [`client_ip`] believes `X-Forwarded-For` only when the TCP peer is one of the
//! operator's `trusted_proxies`, and then takes the right-most address that is not
//! itself trusted: entries to its left were written by the client and prove nothing,
//! so a client can never choose its own bucket by sending the header. IPv6 clients are
//! keyed by their /64, since one host usually owns a whole /64 and could otherwise
//! rotate through 2^64 fresh buckets.
//!
//! Key values are client-controlled, so those longer than [`MAX_INLINE_KEY_BYTES`]
//! are replaced by a 128-bit keyed digest: a flood of long header values must not
//! make each tracked key cost kilobytes.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::OnceLock;

use http::{HeaderMap, HeaderName};
use ipnet::IpNet;

use super::spec::RateLimitConfigError;

/// `X-Forwarded-For` (not among `http`'s constants).
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Key values (`sub`, `header:NAME`) up to this length are stored as they are; longer
/// ones become a [`LimitKey::Digest`], which bounds the memory of one tracked key.
pub const MAX_INLINE_KEY_BYTES: usize = 64;

/// What a route's requests are counted by: `"ip"`, `"sub"` or `"header:NAME"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The real client address ([`client_ip`]), IPv6 by /64.
    Ip,
    /// The verified JWT subject.
    Sub,
    /// The value of this request header, else the client address.
    Header(HeaderName),
}

impl KeySource {
    /// Whether the key is the verified JWT subject: such a limit runs right after JWT
    /// verification, and is a configuration error on a route without `jwt = true`.
    pub fn needs_subject(&self) -> bool {
        matches!(self, KeySource::Sub)
    }
}

/// `Err` is the message, as for [`Rate`](super::Rate).
impl FromStr for KeySource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeySource::parse(s).map_err(|e| e.to_string())
    }
}

impl KeySource {
    /// Parses `"ip"`, `"sub"` or `"header:NAME"`, with a typed error.
    pub fn parse(s: &str) -> Result<Self, RateLimitConfigError> {
        match s {
            "ip" => Ok(KeySource::Ip),
            "sub" => Ok(KeySource::Sub),
            _ => {
                let name = s
                    .strip_prefix("header:")
                    .ok_or_else(|| RateLimitConfigError::Key(s.to_owned()))?;
                HeaderName::from_bytes(name.as_bytes())
                    .map(KeySource::Header)
                    .map_err(|_| RateLimitConfigError::KeyHeaderName(s.to_owned()))
            }
        }
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Ip => f.write_str("ip"),
            KeySource::Sub => f.write_str("sub"),
            KeySource::Header(name) => write!(f, "header:{name}"),
        }
    }
}

/// The client key, computed once per request by [`limit_key`].
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum LimitKey {
    /// The client address; IPv6 already masked to its /64, IPv4-mapped IPv6 as IPv4.
    Ip(IpAddr),
    /// The verified JWT subject.
    Sub(Box<str>),
    /// The raw value of the route's key header.
    Header(Box<[u8]>),
    /// A `Sub` or `Header` value longer than [`MAX_INLINE_KEY_BYTES`], as a 128-bit
    /// digest keyed per process (so nobody can aim a collision at another client).
    Digest([u64; 2]),
}

/// Header values may be API keys: never print them (this type can end up in logs).
impl fmt::Debug for LimitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitKey::Ip(ip) => f.debug_tuple("Ip").field(ip).finish(),
            LimitKey::Sub(sub) => f.debug_tuple("Sub").field(sub).finish(),
            LimitKey::Header(v) => write!(f, "Header(<{} bytes>)", v.len()),
            LimitKey::Digest(_) => f.write_str("Digest(..)"),
        }
    }
}

/// What a request is counted by, borrowed from the request: the client
/// address (IPv6 masked to /64, IPv4-mapped IPv6 as IPv4), the verified
/// subject, or the raw value of the route's key header. Both backends start
/// from it: [`KeyMaterial::to_limit_key`] for this process's table, and the
/// shared (Redis) limiter's cross-instance key name.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum KeyMaterial<'a> {
    Ip(IpAddr),
    Sub(&'a str),
    Header(&'a [u8]),
}

/// Header values may be API keys: never print them.
impl fmt::Debug for KeyMaterial<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyMaterial::Ip(ip) => f.debug_tuple("Ip").field(ip).finish(),
            KeyMaterial::Sub(sub) => write!(f, "Sub(<{} bytes>)", sub.len()),
            KeyMaterial::Header(v) => write!(f, "Header(<{} bytes>)", v.len()),
        }
    }
}

/// What a request counts against for `source`: `Ip` is the client address;
/// `Sub` the verified subject, falling back to the client address when there
/// is none (or it is empty); `Header(name)` that header's raw value (the
/// first, if repeated), falling back to the client address when it is absent
/// or empty. `client_ip` is the resolved real client ([`client_ip`]).
pub fn key_material<'a>(
    source: &KeySource,
    client_ip: IpAddr,
    headers: &'a HeaderMap,
    subject: Option<&'a str>,
) -> KeyMaterial<'a> {
    match source {
        KeySource::Ip => KeyMaterial::Ip(masked_ip(client_ip)),
        KeySource::Sub => match subject {
            Some(sub) if !sub.is_empty() => KeyMaterial::Sub(sub),
            _ => KeyMaterial::Ip(masked_ip(client_ip)),
        },
        KeySource::Header(name) => match headers.get(name) {
            Some(value) if !value.is_empty() => KeyMaterial::Header(value.as_bytes()),
            _ => KeyMaterial::Ip(masked_ip(client_ip)),
        },
    }
}

impl KeyMaterial<'_> {
    /// This process's key: values longer than [`MAX_INLINE_KEY_BYTES`] become
    /// a digest keyed per process.
    pub fn to_limit_key(&self) -> LimitKey {
        match *self {
            KeyMaterial::Ip(ip) => LimitKey::Ip(ip),
            KeyMaterial::Sub(sub) if sub.len() <= MAX_INLINE_KEY_BYTES => LimitKey::Sub(sub.into()),
            KeyMaterial::Sub(sub) => digest_key(DigestDomain::Sub, sub.as_bytes()),
            KeyMaterial::Header(raw) if raw.len() <= MAX_INLINE_KEY_BYTES => {
                LimitKey::Header(raw.into())
            }
            KeyMaterial::Header(raw) => digest_key(DigestDomain::Header, raw),
        }
    }
}

/// [`key_material`], as this process's [`LimitKey`].
pub fn limit_key(
    source: &KeySource,
    client_ip: IpAddr,
    headers: &HeaderMap,
    subject: Option<&str>,
) -> LimitKey {
    key_material(source, client_ip, headers, subject).to_limit_key()
}

fn masked_ip(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & (u128::MAX << 64))),
    }
}

#[derive(Hash, Clone, Copy)]
enum DigestDomain {
    Sub,
    Header,
}

fn digest_key(domain: DigestDomain, value: &[u8]) -> LimitKey {
    static KEY: OnceLock<RandomState> = OnceLock::new();
    let key = KEY.get_or_init(RandomState::new);
    // Two outputs of the same keyed SipHash over domain-separated inputs give 128 bits:
    // at 100,000 tracked keys an accidental collision is ~2^-95 likely.
    LimitKey::Digest([
        key.hash_one((0u8, domain, value)),
        key.hash_one((1u8, domain, value)),
    ])
}

/// Resolves the real client address.
///
/// * An untrusted peer is the client, whatever `X-Forwarded-For` says.
/// * A trusted peer's `X-Forwarded-For` (every such header, in order, comma-separated)
///   is walked from the right, and the first address that is not itself trusted is
///   the client. Entries may carry a port (`1.2.3.4:5678`, `[2001:db8::1]:443`);
///   empty list elements are skipped.
/// * The walk stops at an entry that is not an address (`unknown`, garbage): the
///   client is then the last trusted hop walked — the peer, when the garbage is the
///   right-most entry. Such an entry was not written by a proxy of ours (they append
///   the address they saw), so nothing to its left is believed, and whoever wrote it
///   shares the bucket of that trusted hop rather than choosing one.
/// * When every entry is trusted (or there is none), the left-most trusted hop is it.
///
/// IPv4-mapped IPv6 addresses are treated as IPv4 throughout, both for matching
/// `trusted` and in the result.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let mut nearest_trusted = peer;
    for value in headers.get_all(X_FORWARDED_FOR).iter().rev() {
        for entry in value.as_bytes().rsplit(|&b| b == b',') {
            let entry = entry.trim_ascii();
            if entry.is_empty() {
                continue;
            }
            let Some(ip) = parse_forwarded_addr(entry) else {
                return nearest_trusted;
            };
            if !is_trusted(ip, trusted) {
                return ip;
            }
            nearest_trusted = ip;
        }
    }
    nearest_trusted
}

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&ip))
}

fn parse_forwarded_addr(entry: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(entry).ok()?;
    let ip = s
        .parse::<IpAddr>()
        .or_else(|_| s.parse::<SocketAddr>().map(|sa| sa.ip()))
        .ok()
        .or_else(|| {
            s.strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<Ipv6Addr>()
                .ok()
                .map(IpAddr::V6)
        })?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::rate_limit::test_support::{fake, ip};
    use http::HeaderValue;

    fn addr(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        headers
    }

    #[test]
    fn key_source_parses_and_displays() {
        assert_eq!("ip".parse::<KeySource>().unwrap(), KeySource::Ip);
        assert_eq!("sub".parse::<KeySource>().unwrap(), KeySource::Sub);
        let header = "header:X-Api-Key".parse::<KeySource>().unwrap();
        assert_eq!(
            header,
            KeySource::Header(HeaderName::from_static("x-api-key"))
        );
        assert_eq!(header.to_string(), "header:x-api-key");
        assert!(KeySource::Sub.needs_subject());
        assert!(!header.needs_subject());
        assert_eq!(
            "cookie".parse::<KeySource>().unwrap_err().to_string(),
            r#"expected "ip", "sub" or "header:NAME", got "cookie""#
        );
        assert_eq!(
            KeySource::parse("header:bad name").unwrap_err(),
            RateLimitConfigError::KeyHeaderName("header:bad name".into())
        );
        assert!("header:".parse::<KeySource>().is_err());
        assert!("IP".parse::<KeySource>().is_err());
    }

    // ---- keys ----------------------------------------------------------------

    #[test]
    fn ip_keys_mask_ipv6_to_64_and_unmap_ipv4() {
        let none = HeaderMap::new();
        let key = |a: &str| limit_key(&KeySource::Ip, addr(a), &none, None);
        assert_eq!(key("192.0.2.7"), ip("192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
        assert_eq!(
            key("2001:db8:1:2:aaaa:bbbb:cccc:dddd"),
            ip("2001:db8:1:2::")
        );
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), ip("192.0.2.7"));
    }

    #[test]
    fn sub_keys_fall_back_to_the_client_ip() {
        let none = HeaderMap::new();
        let client = addr("192.0.2.7");
        assert_eq!(
            limit_key(&KeySource::Sub, client, &none, Some("alice")),
            LimitKey::Sub("alice".into())
        );
        assert_eq!(
            limit_key(&KeySource::Sub, client, &none, None),
            ip("192.0.2.7")
        );
        assert_eq!(
            limit_key(&KeySource::Sub, client, &none, Some("")),
            ip("192.0.2.7")
        );
    }

    #[test]
    fn header_keys_use_the_raw_value_or_fall_back() {
        let source: KeySource = "header:X-Api-Key".parse().unwrap();
        let client = addr("2001:db8::5");
        let mut headers = HeaderMap::new();
        assert_eq!(limit_key(&source, client, &headers, None), ip("2001:db8::"));
        headers.insert("x-api-key", HeaderValue::from_static(""));
        assert_eq!(limit_key(&source, client, &headers, None), ip("2001:db8::"));
        headers.insert("x-api-key", HeaderValue::from_static("k-123"));
        headers.append("x-api-key", HeaderValue::from_static("k-456"));
        assert_eq!(
            limit_key(&source, client, &headers, Some("ignored")),
            LimitKey::Header((*b"k-123").into())
        );
        // Opaque bytes are fine: the key is the raw value, not a string.
        headers.insert("x-api-key", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        assert_eq!(
            limit_key(&source, client, &headers, None),
            LimitKey::Header((*b"caf\xe9").into())
        );
    }

    #[test]
    fn long_values_become_digests_and_stay_distinct() {
        let source: KeySource = "header:x-api-key".parse().unwrap();
        let client = addr("192.0.2.7");
        let key_for = |v: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("x-api-key", HeaderValue::from_str(v).unwrap());
            limit_key(&source, client, &headers, None)
        };
        let at_limit = "a".repeat(MAX_INLINE_KEY_BYTES);
        assert!(matches!(key_for(&at_limit), LimitKey::Header(_)));
        let long_a = "a".repeat(4096);
        let long_b = format!("{}b", "a".repeat(4095));
        assert!(matches!(key_for(&long_a), LimitKey::Digest(_)));
        assert_eq!(key_for(&long_a), key_for(&long_a));
        assert_ne!(key_for(&long_a), key_for(&long_b));
        // Same bytes as a subject and as a header are different keys.
        let none = HeaderMap::new();
        assert_ne!(
            limit_key(&KeySource::Sub, client, &none, Some(&long_a)),
            key_for(&long_a)
        );
    }

    #[test]
    fn debug_never_prints_header_values() {
        let key = LimitKey::Header((*b"secret-api-key").into());
        let shown = format!("{key:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert_eq!(shown, "Header(<14 bytes>)");
    }

    // ---- client_ip -----------------------------------------------------------

    #[test]
    fn untrusted_peer_ignores_x_forwarded_for() {
        let trusted = nets(&["10.0.0.0/8"]);
        let peer = addr("203.0.113.9");
        assert_eq!(client_ip(peer, &xff(&["1.2.3.4"]), &trusted), peer);
        assert_eq!(client_ip(peer, &xff(&["1.2.3.4"]), &[]), peer);
    }

    #[test]
    fn spoofed_x_forwarded_for_does_not_buy_a_fresh_bucket() {
        let (limiter, _clock) = fake("1/m", 2);
        let trusted = nets(&["10.0.0.0/8"]);
        let peer = addr("203.0.113.9");
        let mut outcomes = Vec::new();
        for i in 0..5 {
            let headers = xff(&[&format!("198.51.100.{i}")]);
            let key = limit_key(
                &KeySource::Ip,
                client_ip(peer, &headers, &trusted),
                &headers,
                None,
            );
            outcomes.push(limiter.check(&key).is_ok());
        }
        assert_eq!(outcomes, [true, true, false, false, false]);
    }

    #[test]
    fn trusted_peer_takes_the_rightmost_untrusted_address() {
        let trusted = nets(&["10.0.0.0/8", "2001:db8:ffff::/48"]);
        let peer = addr("10.0.0.1");
        // The client prepended a spoofed entry; the proxy appended what it saw.
        assert_eq!(
            client_ip(peer, &xff(&["6.6.6.6, 198.51.100.4"]), &trusted),
            addr("198.51.100.4")
        );
        // A chain of trusted proxies is walked through.
        assert_eq!(
            client_ip(
                peer,
                &xff(&["6.6.6.6, 198.51.100.4, 10.1.1.1, 10.2.2.2"]),
                &trusted
            ),
            addr("198.51.100.4")
        );
        // Several headers form one list, in order.
        assert_eq!(
            client_ip(
                peer,
                &xff(&["6.6.6.6", "198.51.100.4", "10.1.1.1"]),
                &trusted
            ),
            addr("198.51.100.4")
        );
        // Ports, brackets, IPv6 and empty elements.
        assert_eq!(
            client_ip(peer, &xff(&["198.51.100.4:5678, ,"]), &trusted),
            addr("198.51.100.4")
        );
        assert_eq!(
            client_ip(peer, &xff(&["[2001:db8::1]:443"]), &trusted),
            addr("2001:db8::1")
        );
        assert_eq!(
            client_ip(peer, &xff(&["[2001:db8::2], 2001:db8:ffff::1"]), &trusted),
            addr("2001:db8::2")
        );
        // A v4-mapped peer (dual-stack socket) still matches an IPv4 network.
        assert_eq!(
            client_ip(addr("::ffff:10.0.0.1"), &xff(&["198.51.100.4"]), &trusted),
            addr("198.51.100.4")
        );
        assert_eq!(
            client_ip(peer, &xff(&["::ffff:198.51.100.4"]), &trusted),
            addr("198.51.100.4")
        );
    }

    #[test]
    fn trusted_peer_without_a_usable_entry() {
        let trusted = nets(&["10.0.0.0/8"]);
        let peer = addr("10.0.0.1");
        assert_eq!(client_ip(peer, &HeaderMap::new(), &trusted), peer);
        // Every hop is trusted: the left-most one is the client (a health checker, say).
        assert_eq!(
            client_ip(peer, &xff(&["10.9.9.9, 10.8.8.8"]), &trusted),
            addr("10.9.9.9")
        );
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(client_ip(peer, &xff(&["garbage"]), &trusted), peer);
        assert_eq!(client_ip(peer, &xff(&["unknown"]), &trusted), peer);
        assert_eq!(
            client_ip(peer, &xff(&["198.51.100.4, not-an-ip, 10.7.7.7"]), &trusted),
            addr("10.7.7.7")
        );
        assert_eq!(
            client_ip(peer, &xff(&["198.51.100.4, 999.1.1.1"]), &trusted),
            peer
        );
        let opaque = {
            let mut h = HeaderMap::new();
            h.insert(
                "x-forwarded-for",
                HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
            );
            h
        };
        assert_eq!(client_ip(peer, &opaque, &trusted), peer);
    }
}
