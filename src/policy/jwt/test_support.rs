//! Keys, tokens and settings shared by the JWT unit tests (minting's too),
//! and [`FakeSource`], a key source that needs no socket.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::Value;

use super::algorithms::AlgSet;
use super::keys::decode_jwks;
use super::remote::{FetchFuture, KeySource};
use super::settings::{JwtSettings, KeyFile, VerifierConfig};
use super::verify::JwtVerifier;

pub(crate) const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef"; // 32 bytes

pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub(crate) fn claims() -> Value {
    serde_json::json!({ "sub": "alice", "exp": now() + 300, "scope": "read write" })
}

pub(crate) fn hs_settings() -> JwtSettings {
    JwtSettings {
        secret: Some(SECRET.to_vec()),
        ..JwtSettings::default()
    }
}

pub(crate) fn settings(algs: &[&str]) -> JwtSettings {
    JwtSettings {
        algorithms: algs.iter().map(|s| s.to_string()).collect(),
        secret: None,
        ..JwtSettings::default()
    }
}

pub(crate) fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

pub(crate) fn hs(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET),
        None,
        claims,
    )
}

pub(crate) fn b64(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

// Shared with tests/jwt.rs; each side uses part of it.
#[allow(dead_code)]
#[path = "../../../tests/support/jwt_fixtures.rs"]
mod jwt_fixtures;
pub(crate) use jwt_fixtures::{JwksServer, TestKey};

macro_rules! test_key {
    ($name:ident, $rc:expr, $alg:expr) => {
        pub(crate) fn $name() -> &'static TestKey {
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

/// A `public_key` or `jwks` file as the config layer reads it.
pub(crate) fn key_file(name: &str, contents: impl Into<Vec<u8>>) -> Option<KeyFile> {
    Some(KeyFile {
        name: name.to_string(),
        contents: contents.into(),
    })
}

pub(crate) fn jwks(keys: &[Value]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "keys": keys })).unwrap()
}

/// A verifier with no `jwks_url` source.
pub(crate) fn verifier(s: JwtSettings) -> JwtVerifier {
    JwtVerifier::new(VerifierConfig::new(s).unwrap(), None)
}

/// A [`KeySource`] serving a JWKS document the test sets, counting fetches.
pub(crate) struct FakeSource {
    allowed: AlgSet,
    /// The document, or why a fetch fails.
    document: Mutex<Result<Vec<u8>, String>>,
    /// How long a fetch takes.
    delay: Mutex<Duration>,
    /// While true, fetches wait (holding the document they started with).
    held: tokio::sync::watch::Sender<bool>,
    fetches: AtomicUsize,
}

impl FakeSource {
    /// A source for keys of the listed algorithms serving `document`.
    pub(crate) fn new(algorithms: &[&str], document: Vec<u8>) -> Arc<FakeSource> {
        let names: Vec<String> = algorithms.iter().map(|a| a.to_string()).collect();
        let allowed = super::algorithms::parse_algorithms(&names)
            .unwrap()
            .into_iter()
            .fold(AlgSet::default(), |set, alg| set.or(AlgSet::of(alg)));
        Arc::new(FakeSource {
            allowed,
            document: Mutex::new(Ok(document)),
            delay: Mutex::new(Duration::ZERO),
            held: tokio::sync::watch::Sender::new(false),
            fetches: AtomicUsize::new(0),
        })
    }

    pub(crate) fn serve(&self, document: Vec<u8>) {
        *self.document.lock().unwrap() = Ok(document);
    }

    /// Makes every fetch from now on fail with `why`.
    pub(crate) fn fail(&self, why: &str) {
        *self.document.lock().unwrap() = Err(why.to_string());
    }

    pub(crate) fn delay(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }

    /// Fetches from now on wait, with the document they started with,
    /// until [`FakeSource::release`]: a fetch that is under way on cue.
    pub(crate) fn hold(&self) {
        self.held.send_replace(true);
    }

    pub(crate) fn release(&self) {
        self.held.send_replace(false);
    }

    pub(crate) fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl KeySource for FakeSource {
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            // What the server had when asked, as over HTTP.
            let document = self.document.lock().unwrap().clone();
            let mut held = self.held.subscribe();
            self.fetches.fetch_add(1, Ordering::SeqCst);
            let delay = *self.delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            let _ = held.wait_for(|held| !held).await;
            decode_jwks(&document?, self.allowed, "fake")
        })
    }

    fn name(&self) -> &str {
        "fake"
    }
}

/// Polls `cond` every 10 ms for up to 10 s.
pub(crate) async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
