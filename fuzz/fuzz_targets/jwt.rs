//! JWT checking up to and including the signature, through the public API of
//! `portcullis::policy::jwt`: tokens (`JwtVerifier::verify`), the
//! `Authorization`/cookie extraction in front of it, and the key material a
//! configuration names (JWKS documents and public key PEMs, decoded by
//! `VerifierConfig::new`).
//!
//! The verifier trusts fixed keys (`fuzz/fixtures/jwt/`: an HS256 secret, an
//! RSA, an EC P-256 and an Ed25519 key in a JWKS, and an Ed25519 public key
//! PEM); `fixtures/jwt/signed.txt` lists the signing inputs of the only
//! tokens ever signed with them (the seeds). So the fuzzer can never make a
//! token that deserves to pass: any token accepted must carry one of those
//! signing inputs, an allowed `alg` and the configured issuer, audience and
//! a live `exp` — or it is a forgery (`alg: none`, key confusion, ...).
//!
//! Input byte 0 picks the mode: 0 a token; 1 an `Authorization` header
//! (bit 2 clear) or a `Cookie` header (bit 2 set), whose token is then
//! verified; 2 a JWKS document; 3 a public key PEM. For 2 and 3, byte 1
//! picks the `algorithms` list.
//!
//! Checks: no panic; `TooLarge` exactly for tokens over `MAX_TOKEN_BYTES`;
//! no forgery; the per-thread cache (a long-lived verifier, asked twice)
//! answers as a fresh verifier does; an extracted token is a blank-free
//! part of the header; a key error names its `[jwt]` key and the file.
//!
//! Regenerate the keys, fixtures and seeds with `python3
//! fuzz/fixtures/jwt/make.py`. Run with `cargo +nightly fuzz run jwt` from
//! the repository root.

#![no_main]

use std::future::Future;
use std::pin::pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use portcullis::policy::jwt::{
    JwtSettings, JwtVerifier, KeyFile, MAX_TOKEN_BYTES, TokenError, TokenSource, VerifiedToken,
    VerifierConfig, extract_token,
};
use serde_json::Value;

/// `fixtures/jwt/make.py`'s SECRET.
const SECRET: &[u8] = b"portcullis-fuzz-hs256-secret-0123456789";
const ISSUER: &str = "https://issuer.example";
const AUDIENCE: &str = "portcullis-fuzz";
const LEEWAY_SECS: u64 = 30;
const JWKS: &[u8] = include_bytes!("../fixtures/jwt/jwks.json");
const PUBLIC_PEM: &[u8] = include_bytes!("../fixtures/jwt/public.pem");
const SIGNED: &str = include_str!("../fixtures/jwt/signed.txt");
/// Algorithms listed in the token verifier.
const ALLOWED: [&str; 5] = ["HS256", "RS256", "PS256", "ES256", "EdDSA"];
/// Byte 1's bits pick among these for the key-material modes.
const CHOICES: [&str; 8] = [
    "HS256", "RS256", "PS256", "RS512", "ES256", "ES384", "EdDSA", "PS384",
];

fn settings(algorithms: Vec<String>) -> JwtSettings {
    JwtSettings {
        algorithms,
        secret: Some(SECRET.to_vec()),
        secret_env: Some("JWT_SECRET".into()),
        public_key: None,
        jwks: None,
        jwks_url: None,
        jwks_refresh: Duration::from_secs(600),
        issuer: Some(ISSUER.into()),
        audience: Some(AUDIENCE.into()),
        leeway: Duration::from_secs(LEEWAY_SECS),
    }
}

struct Fixture {
    config: VerifierConfig,
    /// Lives across inputs, as a worker's verifier does: its cache fills.
    long_lived: JwtVerifier,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let mut settings = settings(ALLOWED.iter().map(|a| a.to_string()).collect());
        settings.jwks = Some(KeyFile {
            name: "jwks.json".into(),
            contents: JWKS.to_vec(),
        });
        settings.public_key = Some(KeyFile {
            name: "public.pem".into(),
            contents: PUBLIC_PEM.to_vec(),
        });
        let config = VerifierConfig::new(settings).expect("the fixture keys load");
        Fixture {
            long_lived: JwtVerifier::new(config.clone(), None),
            config,
        }
    })
}

/// Runs a future that never waits: without `jwks_url` nothing in
/// verification does.
fn now_or_never<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("verification waited on something"),
    }
}

fn claims(
    verified: &Result<VerifiedToken, TokenError>,
) -> Result<(Option<String>, Vec<String>), TokenError> {
    verified
        .as_ref()
        .map(|v| {
            (
                v.subject().map(str::to_owned),
                v.scopes().into_iter().map(str::to_owned).collect(),
            )
        })
        .map_err(|e| *e)
}

fn check_token(token: &str) {
    let fixture = fixture();
    let fresh = JwtVerifier::new(fixture.config.clone(), None);
    let first = now_or_never(fixture.long_lived.verify(token));
    let again = now_or_never(fixture.long_lived.verify(token));
    let uncached = now_or_never(fresh.verify(token));
    assert_eq!(claims(&first), claims(&again), "a cached answer differs");
    assert_eq!(
        claims(&first),
        claims(&uncached),
        "the long-lived verifier differs from a fresh one"
    );
    assert_eq!(
        token.len() > MAX_TOKEN_BYTES,
        first.as_ref().err() == Some(&TokenError::TooLarge),
        "TooLarge"
    );
    let Ok(verified) = first else {
        return;
    };
    // Accepted: it must be one of the tokens signed with the fixture keys.
    let signing_input = token.rsplit_once('.').map_or("", |(input, _)| input);
    assert!(
        SIGNED.lines().any(|line| line == signing_input),
        "accepted a token nobody signed: {token}"
    );
    let (header, payload) = signing_input.split_once('.').unwrap();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    let payload: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    let alg = header["alg"].as_str().unwrap_or_default();
    assert!(ALLOWED.contains(&alg), "accepted alg {alg}");
    assert!(header.get("crit").is_none(), "accepted a crit header");
    assert_eq!(
        payload["iss"].as_str(),
        Some(ISSUER),
        "accepted issuer {}",
        payload["iss"]
    );
    let aud_ok = match &payload["aud"] {
        Value::String(aud) => aud == AUDIENCE,
        Value::Array(auds) => auds.iter().any(|a| a.as_str() == Some(AUDIENCE)),
        _ => false,
    };
    assert!(aud_ok, "accepted audience {}", payload["aud"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = payload["exp"]
        .as_u64()
        .expect("accepted without a numeric exp");
    assert!(exp + LEEWAY_SECS >= now, "accepted an expired token");
    if let Some(nbf) = payload.get("nbf") {
        assert!(
            nbf.as_u64().is_some_and(|nbf| nbf <= now + LEEWAY_SECS),
            "accepted before nbf"
        );
    }
    assert_eq!(verified.subject(), payload["sub"].as_str());
}

fn check_key_material(algorithm_bits: u8, material: &[u8], jwks: bool) {
    let algorithms = CHOICES
        .iter()
        .enumerate()
        .filter(|(i, _)| algorithm_bits >> i & 1 != 0)
        .map(|(_, a)| a.to_string())
        .collect();
    let mut settings = settings(algorithms);
    let (name, key) = if jwks {
        ("keys.json", "jwks")
    } else {
        ("key.pem", "public_key")
    };
    let file = Some(KeyFile {
        name: name.into(),
        contents: material.to_vec(),
    });
    if jwks {
        settings.jwks = file;
    } else {
        settings.public_key = file;
    }
    match VerifierConfig::new(settings) {
        Ok(config) => {
            let _ = config.summary();
            // The decoded keys in use: every seed-shaped token goes through.
            let verifier = JwtVerifier::new(config, None);
            for signing_input in SIGNED.lines() {
                let _ = now_or_never(verifier.verify(&format!("{signing_input}.c2ln")));
            }
        }
        // About the file's contents, or about the key being set at all.
        Err(error) if error.key == key => assert!(
            error.message.starts_with(&format!("{name}: "))
                || error.message.starts_with("is set but algorithms lists no"),
            "a {key} error without the file: {error}"
        ),
        // The algorithm list itself, or no asymmetric algorithm to use it.
        Err(error) => assert!(
            ["algorithms", "secret_env"].contains(&error.key),
            "unexpected error: {error}"
        ),
    }
}

fn check_extraction(cookie: bool, value: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(value) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        if cookie { "cookie" } else { "authorization" },
        value.clone(),
    );
    match extract_token(&headers, Some("access_token")) {
        TokenSource::Found(token) => {
            assert!(!token.is_empty());
            assert!(
                value
                    .as_bytes()
                    .windows(token.len())
                    .any(|w| w == token.as_bytes()),
                "the token is not part of the header"
            );
            if !cookie {
                assert!(!token.contains([' ', '\t']), "a bearer token with blanks");
            }
            check_token(token);
        }
        TokenSource::Missing => assert!(cookie, "an Authorization header read as no token"),
        TokenSource::Invalid => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode & 3 {
        0 => {
            if let Ok(token) = std::str::from_utf8(rest) {
                check_token(token);
            }
        }
        1 => check_extraction(mode & 4 != 0, rest),
        _ => {
            let Some((&bits, material)) = rest.split_first() else {
                return;
            };
            check_key_material(bits, material, mode & 3 == 2);
        }
    }
});
