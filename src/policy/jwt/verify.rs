//! The verifier: a token in, a [`VerifiedToken`] or the [`TokenError`] that
//! refused it out.
//!
//! Order of checks on a token, cheapest and least trusting first: size, shape
//! (three segments), header (base64url JSON with an `alg`, no `crit`), `alg`
//! in the allow-list — before any key is looked at, which is what defeats
//! `alg: none` and RS256→HS256 confusion — then key choice by `alg` family
//! and `kid`, then signature and claims (jsonwebtoken, with `validate_nbf`
//! turned on, our leeway, `iss`/`aud` required when configured).
//!
//! HS* tokens are only ever checked with the configured secret, and
//! asymmetric tokens only with public keys whose type fits the token's
//! `alg` (see `keys.rs`). Header parameters that point at keys (`jku`,
//! `jwk`, `x5u`, `x5c`) are ignored, never fetched. The verifier does not
//! know where changing keys come from: it reads them from [`RemoteKeys`],
//! whatever its [`super::KeySource`].
//!
//! [`TokenError`] says why a token was refused, for the security log; it
//! never holds the token or any part of it.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::{AlgorithmFamily, DecodingKey};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::algorithms::alg_from_name;
use super::cache::TokenCache;
use super::keys::{KeySet, Lookup};
use super::remote::RemoteKeys;
use super::settings::VerifierConfig;
use super::verified::VerifiedToken;

/// Longest token accepted, in bytes. Equal to the default `max_header_bytes`:
/// real tokens (even group-laden ones) stay well under it, and it bounds the
/// base64/JSON work an anonymous client can ask for.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

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

/// Verifies tokens against the configured keys and claims. `Send + Sync`;
/// share it through an `Arc` across threads and tokio runtimes.
pub struct JwtVerifier {
    config: VerifierConfig,
    /// The `jwks_url` keys, when configured.
    remote: Option<Arc<RemoteKeys>>,
    cache: TokenCache,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("summary", &self.summary())
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// A verifier for `config`; `remote` holds the keys that change, when
    /// `config` names a `jwks_url` (or, in tests, a fake source).
    pub fn new(config: VerifierConfig, remote: Option<Arc<RemoteKeys>>) -> JwtVerifier {
        JwtVerifier {
            cache: TokenCache::new(config.leeway_secs),
            config,
            remote,
        }
    }

    /// Verifies signature and claims: `exp` required, `nbf` honoured, the
    /// configured leeway, `iss`/`aud` when configured (`aud` a string or an
    /// array containing ours). The header's `alg` must be listed before any
    /// key is touched. With `jwks_url`, a `kid` not in the current set
    /// triggers a refetch (at most once per `min_refetch_interval`;
    /// concurrent callers share it), which is awaited before one retry.
    pub async fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        if let Some(hit) = self.cache.get(token, self.remote.as_deref()) {
            return Ok(hit);
        }
        // Taken before verifying: if a refresh replaces the set meanwhile,
        // the entry is stale from the start.
        let remote_keys = self.remote.as_ref().map(|r| r.current_full());
        let verified = self.verify_uncached(token).await?;
        self.cache.put(token, &verified, remote_keys);
        Ok(verified)
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
        if !self.config.allowed.has(alg_i) {
            return Err(Final(TokenError::AlgorithmNotAllowed));
        }
        let Some(validation) = &self.config.validations[alg_i] else {
            return Err(Final(TokenError::AlgorithmNotAllowed));
        };

        // Only now look at keys. The remote set is loaded (lock-free) only
        // for asymmetric tokens; its guard lives until this function returns,
        // never across an await.
        let is_hmac = alg.family() == AlgorithmFamily::Hmac;
        let remote_keys = match &self.remote {
            Some(r) if !is_hmac => Some(r.current()),
            _ => None,
        };
        let remote_set: Option<&KeySet> = remote_keys.as_deref().map(|a| &**a);
        let choice = if is_hmac {
            // HS* only ever with the configured secret.
            match &self.config.hmac {
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
        if let Some(iss) = &self.config.issuer
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
            .config
            .public_key
            .as_ref()
            .filter(|k| k.algs.has(alg_i))
            .map(|k| &k.key);
        match kid {
            Some(kid) => {
                let mut wrong_alg = false;
                for set in std::iter::once(&self.config.file_keys).chain(remote) {
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
                    .config
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
        self.remote.as_ref().is_some_and(|r| !r.is_loaded())
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
        self.config.summary()
    }
}

/// Internal result of one pass: final, or "unknown kid, refetch may help".
enum Pass {
    Final(TokenError),
    KidNotFound(String),
}
use Pass::{Final, KidNotFound};

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use jsonwebtoken::{Algorithm, EncodingKey, Header};

    use super::*;
    use crate::policy::jwt::cache;
    use crate::policy::jwt::remote::{FetchOptions, KeyFetcher};
    use crate::policy::jwt::test_support::*;

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

    #[tokio::test]
    async fn a_verified_token_is_served_from_the_thread_cache() {
        let v = verifier(hs_settings());
        let t = hs(&claims());
        let first = v.verify(&t).await.unwrap();
        assert!(cache::holds(&t));
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
        assert!(!cache::holds(&tampered));
    }

    #[tokio::test]
    async fn rs256_via_public_key() {
        let mut s = settings(&["RS256"]);
        s.public_key = key_file("key.pem", rsa().public_pem.clone().into_bytes());
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
        s.public_key = key_file("key.pem", rsa().public_pem.clone().into_bytes());
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
        s.jwks = key_file("keys.json", jwks(&[ec_a().jwk("a"), ec_b().jwk("b")]));
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
        s.jwks = key_file("keys.json", jwks(&[ec_a().jwk("a")]));
        let v = verifier(s);
        assert!(v.verify(&ec_a().token(None, &claims())).await.is_ok());
    }

    #[tokio::test]
    async fn es384_via_public_key() {
        let mut s = settings(&["ES384"]);
        s.public_key = key_file("key.pem", ec384().public_pem.clone().into_bytes());
        let v = verifier(s);
        assert!(v.verify(&ec384().token(None, &claims())).await.is_ok());
    }

    #[tokio::test]
    async fn eddsa_via_public_key_and_jwks() {
        let mut s = settings(&["EdDSA"]);
        s.public_key = key_file("key.pem", ed().public_pem.clone().into_bytes());
        assert!(
            verifier(s)
                .verify(&ed().token(None, &claims()))
                .await
                .is_ok()
        );

        let mut s = settings(&["EdDSA"]);
        s.jwks = key_file("keys.json", jwks(&[ed().jwk("ed")]));
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
        s.public_key = key_file("key.pem", rsa().public_pem.clone().into_bytes());
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
        s.public_key = key_file("key.pem", rsa().public_pem.clone().into_bytes());
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
        s.public_key = key_file("key.pem", rsa().public_pem.clone().into_bytes());
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
        s.jwks = key_file("keys.json", jwks(&[ec_a().jwk("a")]));
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
        s.jwks = key_file(
            "keys.json",
            jwks(&[
                enc,
                other_alg,
                no_verify_op,
                garbage,
                unknown_kty,
                p521,
                oct,
                ec_c().jwk("good"),
                good_rsa,
            ]),
        );
        let v = verifier(s);
        assert_eq!(v.config.file_keys.len(), 3); // rs384 (kept, for RS384 only), good, rsa
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

    #[test]
    fn token_error_details() {
        assert_eq!(TokenError::Expired.detail(), "expired");
        assert_eq!(TokenError::BadSignature.to_string(), "bad signature");
    }

    // ----- keys that change -------------------------------------------------

    const HOUR: Duration = Duration::from_secs(3600);

    /// A verifier whose `jwks_url` keys come from `source`, and the
    /// started fetcher of those keys.
    fn fake_url_verifier(
        source: &Arc<FakeSource>,
        min_refetch: Duration,
    ) -> (JwtVerifier, KeyFetcher) {
        let mut s = settings(&["ES256"]);
        s.jwks_url = Some("http://idp.invalid/jwks.json".into());
        s.jwks_refresh = HOUR;
        let config = VerifierConfig::new(s).unwrap();
        let options = FetchOptions {
            min_refetch_interval: min_refetch,
            ..FetchOptions::default()
        };
        let remote = Arc::new(RemoteKeys::new(
            source.clone(),
            config.jwks_refresh,
            options,
        ));
        let fetcher = KeyFetcher::start(&remote).unwrap();
        (JwtVerifier::new(config, Some(remote)), fetcher)
    }

    #[tokio::test]
    async fn fetched_keys_rotate_on_an_unknown_kid() {
        let source = FakeSource::new(&["ES256"], jwks(&[ec_a().jwk("a")]));
        let (v, _fetcher) = fake_url_verifier(&source, Duration::ZERO);
        // No polling needed: a request during the start fetch waits for it.
        assert!(v.verify(&ec_a().token(Some("a"), &claims())).await.is_ok());
        assert_eq!(source.fetches(), 1);

        // Rotation: b replaces a. b is picked up on first use...
        source.serve(jwks(&[ec_b().jwk("b")]));
        assert!(v.verify(&ec_b().token(Some("b"), &claims())).await.is_ok());
        assert_eq!(source.fetches(), 2);
        // ...and the set was replaced whole: a no longer verifies, even
        // though it was verified (and cached) a moment ago.
        assert_eq!(
            v.verify(&ec_a().token(Some("a"), &claims())).await,
            Err(TokenError::UnknownKid)
        );
    }

    #[tokio::test]
    async fn a_failed_fetch_keeps_the_keys_and_an_unknown_kid_stays_unknown() {
        let source = FakeSource::new(&["ES256"], jwks(&[ec_a().jwk("a")]));
        let (v, _fetcher) = fake_url_verifier(&source, Duration::ZERO);
        assert!(v.verify(&ec_a().token(Some("a"), &claims())).await.is_ok());
        source.fail("connect: refused");
        assert_eq!(
            v.verify(&ec_b().token(Some("b"), &claims())).await,
            Err(TokenError::UnknownKid)
        );
        assert_eq!(source.fetches(), 2);
        assert!(v.verify(&ec_a().token(Some("a"), &claims())).await.is_ok());
    }

    #[tokio::test]
    async fn keys_never_fetched_are_unavailable() {
        let source = FakeSource::new(&["ES256"], Vec::new());
        source.fail("connect: refused");
        let (v, _fetcher) = fake_url_verifier(&source, HOUR);
        assert_eq!(
            v.verify(&ec_a().token(Some("a"), &claims())).await,
            Err(TokenError::KeyUnavailable)
        );
        assert_eq!(
            v.verify(&ec_a().token(None, &claims())).await,
            Err(TokenError::KeyUnavailable)
        );
    }
}
