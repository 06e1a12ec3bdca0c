//! Route `claims` (SPEC `[[routes]] claims`, the 403 `insufficient_claims`
//! in "Errors the proxy writes itself", its security event and rejection
//! metric), through the real binary over TLS, on HTTP/1.1 and HTTP/2; and
//! the `check` errors for a bad `claims` table.
//!
//! The rule semantics themselves (nested paths, quoted segments, arrays,
//! type-strict comparison, missing claims) are unit-tested in
//! src/policy/claims.rs; here each kind is seen once from the outside.

mod common;

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::{Answer, BIN, Proxy, ProxyConfig, Upstream, eventually};
use http::{Method, Request};
use http_body_util::Full;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const SECRET: &str = "claims-integration-test-secret-0123456789abcdef";
const HSTS: &str = "max-age=31536000; includeSubDomains";

const ROUTES: &str = r#"
[[routes]]
path = "/admin"
jwt = true
scopes = ["read"]
claims = { "realm_access.roles" = ["admin", "ops"], tenant = "acme", email_verified = true, '"https://example.com/tier"' = 2 }
"#;

fn token(claims: Value) -> String {
    let mut all = json!({
        "sub": "alice",
        "exp": SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 300,
        "scope": "read",
    });
    for (k, v) in claims.as_object().unwrap() {
        all[k] = v.clone();
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &all,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Claims that satisfy every rule of [`ROUTES`].
fn good() -> Value {
    json!({
        "realm_access": {"roles": ["user", "ops"]},
        "tenant": "acme",
        "email_verified": true,
        "https://example.com/tier": 2,
    })
}

/// `good()` with `claim` replaced (`null` removes it).
fn good_but(claim: &str, value: Value) -> Value {
    let mut claims = good();
    if value.is_null() {
        claims.as_object_mut().unwrap().remove(claim);
    } else {
        claims[claim] = value;
    }
    claims
}

async fn start(upstream: &Upstream) -> Proxy {
    Proxy::start(
        upstream.addr,
        ProxyConfig {
            rest: format!("[jwt]\nalgorithms = [\"HS256\"]\n{ROUTES}"),
            env: vec![("JWT_SECRET".into(), SECRET.into())],
            ..Default::default()
        },
    )
    .await
}

async fn h1_admin(proxy: &Proxy, token: &str) -> Answer {
    let auth = format!("Bearer {token}");
    proxy
        .client()
        .request(
            Method::GET,
            "/admin",
            &[("authorization", auth.as_str())],
            Bytes::new(),
        )
        .await
}

async fn h2_admin(proxy: &Proxy, token: &str) -> Answer {
    let mut sender = proxy.client().h2().await;
    let request = Request::builder()
        .uri(format!("https://localhost:{}/admin", proxy.https.port()))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    common::collect(sender.send_request(request).await.unwrap()).await
}

fn security_events(proxy: &Proxy) -> Vec<Value> {
    proxy
        .events()
        .into_iter()
        .filter(|e| e.get("reason").is_some())
        .collect()
}

fn assert_insufficient_claims(answer: &Answer, claim: &str, secret_value: &str, what: &str) {
    assert_eq!(answer.status, 403, "{what}: {}", answer.text());
    let body = answer.json();
    assert_eq!(body["error"], "insufficient_claims", "{what}: {body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(claim),
        "{what}: the message names the claim: {message}"
    );
    assert!(
        !answer.text().contains(secret_value),
        "{what}: the token's value {secret_value:?} leaked: {}",
        answer.text()
    );
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(answer.header("strict-transport-security"), Some(HSTS));
}

#[tokio::test]
async fn claims_that_hold_are_forwarded_on_http1_and_http2() {
    let upstream = Upstream::start().await;
    let proxy = start(&upstream).await;
    let accepted = [
        ("every rule holds", good()),
        (
            "a role array holding one accepted value",
            good_but("realm_access", json!({"roles": ["admin"]})),
        ),
        (
            "a role given as a single string",
            good_but("realm_access", json!({"roles": "ops"})),
        ),
    ];
    for (what, claims) in accepted {
        let token = token(claims);
        let before = upstream.count();
        let answer = h1_admin(&proxy, &token).await;
        assert_eq!(answer.status, 200, "h1, {what}: {}", answer.text());
        let answer = h2_admin(&proxy, &token).await;
        assert_eq!(answer.status, 200, "h2, {what}: {}", answer.text());
        assert_eq!(upstream.count(), before + 2, "{what}: both forwarded");
    }
}

#[tokio::test]
async fn a_failed_claim_is_403_naming_the_claim_never_its_value() {
    let upstream = Upstream::start().await;
    let proxy = start(&upstream).await;
    let refused = [
        (
            "no accepted role",
            "realm_access.roles",
            good_but("realm_access", json!({"roles": ["user", "guest-xyzzy"]})),
            "guest-xyzzy",
        ),
        (
            "another tenant",
            "tenant",
            good_but("tenant", json!("evilcorp-xyzzy")),
            "evilcorp-xyzzy",
        ),
        (
            "the tenant claim missing",
            "tenant",
            good_but("tenant", Value::Null),
            "acme",
        ),
        (
            "\"true\" is not true",
            "email_verified",
            good_but("email_verified", json!("true")),
            "\"true\"",
        ),
        (
            "\"2\" is not 2",
            "https://example.com/tier",
            good_but("https://example.com/tier", json!("2")),
            "\"2\"",
        ),
        (
            "a nested path through a string",
            "realm_access.roles",
            good_but("realm_access", json!("admin")),
            "xyzzy-never-sent",
        ),
    ];
    for (what, claim, claims, secret_value) in refused {
        let token = token(claims);
        let before = security_events(&proxy).len();
        let answer = h1_admin(&proxy, &token).await;
        assert_insufficient_claims(&answer, claim, secret_value, &format!("h1, {what}"));
        let answer = h2_admin(&proxy, &token).await;
        assert_insufficient_claims(&answer, claim, secret_value, &format!("h2, {what}"));
        let found = eventually(Duration::from_secs(10), || {
            security_events(&proxy).len() >= before + 2
        })
        .await;
        assert!(found, "{what}: no security events");
        for event in &security_events(&proxy)[before..] {
            assert_eq!(event["reason"], "insufficient_claims", "{what}: {event}");
            let line = event.to_string();
            assert!(
                !line.contains(secret_value) && !line.contains(&token),
                "{what}: the event leaks: {line}"
            );
        }
    }
    assert_eq!(upstream.count(), 0, "a refused token was forwarded");

    // Scopes run first: a token without the scope is insufficient_scope.
    let answer = h1_admin(&proxy, &token(json!({"scope": "write", "tenant": "x"}))).await;
    assert_eq!(answer.json()["error"], "insufficient_scope");

    let admin = proxy.admin.unwrap();
    let (status, metrics) = common::plain_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    let count = metrics
        .lines()
        .find(|l| l.starts_with("portcullis_rejections_total{reason=\"insufficient_claims\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(count, Some(12.0), "metrics:\n{metrics}");
}

fn check(routes: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    common::make_cert(dir.path(), "cert", &["localhost"]);
    let toml = format!(
        "[server]\nhttps_listen = \"127.0.0.1:0\"\n\n[tls]\ncert = \"cert.pem\"\nkey = \"cert.key\"\n\n\
         [upstream]\nurl = \"http://127.0.0.1:9\"\n\n[jwt]\nalgorithms = [\"HS256\"]\n{routes}"
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(&path)
        .env("JWT_SECRET", SECRET)
        .env_remove("PORTCULLIS_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn check_accepts_claims_and_refuses_bad_tables_with_line_and_column() {
    let (code, out) = check(ROUTES);
    assert_eq!(code, 0, "{out}");

    // The routes block starts on line 13 of the generated file.
    let bad = [
        (
            "[[routes]]\npath = \"/a\"\nclaims = { tenant = \"acme\" }\n",
            "proxy.toml:15:10: routes[0].claims: claims need jwt = true",
        ),
        (
            "[[routes]]\npath = \"/a\"\njwt = true\nclaims = { tenant = [] }\n",
            "proxy.toml:16:21: routes[0].claims.tenant: claim \"tenant\": an empty list",
        ),
        (
            "[[routes]]\npath = \"/a\"\njwt = true\nclaims = { tenant = { id = 1 } }\n",
            "proxy.toml:16:21: routes[0].claims.tenant: claim \"tenant\": expected a string, an integer, a boolean or a list of them, got table",
        ),
        (
            "[[routes]]\npath = \"/a\"\njwt = true\nclaims = { level = 1.5 }\n",
            "routes[0].claims.level: claim \"level\": expected a string, an integer, a boolean or a list of them, got float",
        ),
        (
            "[[routes]]\npath = \"/a\"\njwt = true\nclaims = { \"a..b\" = \"x\" }\n",
            "proxy.toml:16:10: routes[0].claims: claim \"a..b\": not a claim path",
        ),
        (
            "[[routes]]\npath = \"/a\"\njwt = true\nclaims = {}\n",
            "routes[0].claims: list at least one claim",
        ),
    ];
    for (routes, want) in bad {
        let (code, out) = check(routes);
        assert_eq!(code, 2, "{routes}: {out}");
        assert!(out.contains(want), "{routes}\nwant: {want}\ngot: {out}");
    }
}
