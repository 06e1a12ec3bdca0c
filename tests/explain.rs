//! `portcullis explain` (issue 25): it shares the pipeline's decision code,
//! so the same request through `explain` and through a running proxy must
//! get the same outcome. A table of requests goes both ways here and each
//! pair is compared (status and error code, or forwarded with the same
//! target); then `--expect` is run on a cases file that passes and on one
//! that does not, and `explain` is shown to need nothing running.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::{BIN, Proxy, ProxyConfig, Upstream};
use http::Method;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const SECRET: &str = "explain-integration-test-secret-0123456789abcdef";

fn routes() -> String {
    let schema = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/order.json");
    format!(
        r#"
[jwt]
algorithms = ["HS256"]

[[routes]]
path = "/admin"
methods = ["GET", "POST"]
jwt = true
scopes = ["admin"]
claims = {{ tenant = "acme" }}
rate_limit = {{ rate = "1000/s", burst = 1000, key = "sub" }}

[[routes]]
path = "/orders"
methods = ["POST"]
csrf = true
json_schema = "{schema}"

[[routes]]
path = "/api"
rate_limit = {{ rate = "1000/s", burst = 1000, key = "ip" }}
max_body_bytes = "16B"
"#
    )
}

fn token(claims: Value) -> String {
    let mut all = json!({
        "sub": "alice",
        "exp": SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 300,
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

struct Case {
    what: &'static str,
    method: Method,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    body: &'static str,
}

fn case(what: &'static str, method: Method, path: &'static str) -> Case {
    Case {
        what,
        method,
        path,
        headers: Vec::new(),
        body: "",
    }
}

impl Case {
    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
    fn bearer(self, claims: Value) -> Self {
        let value = format!("Bearer {}", token(claims));
        self.header("authorization", value)
    }
    fn body(mut self, body: &'static str) -> Self {
        self.body = body;
        self
    }
}

fn cases() -> Vec<Case> {
    let order = r#"{"items": [{"sku": "ABC-1", "qty": 2}]}"#;
    let json_type = ("content-type", "application/json");
    vec![
        case("no route", Method::GET, "/hello/../world//x"),
        case("encoded slash", Method::GET, "/admin%2Fx"),
        case("dot-dot above the root", Method::GET, "/../etc"),
        case("no token", Method::GET, "/admin"),
        case("not a bearer scheme", Method::GET, "/admin").header("authorization", "Basic YTpi"),
        case("bad signature", Method::GET, "/admin")
            .header("authorization", format!("Bearer {}x", token(json!({})))),
        case("no admin scope", Method::GET, "/admin/users")
            .bearer(json!({"scope": "read", "tenant": "acme"})),
        case("another tenant", Method::GET, "/admin/users")
            .bearer(json!({"scope": "admin", "tenant": "evil"})),
        case("all good", Method::GET, "/admin/users?page=2")
            .bearer(json!({"scope": "admin", "tenant": "acme"})),
        case("method not allowed", Method::DELETE, "/admin")
            .bearer(json!({"scope": "admin", "tenant": "acme"})),
        case(
            "path parameter on the route",
            Method::GET,
            "/admin;jsessionid=1",
        ),
        case("order from the site", Method::POST, "/orders")
            .header(json_type.0, json_type.1)
            .header("origin", "https://localhost")
            .body(order),
        case("order from elsewhere", Method::POST, "/orders")
            .header(json_type.0, json_type.1)
            .header("origin", "https://evil.example")
            .body(order),
        case("order not JSON", Method::POST, "/orders")
            .header("content-type", "text/plain")
            .body("two apples"),
        case("order against the schema", Method::POST, "/orders")
            .header(json_type.0, json_type.1)
            .body(r#"{"items": []}"#),
        case("order by GET", Method::GET, "/orders"),
        case("api body too large", Method::POST, "/api/x")
            .header("content-type", "text/plain")
            .body("0123456789abcdefg"),
        case("api small body", Method::POST, "/api/x")
            .header("content-type", "text/plain")
            .body("ok"),
    ]
}

/// `explain --json` for `case`, run as a user would.
fn explain(config: &Path, case: &Case, dir: &Path) -> Value {
    let mut command = Command::new(BIN);
    command
        .arg("explain")
        .arg("--config")
        .arg(config)
        .arg("--json")
        .arg(case.method.as_str())
        .arg(case.path)
        .env("JWT_SECRET", SECRET)
        .env_remove("PORTCULLIS_CONFIG");
    for (name, value) in &case.headers {
        command.arg("-H").arg(format!("{name}: {value}"));
    }
    if !case.body.is_empty() {
        let file = dir.join("body");
        std::fs::write(&file, case.body).unwrap();
        command.arg("--body-file").arg(file);
    }
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}: explain failed: {}",
        case.what,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {:?}", case.what, out.stdout))
}

#[tokio::test]
async fn explain_and_the_running_proxy_agree() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(
        upstream.addr,
        ProxyConfig {
            rest: routes(),
            env: vec![("JWT_SECRET".into(), SECRET.into())],
            ..Default::default()
        },
    )
    .await;
    let scratch = tempfile::tempdir().unwrap();
    let mut forwarded = 0;
    for case in cases() {
        let explained = explain(&proxy.config_path, &case, scratch.path());
        let outcome = &explained["outcome"];
        let headers: Vec<(&str, &str)> =
            case.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let before = upstream.count();
        let answer = proxy
            .client()
            .request(
                case.method.clone(),
                case.path,
                &headers,
                Bytes::from_static(case.body.as_bytes()),
            )
            .await;
        match outcome.get("forward").and_then(Value::as_str) {
            Some(target) => {
                forwarded += 1;
                assert_eq!(
                    answer.status,
                    200,
                    "{}: explain says forward {target}, the proxy answered {}",
                    case.what,
                    answer.text()
                );
                assert_eq!(upstream.count(), before + 1, "{}", case.what);
                let seen = upstream.last().target;
                let path = seen.split('?').next().unwrap();
                assert_eq!(
                    target.split('?').next().unwrap(),
                    path,
                    "{}: the upstream saw {seen}",
                    case.what
                );
            }
            None => {
                assert_eq!(
                    outcome["status"].as_u64(),
                    Some(u64::from(answer.status.as_u16())),
                    "{}: explain {outcome}, the proxy {} {}",
                    case.what,
                    answer.status,
                    answer.text()
                );
                assert_eq!(
                    outcome["error"],
                    answer.json()["error"],
                    "{}: explain {outcome}, the proxy {}",
                    case.what,
                    answer.text()
                );
                assert_eq!(upstream.count(), before, "{}: forwarded", case.what);
            }
        }
    }
    assert!(forwarded >= 4, "the table must forward some: {forwarded}");
}

#[test]
fn explain_reports_steps_and_redacts_secrets_without_anything_running() {
    let dir = tempfile::tempdir().unwrap();
    common::make_cert(dir.path(), "cert", &["localhost"]);
    let config = dir.path().join("proxy.toml");
    // Nothing listens on the upstream's port, nor on Redis's.
    let toml = format!(
        "[server]\nhttps_listen = \"127.0.0.1:0\"\n[tls]\ncert = \"cert.pem\"\nkey = \"cert.key\"\n\
         [upstream]\nurl = \"http://{}\"\n[redis]\nurl = \"redis://{}\"\n{}",
        common::dead_addr(),
        common::dead_addr(),
        routes()
    );
    std::fs::write(&config, toml).unwrap();
    let run = |args: &[&str]| {
        Command::new(BIN)
            .arg("explain")
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("JWT_SECRET", SECRET)
            .env_remove("PORTCULLIS_CONFIG")
            .output()
            .unwrap()
    };
    let good = token(json!({"scope": "admin", "tenant": "acme"}));
    let out = run(&[
        "GET",
        "https://shop.example.com/admin/users?api_key=s3cret-value",
        "--token",
        &good,
        "-H",
        "Cookie: session=c00kie-value",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "route        /admin",
        "method       passes",
        "jwt          passes",
        "rate limit   not decidable offline",
        "1000/s burst 1000 by sub, shared on Redis",
        "scopes       passes",
        "claims       passes",
        "outcome      forwarded as /admin/users?api_key=…",
        "host: shop.example.com",
        "x-auth-subject: alice",
        "authorization: <redacted>",
        "cookie: <redacted>",
        "strict-transport-security: max-age=31536000; includeSubDomains",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    for secret in ["s3cret-value", "c00kie-value", good.as_str()] {
        assert!(!text.contains(secret), "{secret} shown:\n{text}");
    }

    // --expect: one case file that passes, one with a wrong expectation.
    let cases = dir.path().join("cases.toml");
    std::fs::write(
        &cases,
        r#"
[[case]]
name = "needs a token"
request = "GET /admin"
expect = { status = 401, error = "missing_token" }

[[case]]
name = "admin of acme"
request = "GET /admin/x"
token = { sub = "bob", scope = "admin", tenant = "acme" }
expect = { forward = "/admin/x" }
"#,
    )
    .unwrap();
    let out = run(&["--expect", cases.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("2 passed, 0 failed"), "{text}");

    std::fs::write(
        &cases,
        r#"
[[case]]
name = "wrongly expected to pass"
request = "GET /admin"
expect = { forward = "/admin" }

[[case]]
request = "GET /elsewhere"
expect = { forward = "/elsewhere" }
"#,
    )
    .unwrap();
    let out = run(&["--expect", cases.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAIL  wrongly expected to pass: GET /admin → 401 missing_token, expected forward /admin"),
        "{text}"
    );
    assert!(text.contains("ok    case 2"), "{text}");
    assert!(text.contains("1 passed, 1 failed"), "{text}");
}
