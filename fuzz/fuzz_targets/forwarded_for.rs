//! `X-Forwarded-For` handling: the client address the rate limiter keys on
//! (`portcullis::policy::rate_limit::client_ip`) and the fields the
//! upstream gets (`portcullis::forward::forwarded_fields`).
//!
//! Input: byte 0 picks the peer from a pool of addresses, byte 1 which of a
//! pool of networks are `trusted_proxies`, byte 2 which other fields the
//! client sent; the rest, split at NUL bytes, are `X-Forwarded-For` values
//! (those a header cannot carry are dropped), the first of them also serving
//! as an attacker's prefix.
//!
//! Checks: no panic; an untrusted peer is the client whatever the header
//! says; otherwise the client is the peer or an address from the header,
//! exactly the one the documented walk picks (from the right, past trusted
//! hops, stopping at garbage); a client who can only prepend to the header
//! cannot change the answer once the walk has stopped on its own; and the
//! upstream's `X-Forwarded-For` is the peer alone (untrusted) or the
//! client's list with the peer appended (trusted), with the client's own
//! `X-Forwarded-*` (and, from an untrusted peer, `Forwarded` and
//! `X-Real-IP`) removed.
//!
//! Run with `cargo +nightly fuzz run forwarded_for` from the repository root.

#![no_main]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use http::{HeaderMap, HeaderValue};
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use portcullis::forward::{HostField, forwarded_fields};
use portcullis::policy::rate_limit::client_ip;

const PEERS: [&str; 16] = [
    "10.0.0.1",
    "10.0.0.2",
    "192.0.2.1",
    "198.51.100.4",
    "203.0.113.9",
    "::1",
    "2001:db8::1",
    "::ffff:10.0.0.1",
    "127.0.0.1",
    "172.16.0.1",
    "fe80::1",
    "0.0.0.0",
    "255.255.255.255",
    "::ffff:198.51.100.4",
    "2001:db8:ffff::1",
    "100.64.0.1",
];

const NETS: [&str; 8] = [
    "10.0.0.0/8",
    "192.0.2.0/24",
    "127.0.0.1/32",
    "::1/128",
    "2001:db8::/32",
    "172.16.0.0/12",
    "0.0.0.0/0",
    "::ffff:0:0/96",
];

fn trusted(ip: IpAddr, nets: &[IpNet]) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

/// An entry as the documentation describes it: an address, with or
/// without a port, IPv6 possibly in brackets; IPv4-mapped read as IPv4.
fn address(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?;
    let ip = text
        .parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            text.strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<Ipv6Addr>()
                .ok()
                .map(IpAddr::V6)
        })?;
    Some(ip.to_canonical())
}

/// The walk of `client_ip`'s documentation, and whether it stopped before
/// the left end of the list (at an untrusted address or at garbage).
fn reference(peer: IpAddr, values: &[HeaderValue], nets: &[IpNet]) -> (IpAddr, bool) {
    let peer = peer.to_canonical();
    if !trusted(peer, nets) {
        return (peer, true);
    }
    let entries: Vec<&[u8]> = values
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|e| !e.is_empty())
        .collect();
    let mut nearest = peer;
    for entry in entries.iter().rev() {
        match address(entry) {
            None => return (nearest, true),
            Some(ip) if !trusted(ip, nets) => return (ip, true),
            Some(ip) => nearest = ip,
        }
    }
    (nearest, false)
}

fn xff_map(values: &[HeaderValue]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for value in values {
        headers.append("x-forwarded-for", value.clone());
    }
    headers
}

fuzz_target!(|data: &[u8]| {
    let [peer_pick, net_bits, field_bits, rest @ ..] = data else {
        return;
    };
    let peer: IpAddr = PEERS[usize::from(*peer_pick) % PEERS.len()]
        .parse()
        .unwrap();
    let nets: Vec<IpNet> = NETS
        .iter()
        .enumerate()
        .filter(|(i, _)| net_bits >> i & 1 != 0)
        .map(|(_, n)| n.parse().unwrap())
        .collect();
    let values: Vec<HeaderValue> = rest
        .split(|&b| b == 0)
        .filter_map(|v| HeaderValue::from_bytes(v).ok())
        .collect();

    // The rate limiter's client address.
    let headers = xff_map(&values);
    let client = client_ip(peer, &headers, &nets);
    let (expected, stopped) = reference(peer, &values, &nets);
    assert_eq!(
        client, expected,
        "peer {peer}, trusted {nets:?}, X-Forwarded-For {values:?}"
    );
    let canonical_peer = peer.to_canonical();
    if !trusted(canonical_peer, &nets) {
        assert_eq!(
            client, canonical_peer,
            "an untrusted peer chose its own address"
        );
    }
    if stopped && let Some(prefix) = values.first() {
        let mut prepended = vec![prefix.clone()];
        prepended.extend(values.iter().cloned());
        assert_eq!(
            client_ip(peer, &xff_map(&prepended), &nets),
            client,
            "what a client prepends decided its address"
        );
    }

    // The upstream's fields.
    let peer_text = HeaderValue::from_str(&canonical_peer.to_string()).unwrap();
    let peer_trusted = trusted(canonical_peer, &nets);
    let mut headers = xff_map(&values);
    let optional = [
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "evil.example"),
        ("forwarded", "for=6.6.6.6"),
        ("x-real-ip", "6.6.6.6"),
        ("host", "app.example"),
    ];
    for (i, (name, value)) in optional.iter().enumerate() {
        if field_bits >> i & 1 != 0 {
            headers.append(*name, HeaderValue::from_static(value));
        }
    }
    let host = match field_bits >> 5 & 3 {
        0 => None,
        1 => Some(HeaderValue::from_static("app.example")),
        _ => Some(HeaderValue::from_static("other.example")),
    };
    let sent_host = headers.get("host").cloned();
    let sent_forwarded = headers.get_all("forwarded").iter().count();
    let sent_real_ip = headers.get_all("x-real-ip").iter().count();
    let fields = forwarded_fields(&mut headers, &peer_text, peer_trusted, host.clone());
    let expected_xff = if peer_trusted && !values.is_empty() {
        let mut joined = Vec::new();
        for value in &values {
            joined.extend_from_slice(value.as_bytes());
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(peer_text.as_bytes());
        joined
    } else {
        peer_text.as_bytes().to_vec()
    };
    assert_eq!(
        fields.forwarded_for.as_bytes(),
        expected_xff,
        "X-Forwarded-For upstream"
    );
    for name in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"] {
        assert!(!headers.contains_key(name), "the client's {name} kept");
    }
    let (forwarded, real_ip) = if peer_trusted {
        (sent_forwarded, sent_real_ip)
    } else {
        (0, 0)
    };
    assert_eq!(headers.get_all("forwarded").iter().count(), forwarded);
    assert_eq!(headers.get_all("x-real-ip").iter().count(), real_ip);
    assert_eq!(fields.forwarded_host, host);
    match (&fields.host, &host) {
        (HostField::InMap, Some(host)) => {
            assert_eq!(sent_host.as_ref(), Some(host));
            assert_eq!(headers.get("host"), Some(host));
        }
        (HostField::Write(written), Some(host)) => {
            assert_eq!(written, host);
            assert!(!headers.contains_key("host"));
        }
        (HostField::Missing, None) => assert!(!headers.contains_key("host")),
        _ => panic!("host field does not match the request's host {host:?}"),
    }
});
