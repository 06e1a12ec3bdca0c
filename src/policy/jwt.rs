//! JWT verification for routes with `jwt = true`, and token minting for
//! `portcullis token`.
//!
//! [`JwtVerifier`] is built once from validated [`JwtSettings`] (the `[jwt]`
//! section): every key — the HS* secret, a `public_key` PEM, a `jwks` file —
//! is decoded there, so a bad key is a config error at load and the request
//! path never parses PEM or JWK. Keys from `jwks_url` are decoded per fetch,
//! off the request path, and published through an [`ArcSwap`], so
//! [`JwtVerifier::verify`] takes no lock for a known `kid`.
//!
//! Order of checks on a token, cheapest and least trusting first: size, shape
//! (three segments), header (base64url JSON with an `alg`, no `crit`), `alg`
//! in the allow-list — before any key is looked at, which is what defeats
//! `alg: none` and RS256→HS256 confusion — then key choice by `alg` family
//! and `kid`, then signature and claims (jsonwebtoken, with `validate_nbf`
//! turned on, our leeway, `iss`/`aud` required when configured).
//!
//! HS* tokens are only ever checked with the configured secret, and
//! asymmetric tokens only with public keys whose type (and JWK `alg`, `use`,
//! `key_ops`, curve) fits the token's `alg`: a key never serves an algorithm
//! it was not meant for. Header parameters that point at keys (`jku`, `jwk`,
//! `x5u`, `x5c`) are ignored, never fetched.
//!
//! `jwks_url` (plain `http://` only for now) is fetched at
//! [`JwtVerifier::start_background`], every `jwks_refresh`, and on an
//! unknown `kid` — at most once per `min_refetch_interval` (a minute), with
//! concurrent callers sharing one fetch. A failed fetch keeps the last good
//! key set; a successful one replaces it whole.
//!
//! [`TokenError`] says why a token was refused, for the security log; it
//! never holds the token or any part of it.

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONNECTION, COOKIE, HOST, USER_AGENT};
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

/// Longest token accepted, in bytes. Equal to the default `max_header_bytes`:
/// real tokens (even group-laden ones) stay well under it, and it bounds the
/// base64/JSON work an anonymous client can ask for.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Default minimum time between two unknown-`kid` refetches of `jwks_url`.
pub const DEFAULT_MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(60);

/// Longest a JWKS fetch may take, connect to last body byte.
const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest JWKS document accepted (file or URL).
const DEFAULT_MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Keys beyond this many in one JWKS are ignored: a real set holds a few, and
/// lookups scan linearly.
const MAX_JWKS_KEYS: usize = 100;

/// Largest `leeway` accepted.
const MAX_LEEWAY: Duration = Duration::from_secs(3600);

/// Longest wait before retrying `jwks_url` while no fetch has ever succeeded
/// (backing off from 1 s); after a success, retries follow `jwks_refresh`.
const MAX_INITIAL_RETRY: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Settings and config errors
// ---------------------------------------------------------------------------

/// The `[jwt]` section as the config layer read it (files and the secret's
/// environment variable already read; nothing decoded yet).
#[derive(Clone)]
pub struct JwtSettings {
    /// As written, e.g. `["HS256", "RS256"]`.
    pub algorithms: Vec<String>,
    /// The HS* secret, read from the variable named by `secret_env`; `None`
    /// when unset.
    pub secret: Option<Vec<u8>>,
    /// The variable's name, for error messages only.
    pub secret_env: Option<String>,
    /// Contents of the `public_key` file.
    pub public_key_pem: Option<Vec<u8>>,
    /// Contents of the `jwks` file.
    pub jwks_json: Option<Vec<u8>>,
    pub jwks_url: Option<String>,
    /// Default 10 minutes.
    pub jwks_refresh: Duration,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Default 30 seconds; applied to `exp` and `nbf`.
    pub leeway: Duration,
}

impl Default for JwtSettings {
    /// The SPEC's defaults: `algorithms = ["HS256"]`, `secret_env =
    /// "JWT_SECRET"` (not read here), `jwks_refresh = "10m"`, `leeway = "30s"`.
    fn default() -> Self {
        JwtSettings {
            algorithms: vec!["HS256".to_string()],
            secret: None,
            secret_env: Some("JWT_SECRET".to_string()),
            public_key_pem: None,
            jwks_json: None,
            jwks_url: None,
            jwks_refresh: Duration::from_secs(600),
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
        }
    }
}

impl fmt::Debug for JwtSettings {
    // Hand-written so the secret can never reach a log through `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSettings")
            .field("algorithms", &self.algorithms)
            .field("secret", &self.secret.as_ref().map(|_| "[redacted]"))
            .field("secret_env", &self.secret_env)
            .field(
                "public_key_pem",
                &self.public_key_pem.as_ref().map(Vec::len),
            )
            .field("jwks_json", &self.jwks_json.as_ref().map(Vec::len))
            .field("jwks_url", &self.jwks_url)
            .field("jwks_refresh", &self.jwks_refresh)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .finish()
    }
}

/// A settings error: `key` is the `[jwt]` key at fault (`"algorithms"`,
/// `"secret_env"`, `"public_key"`, `"jwks"`, `"jwks_url"`, `"jwks_refresh"`, `"leeway"`,
/// or `"key"` for the private key given to [`mint`]) and `message` a sentence.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct JwtConfigError {
    pub key: &'static str,
    pub message: String,
}

fn config_err(key: &'static str, message: impl Into<String>) -> JwtConfigError {
    JwtConfigError {
        key,
        message: message.into(),
    }
}

/// Knobs that are not `[jwt]` keys; tests shrink them.
#[derive(Debug, Clone)]
pub struct VerifierOptions {
    /// Minimum time between two unknown-`kid` refetches (default 60 s).
    pub min_refetch_interval: Duration,
    /// Longest a JWKS fetch may take (default 10 s).
    pub fetch_timeout: Duration,
    /// Largest JWKS document accepted (default 1 MiB).
    pub max_jwks_bytes: usize,
}

impl Default for VerifierOptions {
    fn default() -> Self {
        VerifierOptions {
            min_refetch_interval: DEFAULT_MIN_REFETCH_INTERVAL,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
            max_jwks_bytes: DEFAULT_MAX_JWKS_BYTES,
        }
    }
}

// ---------------------------------------------------------------------------
// Algorithms
// ---------------------------------------------------------------------------

/// Every algorithm we can verify, in the order used for [`AlgSet`] bits.
const ALGS: [Algorithm; 12] = [
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
fn alg_from_name(name: &str) -> Option<(usize, Algorithm)> {
    ALG_NAMES
        .iter()
        .position(|n| *n == name)
        .map(|i| (i, ALGS[i]))
}

fn alg_index(alg: Algorithm) -> Option<usize> {
    ALGS.iter().position(|a| *a == alg)
}

fn alg_name(alg: Algorithm) -> &'static str {
    alg_index(alg).map_or("?", |i| ALG_NAMES[i])
}

/// A set of algorithms as a bitmask over [`ALGS`].
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct AlgSet(u16);

impl AlgSet {
    const HMAC: AlgSet = AlgSet(0b000_0000_0111);
    const RSA: AlgSet = AlgSet(0b001_1111_1000);
    const ES256: AlgSet = AlgSet(1 << 9);
    const ES384: AlgSet = AlgSet(1 << 10);
    const EDDSA: AlgSet = AlgSet(1 << 11);

    fn of(alg: Algorithm) -> AlgSet {
        alg_index(alg).map_or(AlgSet(0), |i| AlgSet(1 << i))
    }
    fn has(self, i: usize) -> bool {
        self.0 & (1 << i) != 0
    }
    fn and(self, other: AlgSet) -> AlgSet {
        AlgSet(self.0 & other.0)
    }
    fn or(self, other: AlgSet) -> AlgSet {
        AlgSet(self.0 | other.0)
    }
    fn is_empty(self) -> bool {
        self.0 == 0
    }
    fn names(self) -> String {
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
fn min_hmac_secret(alg: Algorithm) -> usize {
    match alg {
        Algorithm::HS384 => 48,
        Algorithm::HS512 => 64,
        _ => 32,
    }
}

/// Parses `algorithms` into an ordered, de-duplicated list, with a clear
/// error for each way it can be wrong.
fn parse_algorithms(names: &[String]) -> Result<Vec<Algorithm>, JwtConfigError> {
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

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

/// A decoded public key and the algorithms it may verify (already narrowed
/// to the allow-list, the key type, its curve, and its JWK `alg`).
#[derive(Clone)]
struct VerifyKey {
    algs: AlgSet,
    key: DecodingKey,
}

/// A set of keys from a JWKS (file or URL). Small, so scanned linearly.
#[derive(Default)]
struct KeySet {
    keys: Vec<(Option<Box<str>>, VerifyKey)>,
}

/// Outcome of looking a token's key up in a [`KeySet`].
enum Lookup<'a> {
    Found(&'a DecodingKey),
    /// The `kid` is there, but none of its keys may verify this `alg`.
    KidWrongAlg,
    NotFound,
}

impl KeySet {
    fn by_kid(&self, kid: &str, alg_i: usize) -> Lookup<'_> {
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

    fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|(k, _)| k.as_deref() == Some(kid))
    }

    /// Keys that may verify `alg`, for a token without `kid`.
    fn fitting(&self, alg_i: usize) -> impl Iterator<Item = &DecodingKey> {
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
struct RawJwks {
    keys: Vec<Value>,
}

/// Decodes a JWKS document. `Err` when it is not a JWKS at all; keys that
/// cannot be used are skipped and logged.
fn decode_jwks(bytes: &[u8], allowed: AlgSet, source: &str) -> Result<KeySet, String> {
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
fn pem_label(pem: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(pem).ok()?;
    let start = text.find("-----BEGIN ")? + "-----BEGIN ".len();
    let rest = &text[start..];
    Some(&rest[..rest.find("-----")?])
}

/// Decodes the `public_key` PEM and works out which algorithms it can serve.
fn decode_public_key(pem: &[u8], allowed: AlgSet) -> Result<VerifyKey, JwtConfigError> {
    let label = pem_label(pem).ok_or_else(|| {
        config_err(
            "public_key",
            "is not a PEM file (expected -----BEGIN PUBLIC KEY-----)",
        )
    })?;
    if label.contains("PRIVATE") {
        return Err(config_err(
            "public_key",
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
            return Err(config_err(
                "public_key",
                if bits == 0 {
                    "is not a valid RSA public key".to_string()
                } else {
                    format!("is a {bits}-bit RSA key; 2048 to 8192 bits are supported")
                },
            ));
        }
        ("an RSA", AlgSet::RSA, key)
    } else if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        let point_len = key.try_get_as_bytes().map_or(0, <[u8]>::len);
        match point_len {
            65 => ("an EC P-256", AlgSet::ES256, key),
            97 => ("an EC P-384", AlgSet::ES384, key),
            133 => {
                return Err(config_err(
                    "public_key",
                    "is an EC P-521 key; ES512 is not supported, use P-256 (ES256) or P-384 (ES384)",
                ));
            }
            _ => {
                return Err(config_err(
                    "public_key",
                    "is not a valid (uncompressed) EC public key",
                ));
            }
        }
    } else if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        if key.try_get_as_bytes().map_or(0, <[u8]>::len) != 32 {
            return Err(config_err(
                "public_key",
                "is not a valid Ed25519 public key",
            ));
        }
        ("an Ed25519", AlgSet::EDDSA, key)
    } else {
        return Err(config_err(
            "public_key",
            format!(
                "\"{label}\" is not a supported public key (RSA, EC P-256/P-384 or Ed25519 \
                 in -----BEGIN PUBLIC KEY----- or -----BEGIN RSA PUBLIC KEY----- form)"
            ),
        ));
    };
    let usable = algs.and(allowed);
    if usable.is_empty() {
        return Err(config_err(
            "public_key",
            format!(
                "is {kind} key, which fits {} — none of them is listed in algorithms",
                algs.names()
            ),
        ));
    }
    Ok(VerifyKey { algs: usable, key })
}

// ---------------------------------------------------------------------------
// jwks_url
// ---------------------------------------------------------------------------

/// A parsed `jwks_url`.
#[derive(Debug, Clone)]
struct JwksUrl {
    /// As configured, for logs.
    text: String,
    /// Host to connect to, IPv6 brackets removed.
    host: String,
    port: u16,
    /// `Host` header value.
    authority: String,
    path_and_query: String,
}

fn parse_jwks_url(text: &str) -> Result<JwksUrl, JwtConfigError> {
    let bad = |why: &str| config_err("jwks_url", format!("\"{text}\" {why}"));
    let uri: Uri = text.parse().map_err(|_| bad("is not a valid URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(config_err("jwks_url", "https is not supported yet"));
        }
        _ => return Err(bad("must start with http://")),
    }
    let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("must not contain credentials"));
    }
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    Ok(JwksUrl {
        text: text.to_string(),
        host: host.to_string(),
        port: authority.port_u16().unwrap_or(80),
        authority: authority.as_str().to_string(),
        path_and_query: uri
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
    })
}

/// One HTTP/1.1 GET on a fresh connection. No pool: a fetch happens every few
/// minutes, and a fresh connection keeps the fetch independent of whichever
/// tokio runtime runs it (verify may be called from several).
async fn http_get(url: &JwksUrl, max_bytes: usize) -> Result<Bytes, String> {
    let stream = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let req = Request::get(url.path_and_query.as_str())
        .header(HOST, url.authority.as_str())
        .header(ACCEPT, "application/jwk-set+json, application/json")
        .header(USER_AGENT, "portcullis")
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let exchange = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        if resp.status() != StatusCode::OK {
            return Err(format!("status {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), max_bytes)
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        Ok(body.to_bytes())
    };
    tokio::pin!(exchange);
    // The connection future must be polled for the exchange to progress; it
    // may also finish first (server closed after the body), in which case
    // the exchange still completes from what was already read.
    tokio::select! {
        r = &mut exchange => r,
        c = conn => match c {
            Ok(()) => exchange.await,
            Err(e) => Err(format!("connection: {e}")),
        },
    }
}

/// Bookkeeping for fetches; behind an async mutex that is only taken by the
/// refresh task and by unknown-`kid` callers, never on the hot path.
#[derive(Default)]
struct FetchState {
    /// When the last unknown-`kid` refetch started (scheduled and start
    /// fetches do not count).
    last_on_demand: Option<Instant>,
}

struct Remote {
    url: JwksUrl,
    allowed: AlgSet,
    refresh: Duration,
    min_refetch_interval: Duration,
    fetch_timeout: Duration,
    max_bytes: usize,
    keys: ArcSwap<KeySet>,
    /// A fetch has succeeded at least once.
    loaded: AtomicBool,
    fetch: Arc<tokio::sync::Mutex<FetchState>>,
}

impl Remote {
    /// Fetches and, on success, replaces the whole key set. Call with
    /// `fetch` locked, so fetches never overlap.
    async fn fetch_locked(&self, why: &'static str) -> bool {
        let result =
            match tokio::time::timeout(self.fetch_timeout, http_get(&self.url, self.max_bytes))
                .await
            {
                Ok(Ok(body)) => decode_jwks(&body, self.allowed, &self.url.text),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(format!("timed out after {:?}", self.fetch_timeout)),
            };
        match result {
            Ok(set) => {
                if set.keys.is_empty() {
                    tracing::warn!(jwks_url = %self.url.text, trigger = why, "JWKS fetched but holds no usable key; tokens from it will be refused");
                } else {
                    tracing::info!(jwks_url = %self.url.text, trigger = why, keys = set.keys.len(), "JWKS fetched");
                }
                self.keys.store(Arc::new(set));
                self.loaded.store(true, Ordering::Release);
                true
            }
            Err(e) => {
                tracing::warn!(jwks_url = %self.url.text, trigger = why, error = %e, "JWKS fetch failed; keeping the last good keys");
                false
            }
        }
    }

    /// The unknown-`kid` path: refetch unless one happened within
    /// `min_refetch_interval`. Concurrent callers queue on the lock and, once
    /// through, see the set the first one fetched. Returns whether a retry of
    /// the lookup can succeed.
    async fn refetch_for_kid(&self, kid: &str) -> bool {
        let mut state = self.fetch.lock().await;
        if self.keys.load().has_kid(kid) {
            return true;
        }
        if let Some(last) = state.last_on_demand
            && last.elapsed() < self.min_refetch_interval
        {
            return false;
        }
        state.last_on_demand = Some(Instant::now());
        self.fetch_locked("unknown kid").await && self.keys.load().has_kid(kid)
    }

    /// The refresh task: the start fetch (whose lock `start` already holds,
    /// so requests that arrive meanwhile wait for it instead of fetching
    /// too), then one fetch every `refresh`. Until a first success it
    /// retries sooner, backing off from 1 s.
    async fn run(
        weak: Weak<Remote>,
        start: Option<tokio::sync::OwnedMutexGuard<FetchState>>,
        refresh: Duration,
    ) {
        let mut ok = {
            let Some(remote) = weak.upgrade() else { return };
            let _guard = match start {
                Some(guard) => guard,
                None => remote.fetch.clone().lock_owned().await,
            };
            remote.fetch_locked("start").await
        };
        let mut backoff = Duration::from_secs(1);
        loop {
            let delay = if ok {
                refresh
            } else {
                let d = backoff.min(refresh).min(MAX_INITIAL_RETRY);
                backoff = backoff.saturating_mul(2);
                d
            };
            tokio::time::sleep(delay).await;
            let Some(remote) = weak.upgrade() else { return };
            let _guard = remote.fetch.lock().await;
            let fetched = remote.fetch_locked("refresh").await;
            ok = fetched || remote.loaded.load(Ordering::Acquire);
        }
    }
}

// ---------------------------------------------------------------------------
// Verifier
// ---------------------------------------------------------------------------

/// Why a token was refused: goes to the security log's detail, never to the
/// client beyond the error code. Never contains the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not three base64url segments, header or claims not JSON objects, a
    /// `crit` header, ...
    Malformed,
    /// Longer than [`MAX_TOKEN_BYTES`].
    TooLarge,
    /// The header's `alg` is not in `algorithms` (includes `none`).
    AlgorithmNotAllowed,
    /// No key with the token's `kid` (after a refetch, with `jwks_url`).
    UnknownKid,
    /// No key fits: a token without `kid` when several keys could apply, or
    /// a `kid` whose key is for another algorithm.
    NoMatchingKey,
    /// `jwks_url` is the only source for this token and has never been
    /// fetched successfully.
    KeyUnavailable,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    MissingExp,
    /// `exp` or `nbf` present but not a number.
    InvalidClaim,
}

impl TokenError {
    /// A short phrase for the security log's `detail`.
    pub fn detail(&self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed token",
            TokenError::TooLarge => "token too large",
            TokenError::AlgorithmNotAllowed => "algorithm not allowed",
            TokenError::UnknownKid => "unknown kid",
            TokenError::NoMatchingKey => "no key for token",
            TokenError::KeyUnavailable => "signing keys unavailable",
            TokenError::BadSignature => "bad signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not yet valid",
            TokenError::WrongIssuer => "wrong issuer",
            TokenError::WrongAudience => "wrong audience",
            TokenError::MissingExp => "missing exp",
            TokenError::InvalidClaim => "invalid claim",
        }
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.detail())
    }
}

impl std::error::Error for TokenError {}

fn map_jwt_error(e: &jsonwebtoken::errors::Error) -> TokenError {
    match e.kind() {
        JwtErrorKind::InvalidSignature => TokenError::BadSignature,
        JwtErrorKind::ExpiredSignature => TokenError::Expired,
        JwtErrorKind::ImmatureSignature => TokenError::NotYetValid,
        JwtErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        JwtErrorKind::InvalidAudience => TokenError::WrongAudience,
        JwtErrorKind::MissingRequiredClaim(c) => match c.as_str() {
            "exp" => TokenError::MissingExp,
            "iss" => TokenError::WrongIssuer,
            "aud" => TokenError::WrongAudience,
            _ => TokenError::InvalidClaim,
        },
        JwtErrorKind::InvalidClaimFormat(_) => TokenError::InvalidClaim,
        JwtErrorKind::InvalidAlgorithm | JwtErrorKind::MissingAlgorithm => {
            TokenError::AlgorithmNotAllowed
        }
        JwtErrorKind::InvalidToken
        | JwtErrorKind::Base64(_)
        | JwtErrorKind::Json(_)
        | JwtErrorKind::Utf8(_) => TokenError::Malformed,
        // Key-format errors cannot come from a token (keys are checked at
        // load and chosen by family); count them as an unusable key.
        _ => TokenError::KeyUnavailable,
    }
}

/// The JOSE header fields we look at. Unknown fields are ignored; a
/// duplicated field is an error (serde), which keeps us and jsonwebtoken
/// from reading different `alg`s out of one header.
#[derive(Deserialize)]
struct RawHeader<'a> {
    #[serde(borrow)]
    alg: Cow<'a, str>,
    #[serde(borrow, default)]
    kid: Option<Cow<'a, str>>,
    /// RFC 7515 §4.1.11: we understand no extension, so any `crit` means the
    /// token must be refused.
    #[serde(default)]
    crit: Option<serde::de::IgnoredAny>,
}

/// What the first pass over a token found, before any key is touched.
enum KeyChoice<'k> {
    Key(&'k DecodingKey),
    /// `kid` not in any set yet; with `jwks_url`, worth one refetch.
    KidNotFound(String),
}

/// A token that passed signature and claim checks.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    /// Shared: a token verified once is handed out again from the cache.
    pub claims: Arc<Map<String, Value>>,
}

impl VerifiedToken {
    /// The `sub` claim, when it is a string.
    pub fn subject(&self) -> Option<&str> {
        self.claims.get("sub").and_then(Value::as_str)
    }

    /// The granted scopes: the `scope` claim (a space-separated string, or
    /// an array) and the `scp` claim (an array or a string), flattened.
    pub fn scopes(&self) -> Vec<&str> {
        let mut out = Vec::new();
        for name in ["scope", "scp"] {
            match self.claims.get(name) {
                Some(Value::String(s)) => out.extend(s.split(' ').filter(|s| !s.is_empty())),
                Some(Value::Array(items)) => {
                    out.extend(items.iter().filter_map(Value::as_str));
                }
                _ => {}
            }
        }
        out
    }

    /// A claim rendered as a header value: strings as-is, arrays of strings
    /// joined by `' '`, numbers and booleans as JSON text. `None` when the
    /// claim is absent, null, an object, an array holding a non-string, or
    /// when the text has a control character or leading/trailing whitespace
    /// (which an upstream would trim, changing the identity it sees). The
    /// result may hold non-ASCII UTF-8: build the header with
    /// `HeaderValue::try_from(String)`, which accepts it.
    pub fn claim_as_header_value(&self, name: &str) -> Option<String> {
        let text = match self.claims.get(name)? {
            Value::String(s) => s.clone(),
            Value::Array(items) => {
                let parts: Option<Vec<&str>> = items.iter().map(Value::as_str).collect();
                parts?.join(" ")
            }
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Null | Value::Object(_) => return None,
        };
        let clean = !text.chars().any(char::is_control)
            && !text.starts_with([' ', '\t'])
            && !text.ends_with([' ', '\t']);
        clean.then_some(text)
    }
}

/// Verifies tokens against the configured keys and claims. `Send + Sync`;
/// share it through an `Arc` across threads and tokio runtimes.
pub struct JwtVerifier {
    /// Listed algorithms, in the order written.
    order: Vec<Algorithm>,
    allowed: AlgSet,
    /// One [`Validation`] per listed algorithm (jsonwebtoken requires every
    /// algorithm of a `Validation` to share the key's family).
    validations: [Option<Validation>; 12],
    issuer: Option<String>,
    hmac: Option<DecodingKey>,
    /// Where the HS* secret came from, for [`JwtVerifier::summary`].
    secret_env: Option<String>,
    public_key: Option<VerifyKey>,
    file_keys: KeySet,
    remote: Option<Arc<Remote>>,
    task: StdMutex<Option<tokio::task::AbortHandle>>,
    /// Tells this verifier's entries in the per-thread cache from those of
    /// the verifier a reload replaced.
    id: u64,
    leeway_secs: u64,
}

/// How long a verified token is served from the cache before it is verified
/// again: bounds how long a key removed from a JWKS is still honoured.
const VERIFIED_CACHE_TTL: Duration = Duration::from_secs(60);
/// Tokens cached per worker thread; a full cache is emptied, not scanned.
const VERIFIED_CACHE_ENTRIES: usize = 4096;

struct CachedToken {
    token: VerifiedToken,
    exp: u64,
    verified_at: Instant,
    /// The fetched key set at verification time: a refresh that replaces it
    /// (a key rotated out) makes the entry stale at once.
    remote_keys: Option<Arc<KeySet>>,
}

#[derive(Default)]
struct VerifiedCache {
    verifier: u64,
    entries: std::collections::HashMap<Box<str>, CachedToken>,
}

thread_local! {
    /// Tokens this worker thread verified lately. A client sends the same
    /// token with every request until it expires, and verifying it again
    /// (jsonwebtoken parses the header three times and the claims twice,
    /// and sets the key up per call) cost more than the rest of a protected
    /// route's work. Envoy's jwt_authn keeps the same kind of cache. Only
    /// successes are cached, keyed by the whole token; a hit checks `exp`
    /// against the clock again; an entry lives at most
    /// [`VERIFIED_CACHE_TTL`]. Per thread, so a lookup takes no lock.
    static VERIFIED: std::cell::RefCell<VerifiedCache> = std::cell::RefCell::default();
}

static NEXT_VERIFIER_ID: AtomicU64 = AtomicU64::new(1);

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("summary", &self.summary())
            .finish_non_exhaustive()
    }
}

impl Drop for JwtVerifier {
    fn drop(&mut self) {
        // A reload replaces the verifier: its refresh task must not outlive it.
        if let Ok(mut task) = self.task.lock()
            && let Some(handle) = task.take()
        {
            handle.abort();
        }
    }
}

impl JwtVerifier {
    /// Decodes every key now. Rules: `"none"` can never be listed; unknown
    /// names and ES512 are rejected; an HS* algorithm needs the secret (a
    /// missing variable is named; a secret shorter than the hash output — 32,
    /// 48, 64 bytes for HS256/384/512 — is refused); an asymmetric algorithm
    /// needs `public_key`, `jwks` or `jwks_url`; HS* and asymmetric
    /// algorithms may be mixed only when both kinds of key are configured;
    /// `public_key`, `jwks` or `jwks_url` with no asymmetric algorithm
    /// listed, a public key that fits no listed algorithm, a `jwks` file with
    /// no usable key, and an `https://` `jwks_url` are errors. An unused
    /// `secret_env` is ignored (it has a default).
    pub fn new(settings: JwtSettings) -> Result<Self, JwtConfigError> {
        Self::with_options(settings, VerifierOptions::default())
    }

    /// [`JwtVerifier::new`] with explicit [`VerifierOptions`].
    pub fn with_options(
        settings: JwtSettings,
        options: VerifierOptions,
    ) -> Result<Self, JwtConfigError> {
        let order = parse_algorithms(&settings.algorithms)?;
        let allowed = order
            .iter()
            .fold(AlgSet::default(), |s, a| s.or(AlgSet::of(*a)));
        let hmac_algs: Vec<Algorithm> = order
            .iter()
            .copied()
            .filter(|a| a.family() == AlgorithmFamily::Hmac)
            .collect();
        let asym_listed = order.iter().any(|a| a.family() != AlgorithmFamily::Hmac);

        let hmac = if let Some(&first) = hmac_algs.first() {
            let env = settings.secret_env.as_deref();
            let secret = match (&settings.secret, env) {
                (Some(s), _) if !s.is_empty() => s,
                (Some(_), Some(var)) => {
                    return Err(config_err(
                        "secret_env",
                        format!(
                            "environment variable {var} is empty; {} needs the shared secret",
                            alg_name(first)
                        ),
                    ));
                }
                (None, Some(var)) => {
                    return Err(config_err(
                        "secret_env",
                        format!(
                            "environment variable {var} is not set; {} needs the shared secret",
                            alg_name(first)
                        ),
                    ));
                }
                (_, None) => {
                    return Err(config_err(
                        "secret_env",
                        format!(
                            "{} is listed in algorithms but no secret_env names the variable holding the secret",
                            alg_name(first)
                        ),
                    ));
                }
            };
            let strictest = hmac_algs
                .iter()
                .copied()
                .max_by_key(|a| min_hmac_secret(*a))
                .unwrap_or(first);
            let need = min_hmac_secret(strictest);
            if secret.len() < need {
                return Err(config_err(
                    "secret_env",
                    format!(
                        "the secret in {} is {} bytes; {} needs at least {need} (its hash output size)",
                        env.unwrap_or("the environment"),
                        secret.len(),
                        alg_name(strictest)
                    ),
                ));
            }
            Some(DecodingKey::from_secret(secret))
        } else {
            None
        };

        let any_public = settings.public_key_pem.is_some()
            || settings.jwks_json.is_some()
            || settings.jwks_url.is_some();
        if asym_listed && !any_public {
            let names = allowed.and(AlgSet(!AlgSet::HMAC.0)).names();
            return Err(config_err(
                "algorithms",
                format!("{names} need a public_key, jwks or jwks_url"),
            ));
        }
        if !asym_listed && any_public {
            let key = if settings.public_key_pem.is_some() {
                "public_key"
            } else if settings.jwks_json.is_some() {
                "jwks"
            } else {
                "jwks_url"
            };
            return Err(config_err(
                key,
                "is set but algorithms lists no RS*, PS*, ES* or EdDSA algorithm to use it with",
            ));
        }

        let public_key = settings
            .public_key_pem
            .as_deref()
            .map(|pem| decode_public_key(pem, allowed))
            .transpose()?;

        let file_keys = match settings.jwks_json.as_deref() {
            Some(json) => {
                let set =
                    decode_jwks(json, allowed, "jwks file").map_err(|e| config_err("jwks", e))?;
                if set.keys.is_empty() {
                    return Err(config_err(
                        "jwks",
                        format!(
                            "holds no key usable with the listed algorithms ({}); \
                             keys with \"use\": \"enc\", another \"alg\", or an unsupported type are skipped",
                            allowed.and(AlgSet(!AlgSet::HMAC.0)).names()
                        ),
                    ));
                }
                set
            }
            None => KeySet::default(),
        };

        let remote = match settings.jwks_url.as_deref() {
            Some(text) => {
                let url = parse_jwks_url(text)?;
                if settings.jwks_refresh < Duration::from_secs(1) {
                    return Err(config_err("jwks_refresh", "must be at least 1s"));
                }
                Some(Arc::new(Remote {
                    url,
                    allowed,
                    refresh: settings.jwks_refresh,
                    min_refetch_interval: options.min_refetch_interval,
                    fetch_timeout: options.fetch_timeout,
                    max_bytes: options.max_jwks_bytes,
                    keys: ArcSwap::from_pointee(KeySet::default()),
                    loaded: AtomicBool::new(false),
                    fetch: Arc::new(tokio::sync::Mutex::new(FetchState::default())),
                }))
            }
            None => None,
        };

        // Leeway is for clock skew; an hour already defeats most of `exp`.
        // (Also keeps jsonwebtoken's `now - leeway` far from underflow.)
        if settings.leeway > MAX_LEEWAY {
            return Err(config_err("leeway", "must be at most 1h"));
        }
        let leeway = settings.leeway.as_secs();
        let validations = std::array::from_fn(|i| {
            allowed.has(i).then(|| {
                let mut v = Validation::new(ALGS[i]);
                v.leeway = leeway;
                v.validate_exp = true;
                // jsonwebtoken leaves nbf unchecked by default.
                v.validate_nbf = true;
                let mut required = vec!["exp"];
                if let Some(iss) = &settings.issuer {
                    v.set_issuer(&[iss]);
                    required.push("iss");
                }
                match &settings.audience {
                    Some(aud) => {
                        v.set_audience(&[aud]);
                        required.push("aud");
                    }
                    // Without a configured audience jsonwebtoken would refuse
                    // every token that carries an `aud`; we ignore it instead.
                    None => v.validate_aud = false,
                }
                v.set_required_spec_claims(&required);
                v
            })
        });

        Ok(JwtVerifier {
            order,
            allowed,
            validations,
            issuer: settings.issuer,
            hmac,
            secret_env: settings.secret_env,
            public_key,
            file_keys,
            remote,
            task: StdMutex::new(None),
            id: NEXT_VERIFIER_ID.fetch_add(1, Ordering::Relaxed),
            leeway_secs: leeway,
        })
    }

    /// With `jwks_url`: spawns, on the current tokio runtime, the task that
    /// fetches the key set now and then every `jwks_refresh`. Not awaited and
    /// never fatal: a failed start fetch is logged and retried (backing off
    /// from 1 s to at most a minute until one succeeds); meanwhile tokens
    /// that need those keys are refused with [`TokenError::KeyUnavailable`],
    /// and requests that arrive during the start fetch wait for it. The task
    /// ends when the verifier is dropped. Harmless without `jwks_url`, when
    /// called twice, or outside a runtime (logged, nothing spawned).
    pub fn start_background(self: &Arc<Self>) {
        let Some(remote) = &self.remote else { return };
        let Ok(mut task) = self.task.lock() else {
            return;
        };
        if task.is_some() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(
                "jwks_url: start_background called outside a tokio runtime; keys will not be fetched"
            );
            return;
        };
        // Taken here, synchronously, so that the start fetch holds it before
        // any request can run the unknown-kid path. (If an unknown-kid fetch
        // already holds it, the task waits for that one first.)
        let start = remote.fetch.clone().try_lock_owned().ok();
        let weak = Arc::downgrade(remote);
        let refresh = remote.refresh;
        let handle = runtime.spawn(Remote::run(weak, start, refresh));
        *task = Some(handle.abort_handle());
    }

    /// Verifies signature and claims: `exp` required, `nbf` honoured, the
    /// configured leeway, `iss`/`aud` when configured (`aud` a string or an
    /// array containing ours). The header's `alg` must be listed before any
    /// key is touched. With `jwks_url`, a `kid` not in the current set
    /// triggers a refetch (at most once per `min_refetch_interval`;
    /// concurrent callers share it), which is awaited before one retry.
    pub async fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        if let Some(hit) = self.cached(token) {
            return Ok(hit);
        }
        // Taken before verifying: if a refresh replaces the set meanwhile,
        // the entry is stale from the start.
        let remote_keys = self.remote.as_ref().map(|r| r.keys.load_full());
        let verified = self.verify_uncached(token).await?;
        self.remember(token, &verified, remote_keys);
        Ok(verified)
    }

    /// A token this thread verified within the last minute and that has not
    /// expired since.
    fn cached(&self, token: &str) -> Option<VerifiedToken> {
        VERIFIED.with_borrow_mut(|cache| {
            if cache.verifier != self.id {
                return None;
            }
            let entry = cache.entries.get(token)?;
            let same_keys = match (&self.remote, &entry.remote_keys) {
                (Some(remote), Some(keys)) => Arc::ptr_eq(&remote.keys.load(), keys),
                (None, None) => true,
                _ => false,
            };
            let fresh = same_keys
                && entry.verified_at.elapsed() < VERIFIED_CACHE_TTL
                && entry.exp.saturating_add(self.leeway_secs)
                    >= jsonwebtoken::get_current_timestamp();
            if fresh {
                return Some(entry.token.clone());
            }
            cache.entries.remove(token);
            None
        })
    }

    fn remember(&self, token: &str, verified: &VerifiedToken, remote_keys: Option<Arc<KeySet>>) {
        // Verified tokens always carry an integer `exp` (it is required).
        let Some(exp) = verified.claims.get("exp").and_then(Value::as_u64) else {
            return;
        };
        VERIFIED.with_borrow_mut(|cache| {
            if cache.verifier != self.id || cache.entries.len() >= VERIFIED_CACHE_ENTRIES {
                cache.entries.clear();
                cache.verifier = self.id;
            }
            cache.entries.insert(
                token.into(),
                CachedToken {
                    token: verified.clone(),
                    exp,
                    verified_at: Instant::now(),
                    remote_keys,
                },
            );
        });
    }

    async fn verify_uncached(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        match self.verify_pass(token, false) {
            Err(KidNotFound(kid)) => {
                if let Some(remote) = &self.remote {
                    // Boxed: rare, and its state would otherwise enlarge
                    // every request's future on a JWT route.
                    Box::pin(remote.refetch_for_kid(&kid)).await;
                }
                match self.verify_pass(token, true) {
                    Ok(v) => Ok(v),
                    Err(Final(e)) => Err(e),
                    Err(KidNotFound(_)) => Err(self.kid_not_found_error()),
                }
            }
            Ok(v) => Ok(v),
            Err(Final(e)) => Err(e),
        }
    }

    /// One verification pass. `retried`: the refetch (if any) has been
    /// done, so a missing `kid` may now fall back to `public_key` or fail.
    fn verify_pass(&self, token: &str, retried: bool) -> Result<VerifiedToken, Pass> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Final(TokenError::TooLarge));
        }
        let mut dots = token.bytes().enumerate().filter(|(_, b)| *b == b'.');
        let (Some((first_dot, _)), Some(_), None) = (dots.next(), dots.next(), dots.next()) else {
            return Err(Final(TokenError::Malformed));
        };
        let encoded_header = &token.as_bytes()[..first_dot];

        // Decode the header into a stack buffer: headers are small, and this
        // runs for every request on a protected route.
        let mut buf = [0u8; 1024];
        let heap;
        let header_json: &[u8] = match URL_SAFE_NO_PAD.decode_slice(encoded_header, &mut buf) {
            Ok(n) => &buf[..n],
            Err(base64::DecodeSliceError::OutputSliceTooSmall) => {
                heap = URL_SAFE_NO_PAD
                    .decode(encoded_header)
                    .map_err(|_| Final(TokenError::Malformed))?;
                &heap
            }
            Err(_) => return Err(Final(TokenError::Malformed)),
        };
        let header: RawHeader<'_> =
            serde_json::from_slice(header_json).map_err(|_| Final(TokenError::Malformed))?;
        if header.crit.is_some() {
            return Err(Final(TokenError::Malformed));
        }
        let Some((alg_i, alg)) = alg_from_name(&header.alg) else {
            return Err(Final(TokenError::AlgorithmNotAllowed));
        };
        if !self.allowed.has(alg_i) {
            return Err(Final(TokenError::AlgorithmNotAllowed));
        }
        let Some(validation) = &self.validations[alg_i] else {
            return Err(Final(TokenError::AlgorithmNotAllowed));
        };

        // Only now look at keys. The remote set is loaded (lock-free) only
        // for asymmetric tokens; its guard lives until this function returns,
        // never across an await.
        let is_hmac = alg.family() == AlgorithmFamily::Hmac;
        let remote_keys = match &self.remote {
            Some(r) if !is_hmac => Some(r.keys.load()),
            _ => None,
        };
        let remote_set: Option<&KeySet> = remote_keys.as_deref().map(|a| &**a);
        let choice = if is_hmac {
            // HS* only ever with the configured secret.
            match &self.hmac {
                Some(k) => KeyChoice::Key(k),
                None => return Err(Final(TokenError::AlgorithmNotAllowed)),
            }
        } else {
            self.choose_public_key(alg_i, header.kid.as_deref(), remote_set, retried)
                .map_err(Final)?
        };
        let key = match choice {
            KeyChoice::Key(k) => k,
            KeyChoice::KidNotFound(kid) => return Err(KidNotFound(kid)),
        };

        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, validation)
            .map_err(|e| Final(map_jwt_error(&e)))?;
        // jsonwebtoken also accepts an array `iss` with ours in it; the
        // issuer must be exactly the configured string.
        if let Some(iss) = &self.issuer
            && data.claims.get("iss").and_then(Value::as_str) != Some(iss.as_str())
        {
            return Err(Final(TokenError::WrongIssuer));
        }
        Ok(VerifiedToken {
            claims: Arc::new(data.claims),
        })
    }

    /// Picks the public key for an asymmetric token.
    fn choose_public_key<'k>(
        &'k self,
        alg_i: usize,
        kid: Option<&str>,
        remote: Option<&'k KeySet>,
        retried: bool,
    ) -> Result<KeyChoice<'k>, TokenError> {
        let pem_fits = self
            .public_key
            .as_ref()
            .filter(|k| k.algs.has(alg_i))
            .map(|k| &k.key);
        match kid {
            Some(kid) => {
                let mut wrong_alg = false;
                for set in std::iter::once(&self.file_keys).chain(remote) {
                    match set.by_kid(kid, alg_i) {
                        Lookup::Found(k) => return Ok(KeyChoice::Key(k)),
                        Lookup::KidWrongAlg => wrong_alg = true,
                        Lookup::NotFound => {}
                    }
                }
                if wrong_alg {
                    return Err(TokenError::NoMatchingKey);
                }
                if self.remote.is_some() && !retried {
                    return Ok(KeyChoice::KidNotFound(kid.to_string()));
                }
                // The PEM key has no kid: it is the key for tokens whose kid
                // no key set knows.
                match pem_fits {
                    Some(k) => Ok(KeyChoice::Key(k)),
                    None => Err(self.kid_not_found_error()),
                }
            }
            None => {
                if let Some(k) = pem_fits {
                    return Ok(KeyChoice::Key(k));
                }
                // Without a kid, a key set is only usable when exactly one
                // of its keys fits: never try keys one after another.
                let mut fitting = self
                    .file_keys
                    .fitting(alg_i)
                    .chain(remote.into_iter().flat_map(|s| s.fitting(alg_i)));
                match (fitting.next(), fitting.next()) {
                    (Some(k), None) => Ok(KeyChoice::Key(k)),
                    (Some(_), Some(_)) => Err(TokenError::NoMatchingKey),
                    (None, _) => Err(if self.remote_unloaded() {
                        TokenError::KeyUnavailable
                    } else {
                        TokenError::NoMatchingKey
                    }),
                }
            }
        }
    }

    fn remote_unloaded(&self) -> bool {
        self.remote
            .as_ref()
            .is_some_and(|r| !r.loaded.load(Ordering::Acquire))
    }

    fn kid_not_found_error(&self) -> TokenError {
        if self.remote_unloaded() {
            TokenError::KeyUnavailable
        } else {
            TokenError::UnknownKid
        }
    }

    /// One line describing what this verifier accepts, for `portcullis
    /// check` and logs. Holds no secret.
    pub fn summary(&self) -> String {
        let mut parts = vec![format!(
            "algorithms {}",
            self.order
                .iter()
                .map(|a| alg_name(*a))
                .collect::<Vec<_>>()
                .join(", ")
        )];
        if self.hmac.is_some() {
            parts.push(format!(
                "HS* secret from {}",
                self.secret_env.as_deref().unwrap_or("settings")
            ));
        }
        if let Some(k) = &self.public_key {
            parts.push(format!("public_key for {}", k.algs.names()));
        }
        if !self.file_keys.keys.is_empty() {
            parts.push(format!(
                "jwks file with {} key(s)",
                self.file_keys.keys.len()
            ));
        }
        if let Some(r) = &self.remote {
            parts.push(format!("jwks_url {} every {:?}", r.url.text, r.refresh));
        }
        parts.join("; ")
    }
}

/// Internal result of one pass: final, or "unknown kid, refetch may help".
enum Pass {
    Final(TokenError),
    KidNotFound(String),
}
use Pass::{Final, KidNotFound};

// ---------------------------------------------------------------------------
// Token extraction
// ---------------------------------------------------------------------------

/// Where a request's token is, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource<'a> {
    Found(&'a str),
    /// No `Authorization` header and no `token_cookie` cookie (a token in
    /// another cookie counts as none; so does an empty `token_cookie`).
    Missing,
    /// An `Authorization` header that is not a usable Bearer credential: another
    /// scheme, `Bearer` with nothing after it, several `Authorization`
    /// headers, a non-UTF-8 value, or a `token_cookie` that is not UTF-8.
    Invalid,
}

/// Finds the token: `Authorization: Bearer` first (scheme case-insensitive),
/// then the `token_cookie` cookie across every `Cookie` header. Pure.
pub fn extract_token<'a>(headers: &'a HeaderMap, token_cookie: Option<&str>) -> TokenSource<'a> {
    let mut auth = headers.get_all(AUTHORIZATION).iter();
    if let Some(value) = auth.next() {
        if auth.next().is_some() {
            // Two credentials: which one an upstream or another proxy would
            // pick is anyone's guess, so accept neither.
            return TokenSource::Invalid;
        }
        return bearer_token(value);
    }
    match token_cookie {
        Some(name) => cookie_token(headers, name),
        None => TokenSource::Missing,
    }
}

fn bearer_token(value: &HeaderValue) -> TokenSource<'_> {
    let Ok(text) = value.to_str() else {
        return TokenSource::Invalid;
    };
    let text = text.trim_matches([' ', '\t']);
    let Some((scheme, rest)) = text.split_once([' ', '\t']) else {
        return TokenSource::Invalid;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return TokenSource::Invalid;
    }
    let token = rest.trim_start_matches([' ', '\t']);
    if token.is_empty() || token.contains([' ', '\t']) {
        return TokenSource::Invalid;
    }
    TokenSource::Found(token)
}

fn cookie_token<'a>(headers: &'a HeaderMap, name: &str) -> TokenSource<'a> {
    for value in headers.get_all(COOKIE) {
        for pair in value.as_bytes().split(|b| *b == b';') {
            let Some(eq) = pair.iter().position(|b| *b == b'=') else {
                continue;
            };
            if pair[..eq].trim_ascii() != name.as_bytes() {
                continue;
            }
            let mut v = pair[eq + 1..].trim_ascii();
            if v.len() >= 2 && v.starts_with(b"\"") && v.ends_with(b"\"") {
                v = &v[1..v.len() - 1];
            }
            if v.is_empty() {
                // A cleared cookie (logout) is no token, not a bad one.
                return TokenSource::Missing;
            }
            return match std::str::from_utf8(v) {
                Ok(s) => TokenSource::Found(s),
                Err(_) => TokenSource::Invalid,
            };
        }
    }
    TokenSource::Missing
}

// ---------------------------------------------------------------------------
// Minting
// ---------------------------------------------------------------------------

/// What `portcullis token` asks for.
#[derive(Debug, Clone)]
pub struct MintRequest {
    pub subject: String,
    /// Space-separated, put in the `scope` claim.
    pub scope: Option<String>,
    pub ttl: Duration,
    /// Added last, so they can override anything (e.g. `exp`, to test an
    /// expired token).
    pub extra_claims: Vec<(String, Value)>,
    /// Default: the settings' `issuer`.
    pub issuer: Option<String>,
    /// Default: the settings' `audience`.
    pub audience: Option<String>,
}

/// Mints a token the configured verifier accepts: with no private key, an
/// HS* token from `settings.secret`, using the first listed HS* algorithm;
/// with `private_key_pem` (PKCS#8, or PKCS#1 for RSA), the first listed
/// asymmetric algorithm that key can sign. With a private key, the header's
/// `kid` is that of the matching key in the `jwks` file, if there is one.
pub fn mint(
    settings: &JwtSettings,
    private_key_pem: Option<&[u8]>,
    req: &MintRequest,
) -> Result<String, JwtConfigError> {
    mint_with_kid(settings, private_key_pem, req, None)
}

/// [`mint`] with an explicit header `kid` (e.g. for a `jwks_url` key set,
/// which `mint` cannot look into).
pub fn mint_with_kid(
    settings: &JwtSettings,
    private_key_pem: Option<&[u8]>,
    req: &MintRequest,
    kid: Option<&str>,
) -> Result<String, JwtConfigError> {
    let order = parse_algorithms(&settings.algorithms)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut claims = Map::new();
    claims.insert("sub".into(), Value::from(req.subject.as_str()));
    claims.insert("iat".into(), Value::from(now));
    claims.insert(
        "exp".into(),
        Value::from(now.saturating_add(req.ttl.as_secs())),
    );
    if let Some(scope) = &req.scope {
        claims.insert("scope".into(), Value::from(scope.as_str()));
    }
    if let Some(iss) = req.issuer.as_ref().or(settings.issuer.as_ref()) {
        claims.insert("iss".into(), Value::from(iss.as_str()));
    }
    if let Some(aud) = req.audience.as_ref().or(settings.audience.as_ref()) {
        claims.insert("aud".into(), Value::from(aud.as_str()));
    }
    for (k, v) in &req.extra_claims {
        claims.insert(k.clone(), v.clone());
    }

    let Some(pem) = private_key_pem else {
        let Some(&alg) = order.iter().find(|a| a.family() == AlgorithmFamily::Hmac) else {
            return Err(config_err(
                "key",
                "algorithms lists no HS* algorithm; give the private key (--key) for the listed ones",
            ));
        };
        let var = settings.secret_env.as_deref().unwrap_or("secret_env");
        let secret = match &settings.secret {
            Some(s) if !s.is_empty() => s,
            _ => {
                return Err(config_err(
                    "secret_env",
                    format!(
                        "environment variable {var} is not set; {} needs the shared secret",
                        alg_name(alg)
                    ),
                ));
            }
        };
        if secret.len() < min_hmac_secret(alg) {
            return Err(config_err(
                "secret_env",
                format!(
                    "the secret in {var} is {} bytes; {} needs at least {}",
                    secret.len(),
                    alg_name(alg),
                    min_hmac_secret(alg)
                ),
            ));
        }
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        return jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret))
            .map_err(|e| config_err("secret_env", format!("signing failed: {e}")));
    };

    if pem_label(pem).is_some_and(|l| !l.contains("PRIVATE")) {
        return Err(config_err(
            "key",
            "is not a private key (expected a PEM block labelled PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)",
        ));
    }
    let mut tried = Vec::new();
    for &alg in order.iter().filter(|a| a.family() != AlgorithmFamily::Hmac) {
        let key = match alg.family() {
            AlgorithmFamily::Rsa => EncodingKey::from_rsa_pem(pem),
            AlgorithmFamily::Ec => EncodingKey::from_ec_pem(pem),
            _ => EncodingKey::from_ed_pem(pem),
        };
        let Ok(key) = key else {
            tried.push(alg_name(alg));
            continue;
        };
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string).or_else(|| {
            settings
                .jwks_json
                .as_deref()
                .and_then(|j| kid_for_private_key(j, &key, alg))
        });
        // Signing is the real test of fit (an EC key on the wrong curve for
        // ES256 fails here), so a failure just moves on to the next alg.
        match jsonwebtoken::encode(&header, &claims, &key) {
            Ok(token) => return Ok(token),
            Err(_) => tried.push(alg_name(alg)),
        }
    }
    Err(config_err(
        "key",
        if tried.is_empty() {
            "algorithms lists no RS*, PS*, ES* or EdDSA algorithm for a private key".to_string()
        } else {
            format!(
                "the private key cannot sign any listed algorithm (tried {})",
                tried.join(", ")
            )
        },
    ))
}

/// The `kid` of the JWK in `jwks_json` whose public key matches `key`.
fn kid_for_private_key(jwks_json: &[u8], key: &EncodingKey, alg: Algorithm) -> Option<String> {
    let ours = Jwk::from_encoding_key(key, alg).ok()?.algorithm;
    let raw: RawJwks = serde_json::from_slice(jwks_json).ok()?;
    raw.keys.into_iter().find_map(|v| {
        let jwk: Jwk = serde_json::from_value(v).ok()?;
        same_public_key(&ours, &jwk.algorithm)
            .then_some(jwk.common.key_id)
            .flatten()
    })
}

/// Compares public key material by value (base64url spellings of integers
/// may differ in leading zeros).
fn same_public_key(a: &AlgorithmParameters, b: &AlgorithmParameters) -> bool {
    let int = |s: &str| -> Option<Vec<u8>> {
        let v = URL_SAFE_NO_PAD.decode(s).ok()?;
        Some(v.into_iter().skip_while(|b| *b == 0).collect())
    };
    let eq = |x: &str, y: &str| matches!((int(x), int(y)), (Some(p), Some(q)) if p == q);
    match (a, b) {
        (AlgorithmParameters::RSA(p), AlgorithmParameters::RSA(q)) => {
            eq(&p.n, &q.n) && eq(&p.e, &q.e)
        }
        (AlgorithmParameters::EllipticCurve(p), AlgorithmParameters::EllipticCurve(q)) => {
            p.curve == q.curve && eq(&p.x, &q.x) && eq(&p.y, &q.y)
        }
        (AlgorithmParameters::OctetKeyPair(p), AlgorithmParameters::OctetKeyPair(q)) => {
            p.curve == q.curve && eq(&p.x, &q.x)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef"; // 32 bytes

    fn now() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn claims() -> Value {
        serde_json::json!({ "sub": "alice", "exp": now() + 300, "scope": "read write" })
    }

    fn hs_settings() -> JwtSettings {
        JwtSettings {
            secret: Some(SECRET.to_vec()),
            ..JwtSettings::default()
        }
    }

    fn settings(algs: &[&str]) -> JwtSettings {
        JwtSettings {
            algorithms: algs.iter().map(|s| s.to_string()).collect(),
            secret: None,
            ..JwtSettings::default()
        }
    }

    fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&h, claims, key).unwrap()
    }

    fn hs(claims: &Value) -> String {
        sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET),
            None,
            claims,
        )
    }

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    struct TestKey {
        alg: Algorithm,
        enc: EncodingKey,
        public_pem: String,
        private_pem: String,
    }

    impl TestKey {
        fn generate(rc: &'static rcgen::SignatureAlgorithm, alg: Algorithm) -> TestKey {
            let kp = rcgen::KeyPair::generate_for(rc).unwrap();
            let private_pem = kp.serialize_pem();
            let enc = match alg.family() {
                AlgorithmFamily::Rsa => EncodingKey::from_rsa_pem(private_pem.as_bytes()),
                AlgorithmFamily::Ec => EncodingKey::from_ec_pem(private_pem.as_bytes()),
                _ => EncodingKey::from_ed_pem(private_pem.as_bytes()),
            }
            .unwrap();
            TestKey {
                alg,
                enc,
                public_pem: kp.public_key_pem(),
                private_pem,
            }
        }

        fn decoding(&self) -> DecodingKey {
            let pem = self.public_pem.as_bytes();
            match self.alg.family() {
                AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(pem),
                AlgorithmFamily::Ec => DecodingKey::from_ec_pem(pem),
                _ => DecodingKey::from_ed_pem(pem),
            }
            .unwrap()
        }

        /// The public JWK, with `alg` set and the given `kid`.
        fn jwk(&self, kid: &str) -> Value {
            let mut jwk = Jwk::from_decoding_key(&self.decoding(), Some(self.alg)).unwrap();
            jwk.common.key_id = Some(kid.to_string());
            serde_json::to_value(jwk).unwrap()
        }

        fn token(&self, kid: Option<&str>, claims: &Value) -> String {
            sign(self.alg, &self.enc, kid, claims)
        }
    }

    macro_rules! test_key {
        ($name:ident, $rc:expr, $alg:expr) => {
            fn $name() -> &'static TestKey {
                static K: OnceLock<TestKey> = OnceLock::new();
                K.get_or_init(|| TestKey::generate($rc, $alg))
            }
        };
    }
    test_key!(rsa, &rcgen::PKCS_RSA_SHA256, Algorithm::RS256);
    test_key!(ec_a, &rcgen::PKCS_ECDSA_P256_SHA256, Algorithm::ES256);
    test_key!(ec_b, &rcgen::PKCS_ECDSA_P256_SHA256, Algorithm::ES256);
    test_key!(ec_c, &rcgen::PKCS_ECDSA_P256_SHA256, Algorithm::ES256);
    test_key!(ec384, &rcgen::PKCS_ECDSA_P384_SHA384, Algorithm::ES384);
    test_key!(ed, &rcgen::PKCS_ED25519, Algorithm::EdDSA);

    fn jwks(keys: &[Value]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "keys": keys })).unwrap()
    }

    fn verifier(s: JwtSettings) -> JwtVerifier {
        JwtVerifier::new(s).unwrap()
    }

    fn config_error(s: JwtSettings) -> JwtConfigError {
        match JwtVerifier::new(s) {
            Ok(_) => panic!("expected a config error"),
            Err(e) => e,
        }
    }

    #[test]
    fn verifier_is_send_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<JwtVerifier>();
        check::<Arc<JwtVerifier>>();
    }

    // ----- accepted -------------------------------------------------------

    #[tokio::test]
    async fn hs256_valid() {
        let v = verifier(hs_settings());
        let t = v.verify(&hs(&claims())).await.unwrap();
        assert_eq!(t.subject(), Some("alice"));
        assert_eq!(t.scopes(), vec!["read", "write"]);
    }

    fn cached_entries_hold(token: &str) -> bool {
        VERIFIED.with_borrow(|c| c.entries.contains_key(token))
    }

    #[tokio::test]
    async fn a_verified_token_is_served_from_the_thread_cache() {
        let v = verifier(hs_settings());
        let t = hs(&claims());
        assert!(v.cached(&t).is_none());
        let first = v.verify(&t).await.unwrap();
        assert!(cached_entries_hold(&t));
        let hit = v.cached(&t).expect("cached");
        assert_eq!(hit, first);
        assert_eq!(v.verify(&t).await.unwrap(), first);
    }

    #[tokio::test]
    async fn the_cache_never_answers_for_a_different_token() {
        let v = verifier(hs_settings());
        let t = hs(&claims());
        v.verify(&t).await.unwrap();
        // Same header and claims, the signature's first character changed:
        // every bit of it is significant (the last character's low bits are
        // base64 padding, and changing only those is a decoding error).
        let signature_start = t.rfind('.').unwrap() + 1;
        let first = &t[signature_start..=signature_start];
        let replacement = if first == "A" { "B" } else { "A" };
        let mut tampered = t.clone();
        tampered.replace_range(signature_start..=signature_start, replacement);
        assert_eq!(v.verify(&tampered).await, Err(TokenError::BadSignature));
        assert!(!cached_entries_hold(&tampered));
    }

    #[tokio::test]
    async fn an_expired_or_old_cache_entry_is_verified_again() {
        let v = verifier(hs_settings());
        let t = hs(&claims());
        v.verify(&t).await.unwrap();
        // The token's `exp` passed while it sat in the cache.
        VERIFIED.with_borrow_mut(|c| c.entries.get_mut(t.as_str()).unwrap().exp = 1);
        assert!(v.cached(&t).is_none());
        assert!(!cached_entries_hold(&t), "a stale entry is dropped");
        // Verified longer ago than the cache's lifetime.
        v.verify(&t).await.unwrap();
        VERIFIED.with_borrow_mut(|c| {
            let entry = c.entries.get_mut(t.as_str()).unwrap();
            entry.verified_at = Instant::now()
                .checked_sub(VERIFIED_CACHE_TTL + Duration::from_secs(1))
                .unwrap();
        });
        assert!(v.cached(&t).is_none());
    }

    #[tokio::test]
    async fn a_reloaded_verifier_does_not_inherit_the_cache() {
        let old = verifier(hs_settings());
        let t = hs(&claims());
        old.verify(&t).await.unwrap();
        let new = verifier(hs_settings());
        assert!(new.cached(&t).is_none());
    }

    #[tokio::test]
    async fn rs256_via_public_key() {
        let mut s = settings(&["RS256"]);
        s.public_key_pem = Some(rsa().public_pem.clone().into_bytes());
        let v = verifier(s);
        assert!(v.verify(&rsa().token(None, &claims())).await.is_ok());
        // The PEM key has no kid: it also serves tokens whose kid no set knows.
        assert!(
            v.verify(&rsa().token(Some("whatever"), &claims()))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn ps256_and_rs384_with_one_rsa_key() {
        let mut s = settings(&["PS256", "RS384"]);
        s.public_key_pem = Some(rsa().public_pem.clone().into_bytes());
        let v = verifier(s);
        for alg in [Algorithm::PS256, Algorithm::RS384] {
            let t = sign(alg, &rsa().enc, None, &claims());
            assert!(v.verify(&t).await.is_ok(), "{alg:?}");
        }
        let rs256 = sign(Algorithm::RS256, &rsa().enc, None, &claims());
        assert_eq!(v.verify(&rs256).await, Err(TokenError::AlgorithmNotAllowed));
    }

    #[tokio::test]
    async fn es256_via_jwks_by_kid() {
        let mut s = settings(&["ES256"]);
        s.jwks_json = Some(jwks(&[ec_a().jwk("a"), ec_b().jwk("b")]));
        let v = verifier(s);
        assert!(v.verify(&ec_a().token(Some("a"), &claims())).await.is_ok());
        assert!(v.verify(&ec_b().token(Some("b"), &claims())).await.is_ok());
        // Right kid is what picks the key: a's token labelled b fails.
        assert_eq!(
            v.verify(&ec_a().token(Some("b"), &claims())).await,
            Err(TokenError::BadSignature)
        );
        // Two keys and no kid: ambiguous, and we never try keys in turn.
        assert_eq!(
            v.verify(&ec_a().token(None, &claims())).await,
            Err(TokenError::NoMatchingKey)
        );
    }

    #[tokio::test]
    async fn jwks_with_one_key_serves_tokens_without_kid() {
        let mut s = settings(&["ES256"]);
        s.jwks_json = Some(jwks(&[ec_a().jwk("a")]));
        let v = verifier(s);
        assert!(v.verify(&ec_a().token(None, &claims())).await.is_ok());
    }

    #[tokio::test]
    async fn es384_via_public_key() {
        let mut s = settings(&["ES384"]);
        s.public_key_pem = Some(ec384().public_pem.clone().into_bytes());
        let v = verifier(s);
        assert!(v.verify(&ec384().token(None, &claims())).await.is_ok());
    }

    #[tokio::test]
    async fn eddsa_via_public_key_and_jwks() {
        let mut s = settings(&["EdDSA"]);
        s.public_key_pem = Some(ed().public_pem.clone().into_bytes());
        assert!(
            verifier(s)
                .verify(&ed().token(None, &claims()))
                .await
                .is_ok()
        );

        let mut s = settings(&["EdDSA"]);
        s.jwks_json = Some(jwks(&[ed().jwk("ed")]));
        assert!(
            verifier(s)
                .verify(&ed().token(Some("ed"), &claims()))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn exp_within_leeway_accepted() {
        let v = verifier(hs_settings());
        let c = serde_json::json!({ "sub": "a", "exp": now() - 10 });
        assert!(v.verify(&hs(&c)).await.is_ok());
    }

    #[tokio::test]
    async fn mixed_hs_and_rs_with_both_keys() {
        let mut s = settings(&["HS256", "RS256"]);
        s.secret = Some(SECRET.to_vec());
        s.public_key_pem = Some(rsa().public_pem.clone().into_bytes());
        let v = verifier(s);
        assert!(v.verify(&hs(&claims())).await.is_ok());
        assert!(v.verify(&rsa().token(None, &claims())).await.is_ok());
        // An HS256 token "signed" with the RSA public key PEM: only the
        // configured secret is ever used for HS*.
        let forged = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(rsa().public_pem.as_bytes()),
            None,
            &claims(),
        );
        assert_eq!(v.verify(&forged).await, Err(TokenError::BadSignature));
    }

    #[tokio::test]
    async fn aud_string_or_array_containing_ours() {
        let mut s = hs_settings();
        s.audience = Some("orders-api".into());
        let v = verifier(s);
        for aud in [
            serde_json::json!("orders-api"),
            serde_json::json!(["x", "orders-api"]),
        ] {
            let c = serde_json::json!({ "exp": now() + 60, "aud": aud });
            assert!(v.verify(&hs(&c)).await.is_ok(), "{aud}");
        }
    }

    #[tokio::test]
    async fn aud_ignored_when_not_configured() {
        let v = verifier(hs_settings());
        let c = serde_json::json!({ "exp": now() + 60, "aud": "someone-else" });
        assert!(v.verify(&hs(&c)).await.is_ok());
    }

    // ----- rejected -------------------------------------------------------

    #[tokio::test]
    async fn expired_beyond_leeway() {
        let v = verifier(hs_settings());
        let c = serde_json::json!({ "sub": "a", "exp": now() - 60 });
        assert_eq!(v.verify(&hs(&c)).await, Err(TokenError::Expired));
    }

    #[tokio::test]
    async fn leeway_is_configurable() {
        let mut s = hs_settings();
        s.leeway = Duration::ZERO;
        let c = serde_json::json!({ "exp": now() - 10 });
        assert_eq!(verifier(s).verify(&hs(&c)).await, Err(TokenError::Expired));
    }

    #[tokio::test]
    async fn nbf_in_future() {
        let v = verifier(hs_settings());
        let c = serde_json::json!({ "exp": now() + 600, "nbf": now() + 120 });
        assert_eq!(v.verify(&hs(&c)).await, Err(TokenError::NotYetValid));
        // Within leeway is fine.
        let c = serde_json::json!({ "exp": now() + 600, "nbf": now() + 10 });
        assert!(v.verify(&hs(&c)).await.is_ok());
    }

    #[tokio::test]
    async fn missing_or_malformed_exp() {
        let v = verifier(hs_settings());
        let c = serde_json::json!({ "sub": "a" });
        assert_eq!(v.verify(&hs(&c)).await, Err(TokenError::MissingExp));
        let c = serde_json::json!({ "sub": "a", "exp": "tomorrow" });
        assert!(v.verify(&hs(&c)).await.is_err());
        let c = serde_json::json!({ "exp": now() + 60, "nbf": "soon" });
        assert_eq!(v.verify(&hs(&c)).await, Err(TokenError::InvalidClaim));
    }

    #[tokio::test]
    async fn wrong_missing_or_array_iss() {
        let mut s = hs_settings();
        s.issuer = Some("https://auth.example.com".into());
        let v = verifier(s);
        let ok = serde_json::json!({ "exp": now() + 60, "iss": "https://auth.example.com" });
        assert!(v.verify(&hs(&ok)).await.is_ok());
        for c in [
            serde_json::json!({ "exp": now() + 60, "iss": "https://evil.example.com" }),
            serde_json::json!({ "exp": now() + 60 }),
            serde_json::json!({ "exp": now() + 60, "iss": ["https://auth.example.com"] }),
        ] {
            assert_eq!(v.verify(&hs(&c)).await, Err(TokenError::WrongIssuer), "{c}");
        }
    }

    #[tokio::test]
    async fn wrong_or_missing_aud() {
        let mut s = hs_settings();
        s.audience = Some("orders-api".into());
        let v = verifier(s);
        for c in [
            serde_json::json!({ "exp": now() + 60, "aud": "billing-api" }),
            serde_json::json!({ "exp": now() + 60, "aud": ["billing-api", "x"] }),
            serde_json::json!({ "exp": now() + 60 }),
            serde_json::json!({ "exp": now() + 60, "aud": 7 }),
        ] {
            assert_eq!(
                v.verify(&hs(&c)).await,
                Err(TokenError::WrongAudience),
                "{c}"
            );
        }
    }

    #[tokio::test]
    async fn bad_signature() {
        let v = verifier(hs_settings());
        let other = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"another-secret-another-secret-xx"),
            None,
            &claims(),
        );
        assert_eq!(v.verify(&other).await, Err(TokenError::BadSignature));

        // Claims swapped under a valid signature.
        let good = hs(&claims());
        let evil = hs(&serde_json::json!({ "sub": "root", "exp": now() + 300 }));
        let g: Vec<&str> = good.split('.').collect();
        let e: Vec<&str> = evil.split('.').collect();
        let spliced = format!("{}.{}.{}", g[0], e[1], g[2]);
        assert_eq!(v.verify(&spliced).await, Err(TokenError::BadSignature));

        let mut s = settings(&["RS256"]);
        s.public_key_pem = Some(rsa().public_pem.clone().into_bytes());
        let rv = verifier(s);
        let t = rsa().token(None, &claims());
        let parts: Vec<&str> = t.split('.').collect();
        let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        sig[10] ^= 1;
        let tampered = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig));
        assert_eq!(rv.verify(&tampered).await, Err(TokenError::BadSignature));
    }

    #[tokio::test]
    async fn alg_none_hand_made() {
        let v = verifier(hs_settings());
        let payload = b64(&claims().to_string());
        for alg in ["none", "None", "NONE", "nOnE"] {
            let header = b64(&format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#));
            for t in [
                format!("{header}.{payload}."),
                format!("{header}.{payload}.AAAA"),
            ] {
                assert_eq!(
                    v.verify(&t).await,
                    Err(TokenError::AlgorithmNotAllowed),
                    "{alg}"
                );
            }
        }
    }

    #[tokio::test]
    async fn alg_not_in_allow_list() {
        let v = verifier(hs_settings());
        let t = sign(
            Algorithm::HS512,
            &EncodingKey::from_secret(&[7u8; 64]),
            None,
            &claims(),
        );
        assert_eq!(v.verify(&t).await, Err(TokenError::AlgorithmNotAllowed));
        // Same secret, stronger hash: still not listed.
        let t = sign(
            Algorithm::HS512,
            &EncodingKey::from_secret(SECRET),
            None,
            &claims(),
        );
        assert_eq!(v.verify(&t).await, Err(TokenError::AlgorithmNotAllowed));
        // Unknown and lower-case names.
        for alg in ["hs256", "ES512", "XYZ", ""] {
            let t = format!(
                "{}.{}.AAAA",
                b64(&format!(r#"{{"alg":"{alg}"}}"#)),
                b64(&claims().to_string())
            );
            assert_eq!(
                v.verify(&t).await,
                Err(TokenError::AlgorithmNotAllowed),
                "{alg}"
            );
        }
    }

    #[tokio::test]
    async fn alg_confusion_rs256_key_as_hmac_secret() {
        let mut s = settings(&["RS256"]);
        s.public_key_pem = Some(rsa().public_pem.clone().into_bytes());
        let v = verifier(s);
        let forged = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(rsa().public_pem.as_bytes()),
            None,
            &claims(),
        );
        assert_eq!(
            v.verify(&forged).await,
            Err(TokenError::AlgorithmNotAllowed)
        );
    }

    #[tokio::test]
    async fn unknown_kid() {
        let mut s = settings(&["ES256"]);
        s.jwks_json = Some(jwks(&[ec_a().jwk("a")]));
        let v = verifier(s);
        assert_eq!(
            v.verify(&ec_a().token(Some("nope"), &claims())).await,
            Err(TokenError::UnknownKid)
        );
    }

    #[tokio::test]
    async fn malformed_shapes() {
        let v = verifier(hs_settings());
        let good = hs(&claims());
        let parts: Vec<&str> = good.split('.').collect();
        let cases = [
            String::new(),
            ".".to_string(),
            "..".to_string(),
            format!("{}.{}", parts[0], parts[1]), // two segments
            format!("{good}.{}", parts[2]),       // four segments
            format!("{}!.{}.{}", parts[0], parts[1], parts[2]), // bad base64 header
            format!("{}.{}*.{}", parts[0], parts[1], parts[2]), // bad base64 payload
            format!("{}.{}.{}$", parts[0], parts[1], parts[2]), // bad base64 signature
            format!("{}.{}.{}", b64("not json"), parts[1], parts[2]), // non-JSON header
            format!("{}.{}.{}", b64("[\"HS256\"]"), parts[1], parts[2]), // header not an object
            format!("{}.{}.{}", b64(r#"{"typ":"JWT"}"#), parts[1], parts[2]), // no alg
            format!(
                "{}.{}.{}",
                b64(r#"{"alg":"HS256","alg":"HS256"}"#),
                parts[1],
                parts[2]
            ),
            format!(
                "{}.{}.{}",
                b64(r#"{"alg":"HS256","crit":["b64"],"b64":false}"#),
                parts[1],
                parts[2]
            ),
            format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode([0xff, 0xfe]),
                parts[1],
                parts[2]
            ),
            format!(
                "{}.{}.{}",
                b64(r#"{"alg":"HS256"}"#).replace('e', "="),
                parts[1],
                parts[2]
            ),
        ];
        for t in cases {
            let r = v.verify(&t).await;
            assert!(
                matches!(r, Err(TokenError::Malformed | TokenError::BadSignature)),
                "{t:?} -> {r:?}"
            );
        }
        // Specifically Malformed for the acceptance cases.
        for t in [
            format!("{}.{}", parts[0], parts[1]),
            format!("{}!.{}.{}", parts[0], parts[1], parts[2]),
            format!("{}.{}.{}", b64("not json"), parts[1], parts[2]),
        ] {
            assert_eq!(v.verify(&t).await, Err(TokenError::Malformed), "{t}");
        }
        // A payload that is valid JSON but not an object, correctly signed.
        let header = b64(r#"{"alg":"HS256"}"#);
        let payload = b64("[1,2]");
        let key = jsonwebtoken::crypto::sign(
            format!("{header}.{payload}").as_bytes(),
            &EncodingKey::from_secret(SECRET),
            Algorithm::HS256,
        )
        .unwrap();
        assert_eq!(
            v.verify(&format!("{header}.{payload}.{key}")).await,
            Err(TokenError::Malformed)
        );
    }

    #[tokio::test]
    async fn huge_token_rejected_before_parsing() {
        let v = verifier(hs_settings());
        let big = serde_json::json!({ "exp": now() + 60, "pad": "x".repeat(20 * 1024) });
        let t = hs(&big);
        assert!(t.len() > 20 * 1024);
        assert_eq!(v.verify(&t).await, Err(TokenError::TooLarge));
        assert_eq!(
            v.verify(&"a".repeat(20 * 1024)).await,
            Err(TokenError::TooLarge)
        );
    }

    #[tokio::test]
    async fn large_header_still_parses() {
        // Larger than the stack buffer: falls back to the heap, same result.
        let v = verifier(hs_settings());
        let mut h = Header::new(Algorithm::HS256);
        h.x5u = Some("u".repeat(2000));
        let t = jsonwebtoken::encode(&h, &claims(), &EncodingKey::from_secret(SECRET)).unwrap();
        assert!(v.verify(&t).await.is_ok());
    }

    #[tokio::test]
    async fn jwk_use_enc_or_other_alg_never_verifies_but_others_load() {
        let mut enc = ec_a().jwk("enc");
        enc["use"] = "enc".into();
        let mut other_alg = rsa().jwk("rs384");
        other_alg["alg"] = "RS384".into();
        let mut no_verify_op = ec_b().jwk("ops");
        no_verify_op["key_ops"] = serde_json::json!(["encrypt"]);
        let garbage = serde_json::json!({ "kty": "RSA", "kid": "bad", "n": 5 });
        let unknown_kty = serde_json::json!({ "kty": "XYZ", "kid": "x" });
        let p521 =
            serde_json::json!({ "kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA" });
        let oct =
            serde_json::json!({ "kty": "oct", "kid": "oct", "k": URL_SAFE_NO_PAD.encode(SECRET) });
        let mut good_rsa = rsa().jwk("rsa");
        good_rsa.as_object_mut().unwrap().remove("alg");
        let mut s = settings(&["ES256", "RS256", "RS384"]);
        s.jwks_json = Some(jwks(&[
            enc,
            other_alg,
            no_verify_op,
            garbage,
            unknown_kty,
            p521,
            oct,
            ec_c().jwk("good"),
            good_rsa,
        ]));
        let v = verifier(s);
        assert_eq!(v.file_keys.keys.len(), 3); // rs384 (kept, for RS384 only), good, rsa
        assert!(
            v.verify(&ec_c().token(Some("good"), &claims()))
                .await
                .is_ok()
        );
        assert!(v.verify(&rsa().token(Some("rsa"), &claims())).await.is_ok());
        assert_eq!(
            v.verify(&ec_a().token(Some("enc"), &claims())).await,
            Err(TokenError::UnknownKid)
        );
        assert_eq!(
            v.verify(&ec_b().token(Some("ops"), &claims())).await,
            Err(TokenError::UnknownKid)
        );
        // Its alg is RS384, the token's RS256.
        assert_eq!(
            v.verify(&rsa().token(Some("rs384"), &claims())).await,
            Err(TokenError::NoMatchingKey)
        );
    }

    // ----- config ---------------------------------------------------------

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
            let mut s = hs_settings();
            s.algorithms = algs.iter().map(|a| a.to_string()).collect();
            let e = config_error(s);
            assert_eq!(e.key, "algorithms");
            assert!(e.message.contains(needle), "{algs:?}: {e}");
        }
    }

    #[test]
    fn config_hmac_secret_rules() {
        let mut s = settings(&["HS256"]);
        s.secret_env = Some("PORTCULLIS_TEST_SECRET".into());
        let e = config_error(s.clone());
        assert_eq!(e.key, "secret_env");
        assert!(
            e.message.contains("PORTCULLIS_TEST_SECRET is not set"),
            "{e}"
        );

        s.secret = Some(vec![]);
        assert!(config_error(s.clone()).message.contains("is empty"));

        s.secret = Some(vec![b'k'; 31]);
        let e = config_error(s.clone());
        assert!(
            e.message.contains("31 bytes") && e.message.contains("at least 32"),
            "{e}"
        );

        s.secret = Some(vec![b'k'; 32]);
        assert!(JwtVerifier::new(s.clone()).is_ok());

        // The strictest listed HS* sets the minimum.
        s.algorithms = vec!["HS256".into(), "HS512".into()];
        let e = config_error(s.clone());
        assert!(e.message.contains("HS512 needs at least 64"), "{e}");
        s.secret = Some(vec![b'k'; 64]);
        assert!(JwtVerifier::new(s.clone()).is_ok());

        s.secret_env = None;
        s.secret = None;
        assert_eq!(config_error(s).key, "secret_env");
    }

    #[test]
    fn config_unused_secret_env_is_ignored() {
        let mut s = settings(&["RS256"]);
        s.secret_env = Some("UNSET_AND_UNUSED".into());
        s.public_key_pem = Some(rsa().public_pem.clone().into_bytes());
        assert!(JwtVerifier::new(s).is_ok());
    }

    #[test]
    fn config_asymmetric_needs_public_keys() {
        let e = config_error(settings(&["RS256"]));
        assert_eq!(e.key, "algorithms");
        assert!(
            e.message
                .contains("RS256 need a public_key, jwks or jwks_url"),
            "{e}"
        );

        // Mixed list with only the secret.
        let mut s = settings(&["HS256", "ES256"]);
        s.secret = Some(SECRET.to_vec());
        assert_eq!(config_error(s).key, "algorithms");

        // Mixed list with only a public key.
        let mut s = settings(&["HS256", "RS256"]);
        s.secret_env = Some("NOT_SET_PORTCULLIS".into());
        s.public_key_pem = Some(rsa().public_pem.clone().into_bytes());
        assert_eq!(config_error(s).key, "secret_env");
    }

    #[test]
    fn config_public_key_without_asymmetric_alg() {
        let mut s = hs_settings();
        s.public_key_pem = Some(rsa().public_pem.clone().into_bytes());
        assert_eq!(config_error(s).key, "public_key");
        let mut s = hs_settings();
        s.jwks_url = Some("http://127.0.0.1:1/jwks.json".into());
        assert_eq!(config_error(s).key, "jwks_url");
    }

    #[test]
    fn config_public_key_type_must_fit() {
        let mut s = settings(&["RS256"]);
        s.public_key_pem = Some(ec_a().public_pem.clone().into_bytes());
        let e = config_error(s);
        assert_eq!(e.key, "public_key");
        assert!(
            e.message.contains("EC P-256") && e.message.contains("ES256"),
            "{e}"
        );

        let mut s = settings(&["ES384"]);
        s.public_key_pem = Some(ec_a().public_pem.clone().into_bytes());
        assert_eq!(config_error(s).key, "public_key");

        let mut s = settings(&["ES256"]);
        s.public_key_pem = Some(ed().public_pem.clone().into_bytes());
        assert_eq!(config_error(s).key, "public_key");
    }

    #[test]
    fn config_public_key_bad_inputs() {
        let mut s = settings(&["RS256"]);
        s.public_key_pem = Some(rsa().private_pem.clone().into_bytes());
        let e = config_error(s);
        assert!(e.message.contains("private key"), "{e}");

        let mut s = settings(&["RS256"]);
        s.public_key_pem = Some(b"hello".to_vec());
        assert!(config_error(s).message.contains("not a PEM"));

        let mut s = settings(&["RS256"]);
        s.public_key_pem =
            Some(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".to_vec());
        assert_eq!(config_error(s).key, "public_key");

        let p521 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P521_SHA512).unwrap();
        let mut s = settings(&["ES256"]);
        s.public_key_pem = Some(p521.public_key_pem().into_bytes());
        let e = config_error(s);
        assert!(e.message.contains("P-521"), "{e}");
    }

    #[test]
    fn config_jwks_file_rules() {
        let mut s = settings(&["ES256"]);
        s.jwks_json = Some(b"{\"not\":\"a jwks\"}".to_vec());
        let e = config_error(s);
        assert_eq!(e.key, "jwks");
        assert!(e.message.contains("not a JWKS"), "{e}");

        // Only keys for algorithms not listed.
        let mut s = settings(&["ES256"]);
        s.jwks_json = Some(jwks(&[rsa().jwk("r")]));
        let e = config_error(s);
        assert!(e.message.contains("no key usable"), "{e}");
    }

    #[test]
    fn config_jwks_url_rules() {
        let mut s = settings(&["RS256"]);
        s.jwks_url = Some("https://auth.example.com/jwks.json".into());
        let e = config_error(s);
        assert_eq!(e.to_string(), "jwks_url: https is not supported yet");

        for bad in [
            "ftp://x/y",
            "not a url",
            "http:///nohost",
            "http://u:p@host/x",
        ] {
            let mut s = settings(&["RS256"]);
            s.jwks_url = Some(bad.into());
            assert_eq!(config_error(s).key, "jwks_url", "{bad}");
        }

        let mut s = settings(&["RS256"]);
        s.jwks_url = Some("http://[::1]:4000/.well-known/jwks.json?x=1".into());
        let v = verifier(s);
        let url = &v.remote.as_ref().unwrap().url;
        assert_eq!((url.host.as_str(), url.port), ("::1", 4000));
        assert_eq!(url.authority, "[::1]:4000");
        assert_eq!(url.path_and_query, "/.well-known/jwks.json?x=1");

        let mut s = settings(&["RS256"]);
        s.jwks_url = Some("http://idp.internal".into());
        s.jwks_refresh = Duration::from_millis(10);
        assert_eq!(config_error(s).key, "jwks_refresh");
    }

    #[test]
    fn config_leeway_is_bounded() {
        let mut s = hs_settings();
        s.leeway = Duration::from_secs(100 * 365 * 86400);
        assert_eq!(config_error(s).key, "leeway");
    }

    #[test]
    fn settings_debug_redacts_secret() {
        let text = format!("{:?}", hs_settings());
        assert!(!text.contains("0123456789abcdef"), "{text}");
        assert!(text.contains("[redacted]"));
        let v = verifier(hs_settings());
        assert!(!format!("{v:?}").contains("0123456789abcdef"));
        assert!(v.summary().contains("HS256"));
    }

    #[test]
    fn start_background_is_harmless_without_url_or_runtime() {
        Arc::new(verifier(hs_settings())).start_background();
        let mut s = settings(&["RS256"]);
        s.jwks_url = Some("http://127.0.0.1:9/jwks".into());
        Arc::new(verifier(s)).start_background(); // no runtime: logged, nothing spawned
    }

    #[test]
    fn token_error_details() {
        assert_eq!(TokenError::Expired.detail(), "expired");
        assert_eq!(TokenError::BadSignature.to_string(), "bad signature");
    }

    // ----- VerifiedToken helpers -------------------------------------------

    fn verified(c: Value) -> VerifiedToken {
        VerifiedToken {
            claims: Arc::new(c.as_object().unwrap().clone()),
        }
    }

    #[test]
    fn scopes_from_scope_and_scp() {
        assert_eq!(
            verified(serde_json::json!({"scope": "a  b c"})).scopes(),
            ["a", "b", "c"]
        );
        assert_eq!(
            verified(serde_json::json!({"scp": ["a", "b"]})).scopes(),
            ["a", "b"]
        );
        assert_eq!(
            verified(serde_json::json!({"scp": "a b"})).scopes(),
            ["a", "b"]
        );
        assert_eq!(
            verified(serde_json::json!({"scope": ["x"], "scp": "y"})).scopes(),
            ["x", "y"]
        );
        assert!(
            verified(serde_json::json!({"scope": 5}))
                .scopes()
                .is_empty()
        );
        assert!(verified(serde_json::json!({})).scopes().is_empty());
        assert_eq!(
            verified(serde_json::json!({"scp": ["a", 1, "b"]})).scopes(),
            ["a", "b"]
        );
    }

    #[test]
    fn subject_only_when_string() {
        assert_eq!(
            verified(serde_json::json!({"sub": "bob"})).subject(),
            Some("bob")
        );
        assert_eq!(verified(serde_json::json!({"sub": 5})).subject(), None);
        assert_eq!(verified(serde_json::json!({})).subject(), None);
    }

    #[test]
    fn claims_as_header_values() {
        let t = verified(serde_json::json!({
            "sub": "alice", "n": 42, "f": 1.5, "b": true, "arr": ["a", "b"], "mixed": ["a", 1],
            "obj": {"x": 1}, "null": null, "nl": "a\nb", "cr": "a\rb", "tab": "a\tb",
            "lead": " admin", "utf": "Jos\u{e9}", "del": "a\u{7f}"
        }));
        assert_eq!(t.claim_as_header_value("sub").as_deref(), Some("alice"));
        assert_eq!(t.claim_as_header_value("n").as_deref(), Some("42"));
        assert_eq!(t.claim_as_header_value("f").as_deref(), Some("1.5"));
        assert_eq!(t.claim_as_header_value("b").as_deref(), Some("true"));
        assert_eq!(t.claim_as_header_value("arr").as_deref(), Some("a b"));
        assert_eq!(t.claim_as_header_value("utf").as_deref(), Some("Jos\u{e9}"));
        for name in [
            "mixed", "obj", "null", "nl", "cr", "tab", "lead", "del", "absent",
        ] {
            assert_eq!(t.claim_as_header_value(name), None, "{name}");
        }
        let v = t.claim_as_header_value("utf").unwrap();
        assert!(HeaderValue::try_from(v).is_ok());
    }

    // ----- extraction ------------------------------------------------------

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn extract_bearer() {
        use TokenSource::*;
        let cases: &[(&[u8], TokenSource<'_>)] = &[
            (b"Bearer abc.def.ghi", Found("abc.def.ghi")),
            (b"bearer abc", Found("abc")),
            (b"BEARER   abc  ", Found("abc")),
            (b"Bearer ", Invalid),
            (b"Bearer", Invalid),
            (b"Basic dXNlcjpwYXNz", Invalid),
            (b"Bearer a b", Invalid),
            (b"", Invalid),
            (b"Bearer \xff\xfe", Invalid),
        ];
        for (value, want) in cases {
            let h = headers(&[("authorization", value)]);
            assert_eq!(
                extract_token(&h, None),
                *want,
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
        let h = headers(&[
            ("authorization", b"Bearer a"),
            ("authorization", b"Bearer b"),
        ]);
        assert_eq!(extract_token(&h, None), Invalid);
        assert_eq!(extract_token(&HeaderMap::new(), None), Missing);
        assert_eq!(
            extract_token(&HeaderMap::new(), Some("access_token")),
            Missing
        );
    }

    #[test]
    fn extract_cookie() {
        use TokenSource::*;
        let c = Some("access_token");
        let h = headers(&[("cookie", b"a=1; access_token=tok.en.x; b=2")]);
        assert_eq!(extract_token(&h, c), Found("tok.en.x"));
        // Several Cookie headers (HTTP/2 splits them).
        let h = headers(&[("cookie", b"a=1"), ("cookie", b"b=2;access_token=t")]);
        assert_eq!(extract_token(&h, c), Found("t"));
        let h = headers(&[("cookie", b"access_token=\"q.t\"")]);
        assert_eq!(extract_token(&h, c), Found("q.t"));
        // Another cookie's name, or a name that merely contains ours.
        let h = headers(&[("cookie", b"session=tok; my_access_token=x; Access_Token=y")]);
        assert_eq!(extract_token(&h, c), Missing);
        // Cookie ignored when token_cookie is not configured.
        let h = headers(&[("cookie", b"access_token=t")]);
        assert_eq!(extract_token(&h, None), Missing);
        let h = headers(&[("cookie", b"access_token=")]);
        assert_eq!(extract_token(&h, c), Missing);
        let h = headers(&[("cookie", b"x=\xff; access_token=\xfe\xff")]);
        assert_eq!(extract_token(&h, c), Invalid);
        // A non-UTF-8 byte in another cookie does not hide ours.
        let h = headers(&[("cookie", b"x=\xff; access_token=ok")]);
        assert_eq!(extract_token(&h, c), Found("ok"));
        // Authorization wins over the cookie, even when it is not Bearer.
        let h = headers(&[
            ("authorization", b"Bearer hdr"),
            ("cookie", b"access_token=ck"),
        ]);
        assert_eq!(extract_token(&h, c), Found("hdr"));
        let h = headers(&[
            ("authorization", b"Basic x"),
            ("cookie", b"access_token=ck"),
        ]);
        assert_eq!(extract_token(&h, c), Invalid);
    }

    #[tokio::test]
    async fn token_from_cookie_verifies() {
        let v = verifier(hs_settings());
        let t = hs(&claims());
        let value = format!("other=1; access_token={t}");
        let h = headers(&[("cookie", value.as_bytes())]);
        let TokenSource::Found(found) = extract_token(&h, Some("access_token")) else {
            panic!("no token");
        };
        assert!(v.verify(found).await.is_ok());
    }

    // ----- minting ---------------------------------------------------------

    fn mint_req() -> MintRequest {
        MintRequest {
            subject: "alice".into(),
            scope: Some("orders:read admin".into()),
            ttl: Duration::from_secs(900),
            extra_claims: vec![("tenant".into(), Value::from("acme"))],
            issuer: None,
            audience: None,
        }
    }

    #[tokio::test]
    async fn mint_hs_roundtrip() {
        let mut s = hs_settings();
        s.issuer = Some("https://auth.example.com".into());
        s.audience = Some("orders-api".into());
        let token = mint(&s, None, &mint_req()).unwrap();
        let t = verifier(s).verify(&token).await.unwrap();
        assert_eq!(t.subject(), Some("alice"));
        assert_eq!(t.scopes(), ["orders:read", "admin"]);
        assert_eq!(t.claims["tenant"], "acme");
        assert_eq!(t.claims["iss"], "https://auth.example.com");
        let exp = t.claims["exp"].as_i64().unwrap();
        assert!((exp - now() - 900).abs() <= 2);
    }

    #[tokio::test]
    async fn mint_extra_claims_override() {
        let mut req = mint_req();
        req.extra_claims = vec![("exp".into(), Value::from(now() - 3600))];
        let token = mint(&hs_settings(), None, &req).unwrap();
        assert_eq!(
            verifier(hs_settings()).verify(&token).await,
            Err(TokenError::Expired)
        );
    }

    #[tokio::test]
    async fn mint_with_private_key_and_jwks_kid() {
        let mut s = settings(&["HS256", "ES256", "RS256"]);
        s.secret = Some(SECRET.to_vec());
        s.jwks_json = Some(jwks(&[ec_a().jwk("ec-a"), rsa().jwk("rsa-1")]));
        let token = mint(&s, Some(rsa().private_pem.as_bytes()), &mint_req()).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::RS256);
        assert_eq!(header.kid.as_deref(), Some("rsa-1"));
        assert!(verifier(s.clone()).verify(&token).await.is_ok());

        let token = mint(&s, Some(ec_a().private_pem.as_bytes()), &mint_req()).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(
            (header.alg, header.kid.as_deref()),
            (Algorithm::ES256, Some("ec-a"))
        );
        assert!(verifier(s).verify(&token).await.is_ok());
    }

    #[tokio::test]
    async fn mint_eddsa_with_explicit_kid() {
        let mut s = settings(&["EdDSA"]);
        s.jwks_json = Some(jwks(&[ed().jwk("ed-1")]));
        let token = mint_with_kid(
            &s,
            Some(ed().private_pem.as_bytes()),
            &mint_req(),
            Some("ed-1"),
        )
        .unwrap();
        assert_eq!(
            jsonwebtoken::decode_header(&token).unwrap().kid.as_deref(),
            Some("ed-1")
        );
        assert!(verifier(s).verify(&token).await.is_ok());
    }

    #[test]
    fn mint_errors() {
        // Key that fits no listed algorithm (P-256 key, only ES384 listed).
        let mut s = settings(&["ES384"]);
        s.public_key_pem = Some(ec384().public_pem.clone().into_bytes());
        let e = mint(&s, Some(ec_a().private_pem.as_bytes()), &mint_req()).unwrap_err();
        assert_eq!(e.key, "key");
        assert!(e.message.contains("ES384"), "{e}");
        // A public key given as --key.
        let e = mint(&s, Some(ec384().public_pem.as_bytes()), &mint_req()).unwrap_err();
        assert!(e.message.contains("not a private key"), "{e}");
        // Asymmetric only, no key.
        assert_eq!(mint(&s, None, &mint_req()).unwrap_err().key, "key");
        // HS without a secret.
        let e = mint(&settings(&["HS256"]), None, &mint_req()).unwrap_err();
        assert_eq!(e.key, "secret_env");
        assert!(e.message.contains("JWT_SECRET"), "{e}");
        // "none" is refused here too.
        assert_eq!(
            mint(&settings(&["none"]), None, &mint_req())
                .unwrap_err()
                .key,
            "algorithms"
        );
    }

    // ----- jwks_url ----------------------------------------------------------

    /// A tiny JWKS server on 127.0.0.1:0: serves `body` with `status`,
    /// counts requests, can be stopped (connections then get refused).
    struct JwksServer {
        url: String,
        state: Arc<StdMutex<(u16, Vec<u8>)>>,
        hits: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl JwksServer {
        async fn start(body: Vec<u8>) -> JwksServer {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!(
                "http://{}/.well-known/jwks.json",
                listener.local_addr().unwrap()
            );
            let state = Arc::new(StdMutex::new((200u16, body)));
            let hits = Arc::new(AtomicUsize::new(0));
            let (st, h) = (state.clone(), hits.clone());
            let task = tokio::spawn(async move {
                loop {
                    let Ok((mut sock, _)) = listener.accept().await else {
                        return;
                    };
                    let (st, h) = (st.clone(), h.clone());
                    tokio::spawn(async move {
                        let mut req = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                            match sock.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => req.extend_from_slice(&buf[..n]),
                            }
                        }
                        assert!(req.starts_with(b"GET /.well-known/jwks.json HTTP/1.1\r\n"));
                        h.fetch_add(1, Ordering::SeqCst);
                        let (status, body) = st.lock().unwrap().clone();
                        let head = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = sock.write_all(head.as_bytes()).await;
                        let _ = sock.write_all(&body).await;
                        let _ = sock.shutdown().await;
                    });
                }
            });
            JwksServer {
                url,
                state,
                hits,
                task,
            }
        }

        fn serve(&self, status: u16, body: Vec<u8>) {
            *self.state.lock().unwrap() = (status, body);
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }

        async fn stop(self) {
            self.task.abort();
            let _ = self.task.await; // the listener is dropped with the task
        }
    }

    async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn url_verifier(url: &str, refresh: Duration, min_refetch: Duration) -> Arc<JwtVerifier> {
        let mut s = settings(&["ES256"]);
        s.jwks_url = Some(url.to_string());
        s.jwks_refresh = refresh;
        let opts = VerifierOptions {
            min_refetch_interval: min_refetch,
            fetch_timeout: Duration::from_secs(5),
            ..VerifierOptions::default()
        };
        Arc::new(JwtVerifier::with_options(s, opts).unwrap())
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn jwks_url_start_fetch_then_rotation_on_unknown_kid() {
        let server = JwksServer::start(jwks(&[ec_a().jwk("a")])).await;
        let v = url_verifier(&server.url, HOUR, Duration::ZERO);
        v.start_background();
        // No polling needed: a request during the start fetch waits for it.
        assert!(v.verify(&ec_a().token(Some("a"), &claims())).await.is_ok());
        assert_eq!(server.hits(), 1);

        // Rotation: b replaces a. b is picked up on first use...
        server.serve(200, jwks(&[ec_b().jwk("b")]));
        assert!(v.verify(&ec_b().token(Some("b"), &claims())).await.is_ok());
        assert_eq!(server.hits(), 2);
        // ...and the set was replaced whole: a no longer verifies.
        assert_eq!(
            v.verify(&ec_a().token(Some("a"), &claims())).await,
            Err(TokenError::UnknownKid)
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn jwks_url_start_fetch_does_not_use_the_allowance_and_refetch_is_limited() {
        let server = JwksServer::start(jwks(&[ec_a().jwk("a")])).await;
        let v = url_verifier(&server.url, HOUR, HOUR);
        v.start_background();
        wait_until("start fetch", || server.hits() == 1).await;
        assert!(v.verify(&ec_a().token(Some("a"), &claims())).await.is_ok());

        // Published after start: accepted on first use.
        server.serve(200, jwks(&[ec_a().jwk("a"), ec_b().jwk("b")]));
        assert!(v.verify(&ec_b().token(Some("b"), &claims())).await.is_ok());
        assert_eq!(server.hits(), 2);

        // The allowance is spent for this interval: c is unknown, no fetch.
        server.serve(200, jwks(&[ec_c().jwk("c")]));
        assert_eq!(
            v.verify(&ec_c().token(Some("c"), &claims())).await,
            Err(TokenError::UnknownKid)
        );
        assert_eq!(server.hits(), 2);
        // Known keys keep working meanwhile.
        assert!(v.verify(&ec_b().token(Some("b"), &claims())).await.is_ok());
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jwks_url_many_unknown_kids_share_one_refetch() {
        let server = JwksServer::start(jwks(&[ec_a().jwk("a")])).await;
        let v = url_verifier(&server.url, HOUR, HOUR);
        v.start_background();
        wait_until("start fetch", || server.hits() == 1).await;

        let mut tasks = Vec::new();
        for i in 0..50 {
            let v = v.clone();
            tasks.push(tokio::spawn(async move {
                let kid = format!("unknown-{i}");
                v.verify(&ec_a().token(Some(&kid), &claims())).await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Err(TokenError::UnknownKid));
        }
        assert_eq!(server.hits(), 2, "one start fetch + at most one refetch");
        server.stop().await;
    }

    #[tokio::test]
    async fn jwks_url_failed_refresh_keeps_old_keys() {
        let server = JwksServer::start(jwks(&[ec_a().jwk("a")])).await;
        let v = url_verifier(&server.url, Duration::from_secs(1), Duration::ZERO);
        v.start_background();
        assert!(v.verify(&ec_a().token(Some("a"), &claims())).await.is_ok());

        // Scheduled refreshes that get a 500, then a non-JWKS body.
        server.serve(500, b"oops".to_vec());
        let seen = server.hits();
        wait_until("a failed refresh", || server.hits() > seen).await;
        server.serve(200, b"<html>maintenance</html>".to_vec());
        let seen = server.hits();
        wait_until("a non-JWKS refresh", || server.hits() > seen).await;
        assert!(v.verify(&ec_a().token(Some("a"), &claims())).await.is_ok());

        // Server down: an unknown kid triggers a refetch that is refused;
        // the old key still verifies.
        server.stop().await;
        assert_eq!(
            v.verify(&ec_b().token(Some("b"), &claims())).await,
            Err(TokenError::UnknownKid)
        );
        assert!(v.verify(&ec_a().token(Some("a"), &claims())).await.is_ok());
    }

    #[tokio::test]
    async fn jwks_url_down_at_start_is_not_fatal() {
        // A port nothing listens on.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        drop(listener);
        let v = url_verifier(&url, HOUR, HOUR);
        v.start_background();
        assert_eq!(
            v.verify(&ec_a().token(Some("a"), &claims())).await,
            Err(TokenError::KeyUnavailable)
        );
        assert_eq!(
            v.verify(&ec_a().token(None, &claims())).await,
            Err(TokenError::KeyUnavailable)
        );
    }

    #[tokio::test]
    async fn jwks_url_oversized_document_is_a_failed_fetch() {
        let server = JwksServer::start(jwks(&[ec_a().jwk("a")])).await;
        let mut s = settings(&["ES256"]);
        s.jwks_url = Some(server.url.clone());
        let opts = VerifierOptions {
            min_refetch_interval: Duration::ZERO,
            max_jwks_bytes: 64,
            ..VerifierOptions::default()
        };
        let v = Arc::new(JwtVerifier::with_options(s, opts).unwrap());
        v.start_background();
        assert_eq!(
            v.verify(&ec_a().token(Some("a"), &claims())).await,
            Err(TokenError::KeyUnavailable)
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn dropping_the_verifier_stops_its_refresh_task() {
        let server = JwksServer::start(jwks(&[ec_a().jwk("a")])).await;
        let v = url_verifier(&server.url, Duration::from_secs(1), HOUR);
        v.start_background();
        wait_until("start fetch", || server.hits() == 1).await;
        let remote = Arc::downgrade(v.remote.as_ref().unwrap());
        drop(v);
        wait_until("the task to release the key set", || {
            remote.upgrade().is_none()
        })
        .await;
        server.stop().await;
    }
}
