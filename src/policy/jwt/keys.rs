//! Public keys decoded for verification: the `public_key` PEM and JWKS
//! documents (the `jwks` file, or what `jwks_url` serves). Each key is
//! narrowed here to the algorithms it may verify — by its type, its curve,
//! its JWK `alg`, `use` and `key_ops`, and the allow-list — so the verifier
//! never has to ask whether a key fits a token's `alg`, only whether it is
//! in the set. A JWK that cannot be used is skipped and logged, and the
//! others still load (RFC 7517 §5).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::Value;

use super::algorithms::AlgSet;

/// Keys beyond this many in one JWKS are ignored: a real set holds a few, and
/// lookups scan linearly.
const MAX_JWKS_KEYS: usize = 100;

/// A decoded public key and the algorithms it may verify (already narrowed
/// to the allow-list, the key type, its curve, and its JWK `alg`).
#[derive(Clone)]
pub(super) struct VerifyKey {
    pub(super) algs: AlgSet,
    pub(super) key: DecodingKey,
}

/// A set of keys from a JWKS (file or URL). Small, so scanned linearly.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: Vec<(Option<Box<str>>, VerifyKey)>,
}

/// Outcome of looking a token's key up in a [`KeySet`].
pub(super) enum Lookup<'a> {
    Found(&'a DecodingKey),
    /// The `kid` is there, but none of its keys may verify this `alg`.
    KidWrongAlg,
    NotFound,
}

impl KeySet {
    pub(super) fn by_kid(&self, kid: &str, alg_i: usize) -> Lookup<'_> {
        let mut seen = false;
        for (k, vk) in &self.keys {
            if k.as_deref() == Some(kid) {
                if vk.algs.has(alg_i) {
                    return Lookup::Found(&vk.key);
                }
                seen = true;
            }
        }
        if seen {
            Lookup::KidWrongAlg
        } else {
            Lookup::NotFound
        }
    }

    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub(super) fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|(k, _)| k.as_deref() == Some(kid))
    }

    /// Keys that may verify `alg`, for a token without `kid`.
    pub(super) fn fitting(&self, alg_i: usize) -> impl Iterator<Item = &DecodingKey> {
        self.keys
            .iter()
            .filter(move |(_, vk)| vk.algs.has(alg_i))
            .map(|(_, vk)| &vk.key)
    }
}

/// Why one JWK was skipped. `expected` marks skips that are normal (an
/// encryption key, a key for an algorithm not listed) and are only logged at
/// debug level.
struct Skip {
    expected: bool,
    reason: String,
}

fn skip(expected: bool, reason: impl Into<String>) -> Skip {
    Skip {
        expected,
        reason: reason.into(),
    }
}

fn b64url_len(s: &str) -> Option<usize> {
    URL_SAFE_NO_PAD.decode(s).ok().map(|v| v.len())
}

/// Byte length of a base64url big-endian integer without its leading zeros.
fn b64url_uint_len(s: &str) -> Option<usize> {
    let v = URL_SAFE_NO_PAD.decode(s).ok()?;
    Some(v.iter().skip_while(|b| **b == 0).count())
}

/// Decodes one JWK for verification, or says why it cannot be used.
fn decode_jwk(value: Value, allowed: AlgSet) -> Result<(Option<Box<str>>, VerifyKey), Skip> {
    // Kept as written: jsonwebtoken folds unknown names into one variant.
    let alg_text = value
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let jwk: Jwk =
        serde_json::from_value(value).map_err(|e| skip(false, format!("not a valid JWK ({e})")))?;
    match &jwk.common.public_key_use {
        None | Some(PublicKeyUse::Signature) => {}
        Some(PublicKeyUse::Encryption) => return Err(skip(true, "\"use\" is \"enc\"")),
        Some(PublicKeyUse::Other(u)) => {
            return Err(skip(true, format!("\"use\" is \"{u}\", not \"sig\"")));
        }
    }
    if let Some(ops) = &jwk.common.key_operations
        && !ops.contains(&KeyOperations::Verify)
    {
        return Err(skip(true, "\"key_ops\" does not include \"verify\""));
    }
    let (mut algs, key) = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => {
            // aws-lc verifies RSA keys of 2048..=8192 bits only; refusing
            // others here turns a silent "bad signature" into a logged skip.
            let bytes = b64url_uint_len(&p.n).ok_or_else(|| skip(false, "bad RSA \"n\""))?;
            if !(256..=1024).contains(&bytes) {
                return Err(skip(
                    false,
                    format!("RSA key of {} bits (2048 to 8192 supported)", bytes * 8),
                ));
            }
            let key = DecodingKey::from_rsa_components(&p.n, &p.e)
                .map_err(|e| skip(false, format!("bad RSA key ({e})")))?;
            (AlgSet::RSA, key)
        }
        AlgorithmParameters::EllipticCurve(p) => {
            let (algs, size) = match p.curve {
                EllipticCurve::P256 => (AlgSet::ES256, 32),
                EllipticCurve::P384 => (AlgSet::ES384, 48),
                EllipticCurve::P521 => {
                    return Err(skip(false, "P-521 (ES512) keys are not supported"));
                }
                _ => return Err(skip(false, "unsupported EC curve")),
            };
            if b64url_len(&p.x) != Some(size) || b64url_len(&p.y) != Some(size) {
                return Err(skip(false, "bad EC \"x\"/\"y\" for its curve"));
            }
            let key = DecodingKey::from_ec_components(&p.x, &p.y)
                .map_err(|e| skip(false, format!("bad EC key ({e})")))?;
            (algs, key)
        }
        AlgorithmParameters::OctetKeyPair(p) => {
            if p.curve != EllipticCurve::Ed25519 {
                return Err(skip(false, "only Ed25519 OKP keys are supported"));
            }
            if b64url_len(&p.x) != Some(32) {
                return Err(skip(false, "bad Ed25519 \"x\""));
            }
            let key = DecodingKey::from_ed_components(&p.x)
                .map_err(|e| skip(false, format!("bad Ed25519 key ({e})")))?;
            (AlgSet::EDDSA, key)
        }
        AlgorithmParameters::OctetKey(_) => {
            // A shared secret published in a key set is never used: HS*
            // tokens are verified with secret_env only.
            return Err(skip(
                false,
                "symmetric (\"oct\") keys are not used; HS* uses secret_env",
            ));
        }
        _ => return Err(skip(false, "unsupported key type")),
    };
    if let Some(ka) = jwk.common.key_algorithm {
        // RFC 7517 §4.4: a key with an `alg` is for that algorithm only.
        let alg = Algorithm::try_from(ka).map_err(|_| {
            skip(
                true,
                format!("\"alg\" \"{alg_text}\" is not a supported JWS algorithm"),
            )
        })?;
        let only = AlgSet::of(alg);
        if algs.and(only).is_empty() {
            return Err(skip(
                false,
                format!("\"alg\" \"{alg_text}\" does not fit the key type"),
            ));
        }
        algs = only;
    }
    let usable = algs.and(allowed);
    if usable.is_empty() {
        return Err(skip(
            true,
            format!(
                "fits {}, none of which is listed in algorithms",
                algs.names()
            ),
        ));
    }
    let kid = jwk.common.key_id.map(String::into_boxed_str);
    Ok((kid, VerifyKey { algs: usable, key }))
}

/// The outer shape of a JWKS; each key is decoded on its own so that one bad
/// or foreign key does not stop the others loading (RFC 7517 §5).
#[derive(Deserialize)]
pub(crate) struct RawJwks {
    pub(crate) keys: Vec<Value>,
}

/// Decodes a JWKS document. `Err` when it is not a JWKS at all; keys that
/// cannot be used are skipped and logged.
pub(super) fn decode_jwks(bytes: &[u8], allowed: AlgSet, source: &str) -> Result<KeySet, String> {
    let raw: RawJwks =
        serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS document ({e})"))?;
    let total = raw.keys.len();
    let mut set = KeySet::default();
    for (i, value) in raw.keys.into_iter().enumerate() {
        if i >= MAX_JWKS_KEYS {
            tracing::warn!(
                jwks = source,
                ignored = total - MAX_JWKS_KEYS,
                "JWKS holds more than {MAX_JWKS_KEYS} keys; the rest are ignored"
            );
            break;
        }
        let kid_for_log = value
            .get("kid")
            .and_then(Value::as_str)
            .unwrap_or("-")
            .to_string();
        match decode_jwk(value, allowed) {
            Ok(entry) => set.keys.push(entry),
            Err(s) if s.expected => {
                tracing::debug!(jwks = source, index = i, kid = %kid_for_log, reason = %s.reason, "JWK skipped");
            }
            Err(s) => {
                tracing::warn!(jwks = source, index = i, kid = %kid_for_log, reason = %s.reason, "JWK skipped");
            }
        }
    }
    Ok(set)
}

/// The first PEM label in `pem` (`"PUBLIC KEY"`, `"PRIVATE KEY"`, ...).
pub(crate) fn pem_label(pem: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(pem).ok()?;
    let start = text.find("-----BEGIN ")? + "-----BEGIN ".len();
    let rest = &text[start..];
    Some(&rest[..rest.find("-----")?])
}

/// Decodes the `public_key` PEM and works out which algorithms it can serve.
/// Says why as a sentence about the file (`is not a PEM file ...`); the
/// caller names the key and the file.
pub(super) fn decode_public_key(pem: &[u8], allowed: AlgSet) -> Result<VerifyKey, String> {
    let label = pem_label(pem)
        .ok_or_else(|| String::from("is not a PEM file (expected -----BEGIN PUBLIC KEY-----)"))?;
    if label.contains("PRIVATE") {
        return Err(String::from(
            "holds a private key; give the public key instead \
             (e.g. `openssl pkey -in key.pem -pubout`)",
        ));
    }
    let (kind, algs, key) = if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        // Round-trip through the JWK form to have aws-lc parse the DER now,
        // and to learn the modulus size.
        let bits = match Jwk::from_decoding_key(&key, None).map(|j| j.algorithm) {
            Ok(AlgorithmParameters::RSA(p)) => b64url_uint_len(&p.n).unwrap_or(0) * 8,
            _ => 0,
        };
        if !(2048..=8192).contains(&bits) {
            return Err(if bits == 0 {
                "is not a valid RSA public key".to_string()
            } else {
                format!("is a {bits}-bit RSA key; 2048 to 8192 bits are supported")
            });
        }
        ("an RSA", AlgSet::RSA, key)
    } else if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        let point_len = key.try_get_as_bytes().map_or(0, <[u8]>::len);
        match point_len {
            65 => ("an EC P-256", AlgSet::ES256, key),
            97 => ("an EC P-384", AlgSet::ES384, key),
            133 => {
                return Err(String::from(
                    "is an EC P-521 key; ES512 is not supported, use P-256 (ES256) or P-384 (ES384)",
                ));
            }
            _ => {
                return Err(String::from("is not a valid (uncompressed) EC public key"));
            }
        }
    } else if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        if key.try_get_as_bytes().map_or(0, <[u8]>::len) != 32 {
            return Err(String::from("is not a valid Ed25519 public key"));
        }
        ("an Ed25519", AlgSet::EDDSA, key)
    } else {
        return Err(format!(
            "\"{label}\" is not a supported public key (RSA, EC P-256/P-384 or Ed25519 \
                 in -----BEGIN PUBLIC KEY----- or -----BEGIN RSA PUBLIC KEY----- form)"
        ));
    };
    let usable = algs.and(allowed);
    if usable.is_empty() {
        return Err(format!(
            "is {kind} key, which fits {} — none of them is listed in algorithms",
            algs.names()
        ));
    }
    Ok(VerifyKey { algs: usable, key })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::jwt::test_support::*;

    fn es256() -> AlgSet {
        AlgSet::of(Algorithm::ES256)
    }

    #[test]
    fn a_jwks_beyond_its_key_limit_is_cut() {
        let keys: Vec<Value> = (0..=MAX_JWKS_KEYS)
            .map(|i| ec_a().jwk(&format!("k{i}")))
            .collect();
        let set = decode_jwks(&jwks(&keys), es256(), "test").unwrap();
        assert_eq!(set.len(), MAX_JWKS_KEYS);
        assert!(set.has_kid("k0") && !set.has_kid(&format!("k{MAX_JWKS_KEYS}")));
    }

    #[test]
    fn keys_are_found_by_kid_and_algorithm() {
        let set = decode_jwks(&jwks(&[ec_a().jwk("a")]), es256(), "test").unwrap();
        let index = |name| {
            crate::policy::jwt::algorithms::alg_from_name(name)
                .unwrap()
                .0
        };
        let (es256_i, es384_i) = (index("ES256"), index("ES384"));
        assert!(matches!(set.by_kid("a", es256_i), Lookup::Found(_)));
        assert!(matches!(set.by_kid("a", es384_i), Lookup::KidWrongAlg));
        assert!(matches!(set.by_kid("b", es256_i), Lookup::NotFound));
        assert_eq!(set.fitting(es256_i).count(), 1);
        assert_eq!(set.fitting(es384_i).count(), 0);
    }

    #[test]
    fn not_a_jwks_document() {
        let e = decode_jwks(b"{\"not\":\"a jwks\"}", es256(), "test")
            .err()
            .unwrap();
        assert!(e.starts_with("not a JWKS document"), "{e}");
    }

    #[test]
    fn pem_labels() {
        assert_eq!(pem_label(ec_a().public_pem.as_bytes()), Some("PUBLIC KEY"));
        assert_eq!(
            pem_label(ec_a().private_pem.as_bytes()),
            Some("PRIVATE KEY")
        );
        assert_eq!(pem_label(b"hello"), None);
    }
}
