//! Issue 4 (JWT on routes), through the real binary: what a client and the
//! upstream see for `[jwt]` + `[[routes]] jwt = true` / `scopes`. SPEC:
//! `[jwt]`, "Errors the proxy writes itself", "Forwarding" (forward_claims),
//! Fine points "Tokens" and "JWKS URL". The verifier's unit tests in
//! src/policy/jwt/ cover the crypto in depth; here every case goes over
//! TLS and is judged by status, JSON `error`, `WWW-Authenticate`, whether the
//! upstream was reached, and the stdout events.
//!
//! Keys are generated at test time (rcgen) and written to a temp dir of the
//! test's own; nothing here sleeps to synchronise (waits poll with deadlines).

mod common;
// Each side uses part of the fixtures.
#[allow(dead_code)]
#[path = "support/jwt_fixtures.rs"]
mod jwt_fixtures;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use common::{Answer, Proxy, ProxyConfig, Upstream, eventually};
use http::Method;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use jwt_fixtures::{JwksServer, TestKey};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

/// The HS* secret given to the proxy as `JWT_SECRET` (longer than 32 bytes).
const SECRET: &str = "portcullis-integration-test-secret-0123456789";

/// A route that needs a token, and a public one next to it.
const ADMIN: &str = "[[routes]]\npath = \"/admin\"\njwt = true\n";

const INVALID: &str = r#"Bearer error="invalid_token""#;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `sub = alice`, `scope = "read write"`, valid for five minutes.
fn claims() -> Value {
    json!({ "sub": "alice", "exp": now() + 300, "scope": "read write" })
}

/// `claims()` with some claims replaced (a `null` removes the claim).
fn claims_with(changes: Value) -> Value {
    let mut c = claims();
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn sign_hmac(alg: Algorithm, secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).unwrap()
}

fn hs256(claims: &Value) -> String {
    sign_hmac(Algorithm::HS256, SECRET.as_bytes(), claims)
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn jwks(keys: &[Value]) -> Vec<u8> {
    serde_json::to_vec(&json!({ "keys": keys })).unwrap()
}

/// A temp dir for key files; the config names them by absolute path.
struct KeyDir(tempfile::TempDir);

impl KeyDir {
    fn new() -> KeyDir {
        KeyDir(tempfile::tempdir().unwrap())
    }
    fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

/// `[jwt]` with `jwt_lines`, then `routes`; `JWT_SECRET` set.
fn config(jwt_lines: &str, routes: &str) -> ProxyConfig {
    ProxyConfig {
        rest: format!("[jwt]\n{jwt_lines}\n\n{routes}"),
        env: vec![("JWT_SECRET".into(), SECRET.into())],
        ..Default::default()
    }
}

async fn start(upstream: &Upstream, jwt_lines: &str, routes: &str) -> Proxy {
    Proxy::start(upstream.addr, config(jwt_lines, routes)).await
}

async fn get(proxy: &Proxy, path: &str, headers: &[(&str, &str)]) -> Answer {
    proxy
        .client()
        .request(Method::GET, path, headers, Bytes::new())
        .await
}

/// `GET /admin` with `Authorization: Bearer <token>`.
async fn bearer(proxy: &Proxy, token: &str) -> Answer {
    let auth = format!("Bearer {token}");
    get(proxy, "/admin", &[("authorization", auth.as_str())]).await
}

/// A 200 from the upstream, which received `X-Auth-Subject: sub` (once).
fn assert_accepted(answer: &Answer, upstream: &Upstream, before: usize, sub: &str, what: &str) {
    assert_eq!(
        upstream.count(),
        before + 1,
        "{what}: upstream not reached; the client got {} {}",
        answer.status,
        String::from_utf8_lossy(&answer.body)
    );
    let seen = upstream.last();
    common::assert_echo(answer, &seen.target, what);
    let values: Vec<_> = seen
        .headers
        .get_all("x-auth-subject")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(values, [sub], "{what}: X-Auth-Subject upstream");
}

/// A proxy-written JSON error with this status, code and `WWW-Authenticate`
/// (`None`: any value starting with `Bearer`), never echoing `token`.
fn assert_refused(
    answer: &Answer,
    status: u16,
    code: &str,
    www: Option<&str>,
    token: &str,
    what: &str,
) {
    assert_eq!(
        answer.status,
        status,
        "{what}: expected {status}, got {} {}",
        answer.status,
        answer.text()
    );
    let body = answer.json();
    assert_eq!(body["error"], code, "{what}: body {body}");
    assert!(body["message"].is_string(), "{what}: body {body}");
    let header = answer
        .header("www-authenticate")
        .unwrap_or_else(|| panic!("{what}: no WWW-Authenticate"));
    match www {
        Some(expected) => assert_eq!(header, expected, "{what}: WWW-Authenticate"),
        None => assert!(header.starts_with("Bearer"), "{what}: {header}"),
    }
    assert_eq!(
        answer.header("content-type"),
        Some("application/json"),
        "{what}"
    );
    if !token.is_empty() {
        let text = answer.text();
        assert!(!text.contains(token), "{what}: the body echoes the token");
        for segment in token.split('.').filter(|s| s.len() > 8) {
            assert!(
                !text.contains(segment),
                "{what}: the body echoes a token segment"
            );
        }
        for (name, value) in &answer.headers {
            assert!(
                !value.to_str().unwrap_or("").contains(token),
                "{what}: header {name} echoes the token"
            );
        }
    }
}

fn assert_invalid(answer: &Answer, token: &str, what: &str) {
    assert_refused(answer, 401, "invalid_token", Some(INVALID), token, what);
}

/// Security events (`reason` set) on stdout so far.
fn security_events(proxy: &Proxy) -> Vec<Value> {
    proxy
        .events()
        .into_iter()
        .filter(|e| e.get("reason").is_some())
        .collect()
}

/// Waits until more than `before` security events have been written and
/// returns the newest.
async fn next_security_event(proxy: &Proxy, before: usize) -> Value {
    let found = eventually(Duration::from_secs(10), || {
        security_events(proxy).len() > before
    })
    .await;
    assert!(
        found,
        "no security event; stdout:\n{}",
        proxy.stdout.lock().unwrap().join("\n")
    );
    security_events(proxy).pop().unwrap()
}

/// One HTTP/1.1 request written byte for byte (so the target and header
/// names reach the proxy exactly as spelled), on its own connection.
struct RawAnswer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl RawAnswer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("not JSON: {:?}", self.body))
    }
}

async fn raw_get(proxy: &Proxy, target: &str, headers: &[(&str, &str)]) -> RawAnswer {
    let mut request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("Connection: close\r\n\r\n");
    let mut tls = proxy.client().connect(&[b"http/1.1"]).await;
    tls.write_all(request.as_bytes()).await.unwrap();
    let text = common::read_until_quiet(&mut tls, Duration::from_secs(10)).await;
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("GET {target}: no response head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("GET {target}: bad status line in {text:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = rest.to_string();
    if let Some(len) = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.truncate(len);
    }
    RawAnswer {
        status,
        headers,
        body,
    }
}

// ---------------------------------------------------------------------------
// Accepted
// ---------------------------------------------------------------------------

#[tokio::test]
async fn valid_hs256_token_reaches_upstream_with_claim_headers_and_sub_in_access_log() {
    let upstream = Upstream::start().await;
    let proxy = start(&upstream, "algorithms = [\"HS256\"]", ADMIN).await;
    let token = hs256(&claims());
    let answer = bearer(&proxy, &token).await;
    assert_accepted(&answer, &upstream, 0, "alice", "HS256");
    let seen = upstream.last();
    assert_eq!(seen.target, "/admin");
    assert_eq!(seen.headers.get("x-auth-scope").unwrap(), "read write");
    let access = proxy
        .wait_event(|e| e["path"] == "/admin" && e["status"] == 200)
        .await;
    assert_eq!(access["sub"], "alice", "access line: {access}");
    assert_eq!(access["route"], "/admin", "access line: {access}");
    assert!(
        !proxy.stdout.lock().unwrap().join("\n").contains(&token),
        "stdout carries the token"
    );

    // Routes without jwt are not affected, and get no identity headers.
    let answer = get(&proxy, "/elsewhere", &[]).await;
    assert_eq!(answer.status, 200);
    assert!(upstream.last().headers.get("x-auth-subject").is_none());
    let access = proxy.wait_event(|e| e["path"] == "/elsewhere").await;
    assert!(access["sub"].is_null(), "access line: {access}");
}

#[tokio::test]
async fn rs256_via_public_key_pem() {
    let upstream = Upstream::start().await;
    let keys = KeyDir::new();
    let rsa = TestKey::rsa();
    let pem = keys.write("rsa-public.pem", &rsa.public_pem);
    let jwt = format!(
        "algorithms = [\"RS256\"]\npublic_key = \"{}\"",
        pem.display()
    );
    let proxy = start(&upstream, &jwt, ADMIN).await;

    let answer = bearer(&proxy, &rsa.token(None, &claims())).await;
    assert_accepted(&answer, &upstream, 0, "alice", "RS256");
    assert_eq!(
        upstream.last().headers.get("x-auth-scope").unwrap(),
        "read write"
    );

    // Another RSA key's signature does not verify.
    let other = TestKey::rsa();
    let token = other.token(None, &claims());
    assert_invalid(&bearer(&proxy, &token).await, &token, "RS256 other key");
    assert_eq!(upstream.count(), 1);
}

#[tokio::test]
async fn es256_via_jwks_file_chosen_by_kid() {
    let upstream = Upstream::start().await;
    let dir = KeyDir::new();
    let (a, b) = (TestKey::p256(), TestKey::p256());
    let file = dir.write("jwks.json", jwks(&[a.jwk("key-a"), b.jwk("key-b")]));
    let jwt = format!("algorithms = [\"ES256\"]\njwks = \"{}\"", file.display());
    let proxy = start(&upstream, &jwt, ADMIN).await;

    let answer = bearer(&proxy, &a.token(Some("key-a"), &claims())).await;
    assert_accepted(&answer, &upstream, 0, "alice", "ES256 kid key-a");
    let bob = claims_with(json!({ "sub": "bob" }));
    let answer = bearer(&proxy, &b.token(Some("key-b"), &bob)).await;
    assert_accepted(&answer, &upstream, 1, "bob", "ES256 kid key-b");

    // The kid chooses the key: key A's signature under kid key-b fails, and
    // an unknown kid is refused.
    let before = security_events(&proxy).len();
    let swapped = a.token(Some("key-b"), &claims());
    assert_invalid(
        &bearer(&proxy, &swapped).await,
        &swapped,
        "kid of another key",
    );
    let event = next_security_event(&proxy, before).await;
    assert_eq!(event["detail"], "bad signature", "{event}");

    let before = security_events(&proxy).len();
    let unknown = a.token(Some("key-c"), &claims());
    assert_invalid(&bearer(&proxy, &unknown).await, &unknown, "unknown kid");
    let event = next_security_event(&proxy, before).await;
    assert_eq!(event["reason"], "invalid_token", "{event}");
    assert_eq!(event["detail"], "unknown kid", "{event}");
    assert_eq!(upstream.count(), 2, "a refused token reached the upstream");
}

#[tokio::test]
async fn eddsa_via_public_key_pem() {
    let upstream = Upstream::start().await;
    let dir = KeyDir::new();
    let ed = TestKey::ed25519();
    let pem = dir.write("ed-public.pem", &ed.public_pem);
    let jwt = format!(
        "algorithms = [\"EdDSA\"]\npublic_key = \"{}\"",
        pem.display()
    );
    let proxy = start(&upstream, &jwt, ADMIN).await;

    let answer = bearer(&proxy, &ed.token(None, &claims())).await;
    assert_accepted(&answer, &upstream, 0, "alice", "EdDSA");

    let other = TestKey::ed25519().token(None, &claims());
    assert_invalid(&bearer(&proxy, &other).await, &other, "EdDSA other key");
    assert_eq!(upstream.count(), 1);
}

#[tokio::test]
async fn token_cookie_is_accepted_and_other_cookies_count_as_no_token() {
    let upstream = Upstream::start().await;
    let proxy = start(
        &upstream,
        "algorithms = [\"HS256\"]\ntoken_cookie = \"access_token\"",
        ADMIN,
    )
    .await;
    let token = hs256(&claims());

    let cookie = format!("theme=dark; access_token={token}; lang=en");
    let answer = get(&proxy, "/admin", &[("cookie", cookie.as_str())]).await;
    assert_accepted(&answer, &upstream, 0, "alice", "token_cookie");
    assert_eq!(
        upstream.last().headers.get("x-auth-scope").unwrap(),
        "read write"
    );

    // The same token under another cookie name is no token at all.
    for cookie in [
        format!("session={token}"),
        format!("access_token_x={token}"),
    ] {
        let answer = get(&proxy, "/admin", &[("cookie", cookie.as_str())]).await;
        assert_refused(
            &answer,
            401,
            "missing_token",
            Some("Bearer"),
            &token,
            &cookie,
        );
    }
    // A bad token in the right cookie is an invalid one.
    let bad = format!(
        "access_token={}",
        hs256(&claims_with(json!({ "exp": now() - 3600 })))
    );
    let answer = get(&proxy, "/admin", &[("cookie", bad.as_str())]).await;
    assert_invalid(
        &answer,
        bad.trim_start_matches("access_token="),
        "expired in cookie",
    );
    assert_eq!(upstream.count(), 1);
}

#[tokio::test]
async fn exp_within_leeway_is_accepted_and_beyond_it_refused() {
    let upstream = Upstream::start().await;
    let proxy = start(
        &upstream,
        "algorithms = [\"HS256\"]\nleeway = \"30s\"",
        ADMIN,
    )
    .await;

    let token = hs256(&claims_with(json!({ "exp": now() - 10 })));
    assert_accepted(
        &bearer(&proxy, &token).await,
        &upstream,
        0,
        "alice",
        "exp 10 s ago, leeway 30 s",
    );
    let token = hs256(&claims_with(json!({ "exp": now() - 90 })));
    assert_invalid(&bearer(&proxy, &token).await, &token, "exp 90 s ago");
    // nbf within the leeway is accepted too.
    let token = hs256(&claims_with(json!({ "nbf": now() + 10 })));
    assert_accepted(
        &bearer(&proxy, &token).await,
        &upstream,
        1,
        "alice",
        "nbf in 10 s, leeway 30 s",
    );
    assert_eq!(upstream.count(), 2);
}

#[tokio::test]
async fn portcullis_token_output_is_accepted() {
    let upstream = Upstream::start().await;
    let proxy = start(
        &upstream,
        "algorithms = [\"HS256\"]\nissuer = \"https://auth.example.com\"\naudience = \"orders-api\"",
        "[[routes]]\npath = \"/admin\"\njwt = true\nscopes = [\"admin\"]\n",
    )
    .await;
    let run = |args: &[&str]| {
        let out = std::process::Command::new(common::BIN)
            .arg("token")
            .arg("--config")
            .arg(&proxy.config_path)
            .args(args)
            .env("JWT_SECRET", SECRET)
            .env_remove("PORTCULLIS_CONFIG")
            .output()
            .expect("run portcullis token");
        assert!(
            out.status.success(),
            "portcullis token {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };

    let token = run(&["--sub", "alice", "--scope", "read admin"]);
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token:?}");
    assert_accepted(
        &bearer(&proxy, &token).await,
        &upstream,
        0,
        "alice",
        "minted",
    );
    assert_eq!(
        upstream.last().headers.get("x-auth-scope").unwrap(),
        "read admin"
    );

    // Without the route's scope it is a valid token that lacks a scope.
    let token = run(&["--sub", "alice"]);
    let answer = bearer(&proxy, &token).await;
    assert_refused(
        &answer,
        403,
        "insufficient_scope",
        Some(r#"Bearer error="insufficient_scope", scope="admin""#),
        &token,
        "minted without scope",
    );
    assert_eq!(upstream.count(), 1);
}

// ---------------------------------------------------------------------------
// Refused: 401 invalid_token, never forwarded
// ---------------------------------------------------------------------------

#[tokio::test]
async fn invalid_tokens_are_401_invalid_token_and_never_forwarded() {
    let upstream = Upstream::start().await;
    let proxy = start(
        &upstream,
        "algorithms = [\"HS256\"]\nissuer = \"https://auth.example.com\"\naudience = \"orders-api\"\nleeway = \"30s\"",
        ADMIN,
    )
    .await;
    let good = || {
        claims_with(json!({ "iss": "https://auth.example.com", "aud": ["other", "orders-api"] }))
    };
    // The configuration accepts a correct token, so each refusal below is
    // for the reason the case names.
    assert_accepted(
        &bearer(&proxy, &hs256(&good())).await,
        &upstream,
        0,
        "alice",
        "valid with iss and aud",
    );

    let with = |changes: Value| {
        let mut c = good();
        for (k, v) in changes.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let valid = hs256(&good());
    let (header_b64, payload_b64, signature_b64) = {
        let mut parts = valid.split('.');
        (
            parts.next().unwrap().to_string(),
            parts.next().unwrap().to_string(),
            parts.next().unwrap().to_string(),
        )
    };
    let payload_json = serde_json::to_vec(&good()).unwrap();

    // Signature flipped in its first character (the last one may carry
    // padding bits only).
    let mut flipped = signature_b64.clone().into_bytes();
    flipped[0] = if flipped[0] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    // A payload the signature was not made for.
    let tampered_payload = b64(&serde_json::to_vec(&with(json!({ "sub": "root" }))).unwrap());

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired beyond leeway",
            hs256(&with(json!({ "exp": now() - 120 }))),
            "expired",
        ),
        (
            "nbf in the future",
            hs256(&with(json!({ "nbf": now() + 600 }))),
            "not yet valid",
        ),
        (
            "wrong iss",
            hs256(&with(json!({ "iss": "https://evil.example.com" }))),
            "wrong issuer",
        ),
        (
            "wrong aud",
            hs256(&with(json!({ "aud": "billing-api" }))),
            "wrong audience",
        ),
        (
            "signed with another secret",
            sign_hmac(
                Algorithm::HS256,
                b"another-secret-another-secret-another-secret",
                &good(),
            ),
            "bad signature",
        ),
        (
            "signature altered",
            format!("{header_b64}.{payload_b64}.{flipped}"),
            "bad signature",
        ),
        (
            "payload altered",
            format!("{header_b64}.{tampered_payload}.{signature_b64}"),
            "bad signature",
        ),
        (
            "alg none, empty signature",
            format!(
                "{}.{}.",
                b64(br#"{"alg":"none","typ":"JWT"}"#),
                b64(&payload_json)
            ),
            "algorithm not allowed",
        ),
        (
            "alg None, valid signature kept",
            format!(
                "{}.{payload_b64}.{signature_b64}",
                b64(br#"{"alg":"None","typ":"JWT"}"#)
            ),
            "algorithm not allowed",
        ),
        (
            "HS512 when only HS256 is listed",
            sign_hmac(Algorithm::HS512, SECRET.as_bytes(), &good()),
            "algorithm not allowed",
        ),
        (
            "two segments",
            format!("{header_b64}.{payload_b64}"),
            "malformed token",
        ),
        (
            "bad base64 in the header",
            format!("!!not*base64!!.{payload_b64}.{signature_b64}"),
            "malformed token",
        ),
        // The signature covers the payload's bytes as sent, so it is what
        // fails first here; either reason is a refusal.
        (
            "bad base64 in the payload",
            format!("{header_b64}.!!not*base64!!.{signature_b64}"),
            "malformed token|bad signature",
        ),
        (
            "bad base64 in the signature",
            format!("{header_b64}.{payload_b64}.!!not*base64!!"),
            "malformed token|bad signature",
        ),
        (
            "non-JSON header",
            format!("{}.{payload_b64}.{signature_b64}", b64(b"not json at all")),
            "malformed token",
        ),
        (
            "header not an object",
            format!("{}.{payload_b64}.{signature_b64}", b64(b"[\"HS256\"]")),
            "malformed token",
        ),
        (
            "four segments",
            format!("{valid}.{signature_b64}"),
            "malformed token",
        ),
    ];
    for (what, token, detail) in &cases {
        let before_events = security_events(&proxy).len();
        let answer = bearer(&proxy, token).await;
        assert_invalid(&answer, token, what);
        assert_eq!(upstream.count(), 1, "{what}: reached the upstream");
        let event = next_security_event(&proxy, before_events).await;
        assert_eq!(event["reason"], "invalid_token", "{what}: {event}");
        let got = event["detail"].as_str().unwrap_or_default();
        assert!(
            detail.split('|').any(|d| d == got),
            "{what}: expected detail {detail}, got {event}"
        );
        let line = event.to_string();
        assert!(
            !line.contains(token.as_str()),
            "{what}: the event holds the token"
        );
    }

    // A 20 KB token: refused as too large, either by the verifier (401) or as
    // a request head over max_header_bytes (431).
    let huge = hs256(&with(json!({ "pad": "x".repeat(20 * 1024) })));
    assert!(huge.len() > 20 * 1024);
    let answer = bearer(&proxy, &huge).await;
    match answer.status.as_u16() {
        401 => assert_invalid(&answer, &huge, "20 KB token"),
        431 => assert!(!answer.text().contains(&huge)),
        other => panic!("20 KB token: expected 401 or 431, got {other}"),
    }
    assert_eq!(upstream.count(), 1, "20 KB token reached the upstream");
    assert!(
        !proxy
            .stdout
            .lock()
            .unwrap()
            .join("\n")
            .contains(&signature_b64),
        "stdout carries a token's signature"
    );
}

#[tokio::test]
async fn alg_confusion_rsa_public_key_as_hmac_secret_is_refused() {
    let upstream = Upstream::start().await;
    let dir = KeyDir::new();
    let rsa = TestKey::rsa();
    let pem = dir.write("rsa-public.pem", &rsa.public_pem);
    let forged = sign_hmac(Algorithm::HS256, rsa.public_pem.as_bytes(), &claims());

    // RS256 only: HS256 is not on the list, refused before any key is used.
    let jwt = format!(
        "algorithms = [\"RS256\"]\npublic_key = \"{}\"",
        pem.display()
    );
    let proxy = start(&upstream, &jwt, ADMIN).await;
    assert_accepted(
        &bearer(&proxy, &rsa.token(None, &claims())).await,
        &upstream,
        0,
        "alice",
        "RS256",
    );
    let before = security_events(&proxy).len();
    assert_invalid(
        &bearer(&proxy, &forged).await,
        &forged,
        "HS256 with the PEM",
    );
    let event = next_security_event(&proxy, before).await;
    assert_eq!(event["detail"], "algorithm not allowed", "{event}");
    assert_eq!(upstream.count(), 1);
    drop(proxy);

    // HS256 and RS256 both listed: an HS256 token is checked with the
    // configured secret only, never with the public key.
    let jwt = format!(
        "algorithms = [\"RS256\", \"HS256\"]\npublic_key = \"{}\"",
        pem.display()
    );
    let proxy = start(&upstream, &jwt, ADMIN).await;
    assert_accepted(
        &bearer(&proxy, &hs256(&claims())).await,
        &upstream,
        1,
        "alice",
        "HS256 with the secret",
    );
    let before = security_events(&proxy).len();
    assert_invalid(
        &bearer(&proxy, &forged).await,
        &forged,
        "HS256 with the PEM (mixed)",
    );
    let event = next_security_event(&proxy, before).await;
    assert_eq!(event["detail"], "bad signature", "{event}");
    assert_eq!(upstream.count(), 2);
}

// ---------------------------------------------------------------------------
// Missing or unusable credentials
// ---------------------------------------------------------------------------

#[tokio::test]
async fn missing_or_unusable_credentials_are_401() {
    let upstream = Upstream::start().await;
    let proxy = start(
        &upstream,
        "algorithms = [\"HS256\"]\ntoken_cookie = \"access_token\"",
        ADMIN,
    )
    .await;
    let token = hs256(&claims());

    let answer = get(&proxy, "/admin", &[]).await;
    assert_refused(
        &answer,
        401,
        "missing_token",
        Some("Bearer"),
        "",
        "no token",
    );
    let event = proxy.wait_event(|e| e["reason"] == "missing_token").await;
    assert_eq!(event["path"], "/admin", "{event}");

    // The same, below the route's prefix and on HTTP/2.
    let answer = get(&proxy, "/admin/users/1", &[]).await;
    assert_refused(
        &answer,
        401,
        "missing_token",
        Some("Bearer"),
        "",
        "/admin/users/1",
    );
    let mut h2 = proxy.client().h2().await;
    let request = http::Request::builder()
        .uri(format!("https://localhost:{}/admin", proxy.https.port()))
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let answer = common::collect(h2.send_request(request).await.unwrap()).await;
    assert_refused(&answer, 401, "missing_token", Some("Bearer"), "", "HTTP/2");

    // Another scheme, or Bearer with nothing: 401, missing or invalid.
    let basic_token = format!("Basic {token}");
    for auth in [
        "Basic YWxpY2U6c2VjcmV0",
        "Bearer ",
        "Bearer",
        "Token abc",
        basic_token.as_str(),
    ] {
        let answer = get(&proxy, "/admin", &[("authorization", auth)]).await;
        assert_eq!(answer.status, 401, "{auth:?}: {}", answer.text());
        let code = answer.json()["error"].clone();
        assert!(
            code == "missing_token" || code == "invalid_token",
            "{auth:?}: {code}"
        );
        let www = answer.header("www-authenticate").unwrap_or_default();
        let expected = if code == "missing_token" {
            "Bearer"
        } else {
            INVALID
        };
        assert_eq!(www, expected, "{auth:?}");
        assert!(!answer.text().contains(&token), "{auth:?} echoed");
    }
    // An empty Bearer over the wire byte for byte (client libraries may
    // trim it).
    let raw = raw_get(&proxy, "/admin", &[("Authorization", "Bearer ")]).await;
    assert_eq!(raw.status, 401, "{}", raw.body);
    assert!(
        raw.header("www-authenticate")
            .unwrap()
            .starts_with("Bearer")
    );

    // A token in a cookie other than token_cookie counts as none.
    let cookie = format!("jwt={token}");
    let answer = get(&proxy, "/admin", &[("cookie", cookie.as_str())]).await;
    assert_refused(
        &answer,
        401,
        "missing_token",
        Some("Bearer"),
        &token,
        "other cookie",
    );

    assert_eq!(
        upstream.count(),
        0,
        "an unauthenticated request was forwarded"
    );
}

// ---------------------------------------------------------------------------
// Scopes
// ---------------------------------------------------------------------------

#[tokio::test]
async fn missing_scope_is_403_insufficient_scope_as_string_or_array() {
    let upstream = Upstream::start().await;
    let routes = "[[routes]]\npath = \"/admin\"\njwt = true\nscopes = [\"admin\"]\n\n\
                  [[routes]]\npath = \"/reports\"\njwt = true\nscopes = [\"read\", \"reports\"]\n";
    let proxy = start(&upstream, "algorithms = [\"HS256\"]", routes).await;
    let want_admin = r#"Bearer error="insufficient_scope", scope="admin""#;

    let refused = [
        (
            "scope string without admin",
            json!({ "scope": "read write" }),
        ),
        (
            "scope string, admin as a prefix",
            json!({ "scope": "administrator read" }),
        ),
        (
            "scp array without admin",
            json!({ "scope": null, "scp": ["read", "write"] }),
        ),
        ("no scope claim at all", json!({ "scope": null })),
    ];
    for (what, changes) in refused {
        let token = hs256(&claims_with(changes));
        let before = security_events(&proxy).len();
        let answer = bearer(&proxy, &token).await;
        assert_refused(
            &answer,
            403,
            "insufficient_scope",
            Some(want_admin),
            &token,
            what,
        );
        let event = next_security_event(&proxy, before).await;
        assert_eq!(event["reason"], "insufficient_scope", "{what}: {event}");
    }
    assert_eq!(
        upstream.count(),
        0,
        "a token without the scope was forwarded"
    );

    let accepted = [
        ("scope string with admin", json!({ "scope": "read admin" })),
        (
            "scp array with admin",
            json!({ "scope": null, "scp": ["admin"] }),
        ),
    ];
    for (i, (what, changes)) in accepted.into_iter().enumerate() {
        let token = hs256(&claims_with(changes));
        assert_accepted(&bearer(&proxy, &token).await, &upstream, i, "alice", what);
    }

    // Every listed scope is required.
    let token = hs256(&claims_with(json!({ "scope": "read" })));
    let auth = format!("Bearer {token}");
    let answer = get(&proxy, "/reports", &[("authorization", auth.as_str())]).await;
    assert_eq!(answer.status, 403, "{}", answer.text());
    assert_eq!(answer.json()["error"], "insufficient_scope");
    let www = answer.header("www-authenticate").unwrap();
    assert!(
        www.starts_with(r#"Bearer error="insufficient_scope", scope=""#) && www.contains("reports"),
        "{www}"
    );
    let token = hs256(&claims_with(
        json!({ "scope": null, "scp": ["reports", "read"] }),
    ));
    let auth = format!("Bearer {token}");
    let answer = get(&proxy, "/reports", &[("authorization", auth.as_str())]).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(upstream.count(), 3);
}

// ---------------------------------------------------------------------------
// Identity headers
// ---------------------------------------------------------------------------

/// Header names the upstream received that a WSGI/CGI app would read as
/// `X-Auth-Subject` or `X-Auth-Scope`, with their values.
fn identity_headers(recorded: &common::Recorded) -> Vec<(String, String)> {
    recorded
        .headers
        .iter()
        .filter(|(name, _)| {
            let n = name.as_str().to_ascii_lowercase().replace('_', "-");
            n == "x-auth-subject" || n == "x-auth-scope"
        })
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                v.to_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn client_sent_identity_headers_never_reach_the_upstream() {
    let upstream = Upstream::start().await;
    let routes = format!("{ADMIN}\n[[routes]]\npath = \"/public\"\n");
    let proxy = start(&upstream, "algorithms = [\"HS256\"]", &routes).await;
    let token = hs256(&claims());
    let auth = format!("Bearer {token}");
    let spoofs = [
        "X-Auth-Subject",
        "x-auth-subject",
        "X_Auth_Subject",
        "x_auth_subject",
        "X-AUTH-SUBJECT",
        "X-Auth_Subject",
        "X_Auth_Scope",
    ];

    for name in spoofs {
        // Public routes: a configured route without jwt, and no route at all.
        for path in ["/public", "/elsewhere"] {
            let before = upstream.count();
            let raw = raw_get(&proxy, path, &[(name, "mallory")]).await;
            assert_eq!(raw.status, 200, "{name} on {path}: {}", raw.body);
            assert_eq!(upstream.count(), before + 1);
            let seen = identity_headers(&upstream.last());
            assert!(
                seen.is_empty(),
                "{name} on {path} reached upstream: {seen:?}"
            );
        }
        // The protected route: only the verified values arrive.
        let before = upstream.count();
        let raw = raw_get(
            &proxy,
            "/admin",
            &[(name, "mallory"), ("Authorization", auth.as_str())],
        )
        .await;
        assert_eq!(raw.status, 200, "{name} on /admin: {}", raw.body);
        assert_eq!(upstream.count(), before + 1);
        let mut seen = identity_headers(&upstream.last());
        seen.sort();
        assert_eq!(
            seen,
            [
                ("x-auth-scope".to_string(), "read write".to_string()),
                ("x-auth-subject".to_string(), "alice".to_string()),
            ],
            "{name} on /admin"
        );
        // Without a token the spoofed header gets nowhere either.
        let before = upstream.count();
        let raw = raw_get(&proxy, "/admin", &[(name, "alice")]).await;
        assert_eq!(raw.status, 401);
        assert_eq!(raw.json()["error"], "missing_token");
        assert_eq!(upstream.count(), before);
    }

    // All spellings at once, on both kinds of route.
    let all: Vec<(&str, &str)> = spoofs.iter().map(|n| (*n, "mallory")).collect();
    let raw = raw_get(&proxy, "/public", &all).await;
    assert_eq!(raw.status, 200);
    assert!(identity_headers(&upstream.last()).is_empty());
    let mut with_auth = all.clone();
    with_auth.push(("Authorization", auth.as_str()));
    let raw = raw_get(&proxy, "/admin", &with_auth).await;
    assert_eq!(raw.status, 200);
    let subjects: Vec<_> = identity_headers(&upstream.last())
        .into_iter()
        .filter(|(n, _)| n == "x-auth-subject")
        .collect();
    assert_eq!(
        subjects,
        [("x-auth-subject".to_string(), "alice".to_string())]
    );
}

#[tokio::test]
async fn connection_naming_an_identity_header_does_not_stop_the_verified_value() {
    let upstream = Upstream::start().await;
    let proxy = start(&upstream, "algorithms = [\"HS256\"]", ADMIN).await;
    let auth = format!("Bearer {}", hs256(&claims()));

    for connection in [
        "X-Auth-Subject",
        "x-auth-subject, X-Auth-Scope",
        "keep-alive, X_Auth_Subject",
    ] {
        let before = upstream.count();
        // raw_get adds its own `Connection: close`; a second Connection
        // header is merged by the proxy as a list.
        let raw = raw_get(
            &proxy,
            "/admin",
            &[
                ("Authorization", auth.as_str()),
                ("Connection", connection),
                ("X-Auth-Subject", "mallory"),
            ],
        )
        .await;
        assert_eq!(raw.status, 200, "Connection: {connection}: {}", raw.body);
        assert_eq!(upstream.count(), before + 1);
        let seen = upstream.last();
        let subjects: Vec<_> = seen
            .headers
            .get_all("x-auth-subject")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        assert_eq!(subjects, ["alice"], "Connection: {connection}");
        assert_eq!(
            seen.headers.get("x-auth-scope").unwrap(),
            "read write",
            "Connection: {connection}"
        );
        assert!(
            seen.headers.get("connection").is_none_or(|v| !v
                .to_str()
                .unwrap()
                .to_ascii_lowercase()
                .contains("auth")),
            "the client's Connection list was passed on"
        );
    }
}

// ---------------------------------------------------------------------------
// jwks_url
// ---------------------------------------------------------------------------

/// An `https://` `jwks_url` is checked against the system's trusted roots:
/// a server whose certificate the proxy does not trust gives it no keys
/// (and the diagnostic says why); the same server trusted through
/// `SSL_CERT_FILE` (as OpenSSL-based tools honour it) does.
#[tokio::test]
async fn jwks_url_over_https_is_checked_against_the_trusted_roots() {
    let upstream = Upstream::start().await;
    let key = TestKey::p256();
    let dir = tempfile::tempdir().unwrap();
    let cert = common::make_cert(dir.path(), "jwks", &["localhost"]);
    let acceptor = {
        use rustls::pki_types::pem::PemObject as _;
        let chain = vec![cert.der.clone()];
        let key_pem = std::fs::read(&cert.key_path).unwrap();
        let private = rustls::pki_types::PrivateKeyDer::from_pem_slice(&key_pem).unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
    };
    let server = JwksServer::start_tls(jwks(&[key.jwk("k1")]), acceptor).await;
    assert!(
        server.url.starts_with("https://localhost:"),
        "{}",
        server.url
    );
    let token = key.token(Some("k1"), &claims());

    let untrusted = start(&upstream, &jwks_url_config(&server.url, "1h"), ADMIN).await;
    let answer = bearer(&untrusted, &token).await;
    assert_ne!(
        answer.status, 200,
        "a key from an untrusted server was used"
    );
    assert_eq!(upstream.count(), 0);
    let failed = eventually(Duration::from_secs(10), || {
        untrusted
            .stderr_text()
            .lines()
            .any(|l| l.contains("JWKS fetch failed") && l.contains("TLS"))
    })
    .await;
    assert!(
        failed,
        "no TLS failure logged:\n{}",
        untrusted.stderr_text()
    );
    drop(untrusted);

    let mut trusted_config = config(&jwks_url_config(&server.url, "1h"), ADMIN);
    trusted_config
        .env
        .push(("SSL_CERT_FILE".into(), cert.cert_path.display().to_string()));
    let trusted = Proxy::start(upstream.addr, trusted_config).await;
    let answer = bearer(&trusted, &token).await;
    assert_accepted(&answer, &upstream, 0, "alice", "k1 over https");
    assert!(server.hits() >= 1);
}

fn jwks_url_config(url: &str, refresh: &str) -> String {
    format!("algorithms = [\"ES256\"]\njwks_url = \"{url}\"\njwks_refresh = \"{refresh}\"")
}

#[tokio::test]
async fn jwks_url_key_published_after_start_is_accepted_on_first_use() {
    let upstream = Upstream::start().await;
    let (k1, k2) = (TestKey::p256(), TestKey::p256());
    let server = JwksServer::start(jwks(&[k1.jwk("k1")])).await;
    // Refresh far away: only the start fetch and the unknown-kid refetch
    // can pick up keys in this test.
    let proxy = start(&upstream, &jwks_url_config(&server.url, "1h"), ADMIN).await;

    let answer = bearer(&proxy, &k1.token(Some("k1"), &claims())).await;
    assert_accepted(&answer, &upstream, 0, "alice", "k1 from the start fetch");
    let after_start = server.hits();
    assert!(after_start >= 1);

    // Rotation: k2 is published after start and used at once.
    server.serve(jwks(&[k1.jwk("k1"), k2.jwk("k2")]));
    let bob = claims_with(json!({ "sub": "bob" }));
    let answer = bearer(&proxy, &k2.token(Some("k2"), &bob)).await;
    assert_accepted(&answer, &upstream, 1, "bob", "k2 published after start");
    assert_eq!(
        server.hits(),
        after_start + 1,
        "one refetch for the new kid"
    );

    // The allowance is spent: more unknown kids this minute are refused
    // without fetching again.
    for kid in ["k3", "k4", "k5"] {
        let token = k2.token(Some(kid), &claims());
        assert_invalid(&bearer(&proxy, &token).await, &token, kid);
    }
    assert_eq!(
        server.hits(),
        after_start + 1,
        "unknown kids refetched again"
    );
    // Both published keys keep working.
    assert_accepted(
        &bearer(&proxy, &k1.token(Some("k1"), &claims())).await,
        &upstream,
        2,
        "alice",
        "k1 after rotation",
    );
    assert_accepted(
        &bearer(&proxy, &k2.token(Some("k2"), &claims())).await,
        &upstream,
        3,
        "alice",
        "k2 again",
    );
    server.stop().await;
}

#[tokio::test]
async fn jwks_url_down_at_refresh_keeps_the_last_good_keys() {
    let upstream = Upstream::start().await;
    let k1 = TestKey::p256();
    let server = JwksServer::start(jwks(&[k1.jwk("k1")])).await;
    let proxy = start(&upstream, &jwks_url_config(&server.url, "1s"), ADMIN).await;

    let token = k1.token(Some("k1"), &claims());
    assert_accepted(&bearer(&proxy, &token).await, &upstream, 0, "alice", "k1");
    // Refreshes run every second.
    let refreshed = eventually(Duration::from_secs(10), || server.hits() >= 2).await;
    assert!(refreshed, "no refresh within 10 s (hits {})", server.hits());

    server.stop().await;
    // Wait for two refreshes to fail (the proxy logs each on stderr), so
    // the keys have outlived more than one failure.
    let failures = || proxy.stderr_text().matches("JWKS fetch failed").count();
    let failed = eventually(Duration::from_secs(10), || failures() >= 2).await;
    assert!(
        failed,
        "no failed refreshes logged; stderr:\n{}",
        proxy.stderr_text()
    );

    let answer = bearer(&proxy, &k1.token(Some("k1"), &claims())).await;
    assert_accepted(
        &answer,
        &upstream,
        1,
        "alice",
        "k1 with the JWKS server down",
    );
    assert!(
        !proxy.stderr_text().contains(&token),
        "stderr carries the token"
    );
}

#[tokio::test]
async fn jwks_url_refresh_replaces_the_whole_key_set() {
    let upstream = Upstream::start().await;
    let (k1, k2) = (TestKey::p256(), TestKey::p256());
    let server = JwksServer::start(jwks(&[k1.jwk("k1")])).await;
    let proxy = start(&upstream, &jwks_url_config(&server.url, "1s"), ADMIN).await;
    assert_accepted(
        &bearer(&proxy, &k1.token(Some("k1"), &claims())).await,
        &upstream,
        0,
        "alice",
        "k1",
    );

    // k1 is withdrawn: after the next refresh has completed (the one after
    // it has started, since fetches never overlap), k1 stops verifying.
    server.serve(jwks(&[k2.jwk("k2")]));
    let changed_at = server.hits();
    assert!(eventually(Duration::from_secs(10), || server.hits() >= changed_at + 2).await);
    assert_rotated(&proxy, &upstream, &k1, &k2, "after a refresh").await;
    server.stop().await;
}

/// k1 has been withdrawn for k2, and the upstream has had one request:
/// a k1 token is refused, a k2 token accepted.
async fn assert_rotated(
    proxy: &Proxy,
    upstream: &Upstream,
    k1: &TestKey,
    k2: &TestKey,
    when: &str,
) {
    let token = k1.token(Some("k1"), &claims());
    assert_invalid(&bearer(proxy, &token).await, &token, &format!("k1 {when}"));
    assert_accepted(
        &bearer(proxy, &k2.token(Some("k2"), &claims())).await,
        upstream,
        1,
        "alice",
        &format!("k2 {when}"),
    );
}

#[tokio::test]
async fn a_reload_refetches_jwks_url_at_once_and_forgets_verified_tokens() {
    let upstream = Upstream::start().await;
    let (k1, k2) = (TestKey::p256(), TestKey::p256());
    let server = JwksServer::start(jwks(&[k1.jwk("k1")])).await;
    let proxy = start(&upstream, &jwks_url_config(&server.url, "1h"), ADMIN).await;
    let token = k1.token(Some("k1"), &claims());
    assert_accepted(&bearer(&proxy, &token).await, &upstream, 0, "alice", "k1");

    // k1 is withdrawn; with the next refresh an hour away, only a reload
    // makes the proxy see it at once. The file is unchanged.
    server.serve(jwks(&[k2.jwk("k2")]));
    let before = server.hits();
    proxy.signal("HUP");
    let refetched = eventually(Duration::from_secs(10), || server.hits() > before).await;
    assert!(
        refetched,
        "no fetch after the reload; stderr:\n{}",
        proxy.stderr_text()
    );
    assert!(
        eventually(Duration::from_secs(10), || proxy
            .stderr_text()
            .contains("configuration reloaded"))
        .await
    );
    // k1 was verified (and cached) a moment ago.
    assert_rotated(&proxy, &upstream, &k1, &k2, "after the reload").await;
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Path bypass
// ---------------------------------------------------------------------------

#[tokio::test]
async fn other_spellings_of_a_protected_path_are_protected_too() {
    let upstream = Upstream::start().await;
    let proxy = start(&upstream, "algorithms = [\"HS256\"]", ADMIN).await;
    let targets = [
        "/admin",
        "/public/../admin",
        "/%61dmin",
        "/%61%64%6D%69%6E",
        "//admin",
        "/./admin",
        "/admin;x=1",
        "/admin/",
        "/admin/./users",
        "/public/../admin;jsessionid=1/users",
    ];
    for target in targets {
        let raw = raw_get(&proxy, target, &[]).await;
        assert_eq!(raw.status, 401, "{target}: {}", raw.body);
        assert_eq!(raw.json()["error"], "missing_token", "{target}");
        assert_eq!(raw.header("www-authenticate"), Some("Bearer"), "{target}");
        assert_eq!(upstream.count(), 0, "{target} was forwarded");
    }
    // With an expired token each is invalid_token, not forwarded either.
    let expired = format!(
        "Bearer {}",
        hs256(&claims_with(json!({ "exp": now() - 3600 })))
    );
    for target in targets {
        let raw = raw_get(&proxy, target, &[("Authorization", expired.as_str())]).await;
        assert_eq!(raw.status, 401, "{target}: {}", raw.body);
        assert_eq!(raw.json()["error"], "invalid_token", "{target}");
        assert_eq!(raw.header("www-authenticate"), Some(INVALID), "{target}");
    }
    assert_eq!(upstream.count(), 0);

    // With a valid token they pass, and the upstream sees the judged path.
    let auth = format!("Bearer {}", hs256(&claims()));
    for (target, seen) in [
        ("/public/../admin", "/admin"),
        ("/%61dmin", "/admin"),
        ("//admin", "/admin"),
    ] {
        let before = upstream.count();
        let raw = raw_get(&proxy, target, &[("Authorization", auth.as_str())]).await;
        assert_eq!(raw.status, 200, "{target}: {}", raw.body);
        assert_eq!(upstream.count(), before + 1);
        assert_eq!(upstream.last().target, seen, "{target}");
        assert_eq!(
            upstream.last().headers.get("x-auth-subject").unwrap(),
            "alice"
        );
    }
    // Names that only share a prefix are not the route.
    let raw = raw_get(&proxy, "/administrator", &[]).await;
    assert_eq!(raw.status, 200, "{}", raw.body);
}

// ---------------------------------------------------------------------------
// Security events
// ---------------------------------------------------------------------------

#[tokio::test]
async fn rejection_writes_a_security_event_without_the_token() {
    let upstream = Upstream::start().await;
    let proxy = start(&upstream, "algorithms = [\"HS256\"]", ADMIN).await;

    let expired = hs256(&claims_with(json!({ "exp": now() - 3600 })));
    let answer = bearer(&proxy, &expired).await;
    assert_invalid(&answer, &expired, "expired");
    let event = proxy.wait_event(|e| e["reason"] == "invalid_token").await;
    assert_eq!(event["path"], "/admin", "{event}");
    assert_eq!(event["route"], "/admin", "{event}");
    assert_eq!(event["detail"], "expired", "{event}");
    let line = event.to_string();
    for part in expired.split('.') {
        assert!(
            !line.contains(part),
            "the event holds part of the token: {line}"
        );
    }
    // Nor does the access line of that request, nor anything on stdout.
    let access = proxy
        .wait_event(|e| e["status"] == 401 && e.get("reason").is_none())
        .await;
    assert!(access["sub"].is_null(), "unverified sub logged: {access}");

    let token = hs256(&claims_with(json!({ "sub": "carol" })));
    let answer = bearer(&proxy, &token).await;
    assert_accepted(&answer, &upstream, 0, "carol", "valid");
    let access = proxy.wait_event(|e| e["sub"] == "carol").await;
    assert_eq!(access["status"], 200, "{access}");
    assert_eq!(access["path"], "/admin", "{access}");

    let stdout = proxy.stdout.lock().unwrap().join("\n");
    for t in [&expired, &token] {
        let signature = t.rsplit('.').next().unwrap();
        assert!(!stdout.contains(signature), "stdout carries a token");
    }
    // Nothing shaped like a JWT (a base64url `{"` opens every header).
    assert!(!stdout.contains("eyJ"), "{stdout}");
}
