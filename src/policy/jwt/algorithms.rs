//! The JWS algorithms portcullis can verify: names, the `algorithms` list
//! parsed once at load, and [`AlgSet`], the bit set that says which
//! algorithms a key may serve. A token's `alg` is looked up here on every
//! request, so the lookup allocates nothing.

use std::fmt;

use jsonwebtoken::Algorithm;

use super::settings::{JwtConfigError, config_err};

/// Every algorithm we can verify, in the order used for [`AlgSet`] bits.
pub(super) const ALGS: [Algorithm; 12] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

const ALG_NAMES: [&str; 12] = [
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
    "ES384", "EdDSA",
];

/// Exact (case-sensitive, as RFC 7518 names are) name → algorithm. Used on
/// the hot path for the header's `alg`: no allocation.
pub(super) fn alg_from_name(name: &str) -> Option<(usize, Algorithm)> {
    ALG_NAMES
        .iter()
        .position(|n| *n == name)
        .map(|i| (i, ALGS[i]))
}

fn alg_index(alg: Algorithm) -> Option<usize> {
    ALGS.iter().position(|a| *a == alg)
}

pub(crate) fn alg_name(alg: Algorithm) -> &'static str {
    alg_index(alg).map_or("?", |i| ALG_NAMES[i])
}

/// A set of algorithms as a bitmask over [`ALGS`].
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct AlgSet(u16);

impl AlgSet {
    pub(super) const HMAC: AlgSet = AlgSet(0b000_0000_0111);
    pub(super) const RSA: AlgSet = AlgSet(0b001_1111_1000);
    pub(super) const ES256: AlgSet = AlgSet(1 << 9);
    pub(super) const ES384: AlgSet = AlgSet(1 << 10);
    pub(super) const EDDSA: AlgSet = AlgSet(1 << 11);

    pub(super) fn of(alg: Algorithm) -> AlgSet {
        alg_index(alg).map_or(AlgSet(0), |i| AlgSet(1 << i))
    }
    pub(super) fn has(self, i: usize) -> bool {
        self.0 & (1 << i) != 0
    }
    pub(super) fn and(self, other: AlgSet) -> AlgSet {
        AlgSet(self.0 & other.0)
    }
    pub(super) fn or(self, other: AlgSet) -> AlgSet {
        AlgSet(self.0 | other.0)
    }
    /// The members that are not HS*: those a public key may serve.
    pub(super) fn asymmetric(self) -> AlgSet {
        AlgSet(self.0 & !AlgSet::HMAC.0)
    }
    pub(super) fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub(super) fn names(self) -> String {
        let names: Vec<&str> = (0..ALGS.len())
            .filter(|i| self.has(*i))
            .map(|i| ALG_NAMES[i])
            .collect();
        names.join(", ")
    }
}

impl fmt::Debug for AlgSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}]", self.names())
    }
}

/// The smallest HS* secret we accept: the hash output size (RFC 7518 §3.2).
pub(crate) fn min_hmac_secret(alg: Algorithm) -> usize {
    match alg {
        Algorithm::HS384 => 48,
        Algorithm::HS512 => 64,
        _ => 32,
    }
}

/// Parses `algorithms` into an ordered, de-duplicated list, with a clear
/// error for each way it can be wrong.
pub(crate) fn parse_algorithms(names: &[String]) -> Result<Vec<Algorithm>, JwtConfigError> {
    if names.is_empty() {
        return Err(config_err(
            "algorithms",
            "lists no algorithm; name at least one, e.g. [\"HS256\"]",
        ));
    }
    let mut out: Vec<Algorithm> = Vec::with_capacity(names.len());
    for name in names {
        let name = name.as_str();
        if name.eq_ignore_ascii_case("none") {
            return Err(config_err(
                "algorithms",
                "\"none\" can never be allowed: it would accept unsigned tokens",
            ));
        }
        if name.eq_ignore_ascii_case("ES512") {
            return Err(config_err(
                "algorithms",
                "ES512 (ECDSA P-521) is not supported by the JWT library portcullis uses; \
                 use ES256 or ES384",
            ));
        }
        let Some((_, alg)) = alg_from_name(name) else {
            let hint = ALG_NAMES
                .iter()
                .find(|n| n.eq_ignore_ascii_case(name))
                .map(|n| format!(" (did you mean \"{n}\"?)"))
                .unwrap_or_default();
            return Err(config_err(
                "algorithms",
                format!(
                    "unknown algorithm \"{name}\"{hint}; supported: {}",
                    ALG_NAMES.join(", ")
                ),
            ));
        };
        if !out.contains(&alg) {
            out.push(alg);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_rejects_bad_algorithm_lists() {
        for (algs, needle) in [
            (vec![], "no algorithm"),
            (vec!["none"], "\"none\" can never"),
            (vec!["HS256", "None"], "\"none\" can never"),
            (vec!["ES512"], "ES512"),
            (vec!["hs256"], "did you mean \"HS256\""),
            (vec!["RS1024"], "unknown algorithm \"RS1024\""),
        ] {
            let names: Vec<String> = algs.iter().map(|a| a.to_string()).collect();
            let Err(e) = parse_algorithms(&names) else {
                panic!("{algs:?} accepted");
            };
            assert_eq!(e.key, "algorithms");
            assert!(e.message.contains(needle), "{algs:?}: {e}");
        }
    }

    #[test]
    fn listed_twice_counts_once_in_the_order_written() {
        let names = ["RS256", "HS256", "RS256"].map(String::from);
        assert_eq!(
            parse_algorithms(&names).unwrap(),
            [Algorithm::RS256, Algorithm::HS256]
        );
    }
}
