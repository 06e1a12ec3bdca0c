//! SPEC route keys `csrf`, `allowed_origins`, `json_schema` and
//! `max_body_bytes` (issue 19), on real sockets over HTTP/1.1 and HTTP/2:
//! what a client sees for every rule, and — through the recording upstream
//! — that nothing of a refused request reached the app. A real browser's
//! side of CSRF is in `csrf_browser.rs`.

mod common;

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use tokio::io::AsyncWriteExt;

use common::{Answer, Proxy, Upstream, eventually, parse_responses};

const LISTED: &str = "https://partner.example";

const ORDER_SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["items"],
  "properties": {
    "items": {
      "type": "array",
      "minItems": 1,
      "items": {
        "type": "object",
        "required": ["sku", "qty"],
        "properties": {
          "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]+$"},
          "qty": {"type": "integer", "minimum": 1}
        }
      }
    },
    "password": {"type": "string", "minLength": 12}
  }
}"#;

async fn protected_proxy(upstream: &Upstream) -> Proxy {
    let rest = format!(
        "[[routes]]\npath = \"/form\"\ncsrf = true\nallowed_origins = [\"{LISTED}\", \"http://127.0.0.1:9\"]\n\n\
         [[routes]]\npath = \"/orders\"\njson_schema = \"order.json\"\nmax_body_bytes = \"4KiB\"\n\n\
         [[routes]]\npath = \"/both\"\ncsrf = true\njson_schema = \"order.json\"\n"
    );
    // The schema file must exist before the proxy loads its configuration:
    // start from a directory the harness then takes over.
    let dir = tempfile::tempdir().unwrap();
    let cert = common::make_cert(dir.path(), "cert", &["localhost", "127.0.0.1", "::1"]);
    std::fs::write(dir.path().join("order.json"), ORDER_SCHEMA).unwrap();
    let toml = format!(
        "[server]\nhttps_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nworkers = 2\n\n[tls]\ncert = \"cert.pem\"\nkey = \"cert.key\"\n\n[upstream]\nurl = \"http://{}\"\n\n[log]\nformat = \"json\"\nlevel = \"info\"\n\n{}\n",
        upstream.addr, rest
    );
    let config_path = dir.path().join("proxy.toml");
    std::fs::write(&config_path, toml).unwrap();
    Proxy::spawn(dir, cert, config_path, &[]).await
}

#[derive(Clone, Copy, Debug)]
enum Proto {
    H1,
    H2,
}

/// One request over a fresh connection of `proto`. Over HTTP/1.1 the Host
/// is `localhost:PORT`, over HTTP/2 the same is the `:authority`.
async fn send(
    proxy: &Proxy,
    proto: Proto,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let authority = format!("localhost:{}", proxy.https.port());
    match proto {
        Proto::H1 => {
            let mut all = vec![("host", authority.as_str())];
            all.extend_from_slice(headers);
            proxy
                .client()
                .request(method, path, &all, Bytes::from(body.to_owned()))
                .await
        }
        Proto::H2 => {
            let mut h2 = proxy.client().h2().await;
            let mut request = http::Request::builder()
                .method(method)
                .uri(format!("https://{authority}{path}"));
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let request = request
                .body(http_body_util::Full::new(Bytes::from(body.to_owned())))
                .unwrap();
            common::collect(h2.send_request(request).await.expect("HTTP/2 response")).await
        }
    }
}

fn assert_refused(answer: &Answer, status: u16, error: &str, what: &str) {
    assert_eq!(answer.status, status, "{what}: {}", answer.text());
    assert_eq!(answer.json()["error"], error, "{what}");
    assert!(
        answer.header("strict-transport-security").is_some(),
        "{what}: the proxy's own answer carries HSTS"
    );
}

// ---------------------------------------------------------------- CSRF

/// Method, headers, whether it passes, what it stands for.
type Case<'a> = (Method, Vec<(&'a str, &'a str)>, bool, &'a str);

#[tokio::test]
async fn csrf_follows_the_browser_signals_in_order_over_both_protocols() {
    let upstream = Upstream::start().await;
    let proxy = protected_proxy(&upstream).await;
    let own = format!("https://localhost:{}", proxy.https.port());
    let other_port = format!("https://localhost:{}", proxy.https.port() + 1);
    let plain_own = format!("http://localhost:{}", proxy.https.port());
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        (Method::GET, vec![("sec-fetch-site", "cross-site"), ("origin", "https://evil.example")], true, "safe method"),
        (Method::HEAD, vec![("sec-fetch-site", "cross-site")], true, "safe method"),
        (Method::OPTIONS, vec![("origin", "https://evil.example")], true, "safe method"),
        (Method::POST, vec![("sec-fetch-site", "same-origin"), ("origin", &own)], true, "same-origin"),
        (Method::POST, vec![("sec-fetch-site", "none")], true, "user-initiated"),
        (Method::POST, vec![("sec-fetch-site", "cross-site"), ("origin", "https://evil.example")], false, "cross-site"),
        (Method::POST, vec![("sec-fetch-site", "same-site"), ("origin", &other_port)], false, "same-site"),
        (Method::POST, vec![("sec-fetch-site", "cross-site"), ("origin", LISTED)], true, "cross-site, listed"),
        (Method::POST, vec![("sec-fetch-site", "cross-site"), ("origin", "https://PARTNER.example")], true, "listed, host case"),
        (Method::POST, vec![("sec-fetch-site", "cross-site"), ("origin", "https://partner.example:8443")], false, "listed host, other port"),
        (Method::POST, vec![("sec-fetch-site", "cross-site")], false, "cross-site without Origin"),
        (Method::POST, vec![], true, "no browser signal (curl)"),
        (Method::POST, vec![("origin", &own)], true, "old browser, own origin"),
        (Method::POST, vec![("origin", &plain_own)], false, "old browser, other scheme"),
        (Method::POST, vec![("origin", &other_port)], false, "old browser, other port"),
        (Method::POST, vec![("origin", "null")], false, "opaque origin"),
        (Method::PUT, vec![("origin", "https://evil.example")], false, "PUT"),
        (Method::DELETE, vec![("sec-fetch-site", "cross-site"), ("origin", "https://evil.example")], false, "DELETE"),
        (Method::PATCH, vec![("origin", "https://evil.example")], false, "PATCH"),
    ];
    for proto in [Proto::H1, Proto::H2] {
        for (method, headers, passes, what) in &cases {
            let what = format!("{proto:?} {method} {what}");
            let marker = format!("/form/{}", what.replace(' ', "-").replace(',', ""));
            let before = upstream.count();
            let answer = send(&proxy, proto, method.clone(), &marker, headers, "a=1").await;
            if *passes {
                assert_eq!(answer.status, 200, "{what}: {}", answer.text());
                assert_eq!(upstream.count(), before + 1, "{what}");
                assert_eq!(upstream.last().target, marker, "{what}");
            } else {
                assert_refused(&answer, 403, "csrf", &what);
                assert!(
                    !upstream.recorded().iter().any(|r| r.target == marker),
                    "{what}: the upstream saw a refused request"
                );
            }
        }
    }
    // A route without csrf is not judged.
    let answer = send(
        &proxy,
        Proto::H1,
        Method::POST,
        "/elsewhere",
        &[
            ("sec-fetch-site", "cross-site"),
            ("origin", "https://evil.example"),
        ],
        "",
    )
    .await;
    assert_eq!(answer.status, 200);
}

#[tokio::test]
async fn a_csrf_refusal_is_logged_with_the_origin_and_counted() {
    let upstream = Upstream::start().await;
    let proxy = protected_proxy(&upstream).await;
    let answer = send(
        &proxy,
        Proto::H1,
        Method::POST,
        "/form/transfer?amount=1000",
        &[
            ("sec-fetch-site", "cross-site"),
            ("origin", "https://evil.example"),
            ("cookie", "session=SECRET-COOKIE"),
        ],
        "to=mallory",
    )
    .await;
    assert_refused(&answer, 403, "csrf", "cross-site form");
    let event = proxy
        .wait_event(|e| e["reason"] == "csrf" && e["origin"] == "https://evil.example")
        .await;
    assert_eq!(event["path"], "/form/transfer");
    assert_eq!(event["route"], "/form");
    let text = proxy.stdout.lock().unwrap().join("\n");
    assert!(!text.contains("SECRET-COOKIE") && !text.contains("mallory") && !text.contains("1000"));
    let admin = proxy.admin.expect("admin listener");
    let (_, metrics) = common::plain_get(admin, "/metrics").await;
    assert!(
        metrics.contains("portcullis_rejections_total{reason=\"csrf\"} 1"),
        "{metrics}"
    );
}

// ---------------------------------------------------------------- schema

#[tokio::test]
async fn a_valid_body_is_forwarded_byte_for_byte_with_a_content_length() {
    let upstream = Upstream::start().await;
    let proxy = protected_proxy(&upstream).await;
    let body = r#"{ "items": [ {"sku": "ABC-1", "qty": 2} ],  "note": "é" }"#;
    for proto in [Proto::H1, Proto::H2] {
        let answer = send(
            &proxy,
            proto,
            Method::POST,
            "/orders",
            &[("content-type", "application/json; charset=utf-8")],
            body,
        )
        .await;
        assert_eq!(answer.status, 200, "{proto:?}: {}", answer.text());
        let seen = upstream.last();
        assert_eq!(seen.body, body.as_bytes(), "{proto:?}");
        assert_eq!(
            seen.headers.get("content-length").map(|v| v.as_bytes()),
            Some(body.len().to_string().as_bytes()),
            "{proto:?}"
        );
        assert!(seen.headers.get("transfer-encoding").is_none());
    }

    // Chunked in (HTTP/1.1), Content-Length out: the same bytes.
    let mut tls = proxy.client().connect(&[b"http/1.1"]).await;
    let (first, second) = body.split_at(20);
    let request = format!(
        "POST /orders/chunked HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/vnd.shop+json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{first}\r\n{:x}\r\n{second}\r\n0\r\n\r\n",
        first.len(),
        second.len()
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let (text, _) = common::read_until_closed(&mut tls, Duration::from_secs(10)).await;
    assert_eq!(
        parse_responses(&text).first().map(|r| r.status),
        Some(200),
        "{text}"
    );
    let seen = upstream.last();
    assert_eq!(seen.target, "/orders/chunked");
    assert_eq!(seen.body, body.as_bytes());
    assert_eq!(
        seen.headers.get("content-length").map(|v| v.as_bytes()),
        Some(body.len().to_string().as_bytes())
    );
    assert!(seen.headers.get("transfer-encoding").is_none());
}

#[tokio::test]
async fn an_invalid_body_gets_400_with_pointers_and_never_its_values() {
    let upstream = Upstream::start().await;
    let proxy = protected_proxy(&upstream).await;
    let body = r#"{"items":[{"sku":"hunter2-secret","qty":0}],"password":"hunter2"}"#;
    for proto in [Proto::H1, Proto::H2] {
        let before = upstream.count();
        let answer = send(
            &proxy,
            proto,
            Method::POST,
            "/orders",
            &[("content-type", "application/json")],
            body,
        )
        .await;
        assert_refused(&answer, 400, "schema", &format!("{proto:?}"));
        let json = answer.json();
        let details = json["details"].as_array().expect("details");
        let pointers: Vec<&str> = details
            .iter()
            .filter_map(|d| d["pointer"].as_str())
            .collect();
        assert!(pointers.contains(&"/items/0/qty"), "{json}");
        assert!(pointers.contains(&"/items/0/sku"), "{json}");
        assert!(pointers.contains(&"/password"), "{json}");
        assert!(details.iter().all(|d| d["message"].is_string()));
        assert!(!answer.text().contains("hunter2"), "{json}");
        assert_eq!(upstream.count(), before, "{proto:?}: the upstream saw it");
    }
    let event = proxy.wait_event(|e| e["reason"] == "schema").await;
    assert_eq!(event["route"], "/orders");
    let log = proxy.stdout.lock().unwrap().join("\n");
    assert!(!log.contains("hunter2"), "a body value reached the log");
}

#[tokio::test]
async fn what_is_not_json_gets_400_or_415_and_nothing_is_forwarded() {
    let upstream = Upstream::start().await;
    let proxy = protected_proxy(&upstream).await;
    for proto in [Proto::H1, Proto::H2] {
        let what = |s: &str| format!("{proto:?} {s}");
        let json = [("content-type", "application/json")];
        let answer = send(
            &proxy,
            proto,
            Method::POST,
            "/orders",
            &json,
            r#"{"items": [secret"#,
        )
        .await;
        assert_refused(&answer, 400, "schema", &what("malformed"));
        let message = answer.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            message.contains("not JSON") && message.contains("line 1"),
            "{message}"
        );
        assert!(!message.contains("secret"), "{message}");

        let form = [("content-type", "application/x-www-form-urlencoded")];
        let answer = send(&proxy, proto, Method::POST, "/orders", &form, "a=1").await;
        assert_refused(&answer, 415, "unsupported_media_type", &what("form"));
        let answer = send(
            &proxy,
            proto,
            Method::PUT,
            "/orders",
            &[],
            r#"{"items":[]}"#,
        )
        .await;
        assert_refused(
            &answer,
            415,
            "unsupported_media_type",
            &what("no content type"),
        );
        let answer = send(
            &proxy,
            proto,
            Method::POST,
            "/orders",
            &[("content-type", "text/json")],
            "{}",
        )
        .await;
        assert_refused(&answer, 415, "unsupported_media_type", &what("text/json"));
    }
    // Not UTF-8.
    let mut tls = proxy.client().connect(&[b"http/1.1"]).await;
    let mut request =
        b"POST /orders HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 6\r\nconnection: close\r\n\r\n".to_vec();
    request.extend_from_slice(b"\"\xff\xfe\"  ");
    tls.write_all(&request).await.unwrap();
    let (text, _) = common::read_until_closed(&mut tls, Duration::from_secs(10)).await;
    let answer = parse_responses(&text)
        .into_iter()
        .next()
        .expect("an answer");
    assert_eq!(answer.status, 400, "{text}");
    assert!(
        answer.json()["message"]
            .as_str()
            .unwrap_or_default()
            .contains("not UTF-8")
    );
    assert_eq!(upstream.count(), 0, "the upstream saw a refused body");
}

#[tokio::test]
async fn a_request_without_a_body_passes_a_schema_route_untouched() {
    let upstream = Upstream::start().await;
    let proxy = protected_proxy(&upstream).await;
    for proto in [Proto::H1, Proto::H2] {
        let answer = send(&proxy, proto, Method::GET, "/orders?page=2", &[], "").await;
        assert_eq!(answer.status, 200, "{proto:?}");
        assert_eq!(upstream.last().target, "/orders?page=2");
        let answer = send(&proxy, proto, Method::DELETE, "/orders/7", &[], "").await;
        assert_eq!(answer.status, 200, "{proto:?}");
        assert_eq!(upstream.last().body_len, 0);
    }
}

#[tokio::test]
async fn bodies_over_the_route_limit_get_413_before_or_as_they_cross_it() {
    let upstream = Upstream::start().await;
    let proxy = protected_proxy(&upstream).await;
    let json = [("content-type", "application/json")];
    // Declared above the limit: refused before a byte is read.
    let big = format!(r#"{{"items":[],"pad":"{}"}}"#, "x".repeat(5000));
    for proto in [Proto::H1, Proto::H2] {
        let answer = send(&proxy, proto, Method::POST, "/orders", &json, &big).await;
        assert_refused(&answer, 413, "body_too_large", &format!("{proto:?}"));
    }
    // A schema route without its own limit reads at most 1 MiB, whatever
    // the server-wide max_body_bytes (10 MiB here).
    let over_a_mib = format!(r#"{{"items":[],"pad":"{}"}}"#, "x".repeat(1 << 20));
    let answer = send(&proxy, Proto::H1, Method::POST, "/both", &json, &over_a_mib).await;
    assert_refused(&answer, 413, "body_too_large", "schema route default");
    let under = format!(
        r#"{{"items":[{{"sku":"ABC-1","qty":1}}],"pad":"{}"}}"#,
        "x".repeat(1000)
    );
    let answer = send(&proxy, Proto::H2, Method::POST, "/both", &json, &under).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(upstream.count(), 1);
    // Chunked: refused as soon as it crosses the limit, while the client is
    // still sending (the rest of the body is never sent).
    let mut tls = proxy.client().connect(&[b"http/1.1"]).await;
    let chunk = "y".repeat(3000);
    let request = format!(
        "POST /orders HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n{:x}\r\n{chunk}\r\n",
        chunk.len(),
        chunk.len()
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let (text, closed) = common::read_until_closed(&mut tls, Duration::from_secs(10)).await;
    let answer = parse_responses(&text)
        .into_iter()
        .next()
        .expect("an answer");
    assert_eq!(answer.status, 413, "{text}");
    assert_eq!(answer.json()["error"], "body_too_large");
    assert!(closed, "the connection is closed after a refused upload");
    assert_eq!(upstream.count(), 1);
}

#[tokio::test]
async fn csrf_runs_before_the_schema_and_the_schema_before_forwarding() {
    let upstream = Upstream::start().await;
    let proxy = protected_proxy(&upstream).await;
    let answer = send(
        &proxy,
        Proto::H2,
        Method::POST,
        "/both",
        &[
            ("origin", "https://evil.example"),
            ("content-type", "text/plain"),
        ],
        "not json",
    )
    .await;
    assert_refused(&answer, 403, "csrf", "CSRF first");
    let answer = send(
        &proxy,
        Proto::H2,
        Method::POST,
        "/both",
        &[("content-type", "text/plain")],
        "x",
    )
    .await;
    assert_refused(&answer, 415, "unsupported_media_type", "then the schema");
    assert_eq!(upstream.count(), 0);
}

// ---------------------------------------------------------------- configuration

fn check(dir: &std::path::Path, routes: &str) -> (i32, String) {
    common::make_cert(dir, "cert", &["localhost"]);
    let toml = format!(
        "[server]\nhttps_listen = \"127.0.0.1:0\"\n\n[tls]\ncert = \"cert.pem\"\nkey = \"cert.key\"\n\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n\n{routes}"
    );
    let path = dir.join("proxy.toml");
    std::fs::write(&path, toml).unwrap();
    let output = Command::new(common::BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run check");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn check_refuses_bad_origins_and_schemas_naming_key_line_and_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("schemas")).unwrap();
    std::fs::write(dir.path().join("schemas/order.json"), ORDER_SCHEMA).unwrap();
    let (code, err) = check(
        dir.path(),
        "[[routes]]\npath = \"/a\"\ncsrf = true\nallowed_origins = [\"https://app.example/\"]\n",
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("proxy.toml:14:") && err.contains("routes[0].allowed_origins[0]"),
        "{err}"
    );
    assert!(err.contains("trailing slash"), "{err}");
    for bad in [
        "https://*.example",
        "https://a.example?x",
        "app.example",
        "https://a.example/path",
    ] {
        let (code, err) = check(
            dir.path(),
            &format!("[[routes]]\npath = \"/a\"\ncsrf = true\nallowed_origins = [\"{bad}\"]\n"),
        );
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(err.contains("routes[0].allowed_origins[0]"), "{bad}: {err}");
    }
    let (code, err) = check(
        dir.path(),
        "[[routes]]\npath = \"/a\"\nallowed_origins = [\"https://a.example\"]\n",
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("csrf = true"), "{err}");

    let cases = [
        ("schemas/missing.json", None, "cannot read"),
        (
            "schemas/bad.json",
            Some("{ not json"),
            "not a JSON document",
        ),
        (
            "schemas/bad.json",
            Some(r#"{"type": "no-such-type"}"#),
            "not a valid schema",
        ),
        (
            "schemas/bad.json",
            Some(r#"{"$ref": "https://schemas.example.com/x.json"}"#),
            "never fetched",
        ),
    ];
    for (file, content, why) in cases {
        if let Some(content) = content {
            std::fs::write(dir.path().join(file), content).unwrap();
        }
        let (code, err) = check(
            dir.path(),
            &format!(
                "[[routes]]\npath = \"/ok\"\njson_schema = \"schemas/order.json\"\n\n[[routes]]\npath = \"/a\"\njson_schema = \"{file}\"\n"
            ),
        );
        assert_eq!(code, 2, "{file}: {err}");
        let expected = format!("routes[1].json_schema: {file}: ");
        assert!(
            err.contains("proxy.toml:17:") && err.contains(&expected),
            "{err}"
        );
        assert!(err.contains(why), "{why}: {err}");
    }
    let (code, err) = check(
        dir.path(),
        "[[routes]]\npath = \"/a\"\ncsrf = true\nallowed_origins = [\"https://app.example\", \"null\"]\njson_schema = \"schemas/order.json\"\n",
    );
    assert_eq!(code, 0, "{err}");
}

#[tokio::test]
async fn a_reload_with_a_broken_schema_keeps_the_running_one() {
    let upstream = Upstream::start().await;
    let proxy = protected_proxy(&upstream).await;
    let invalid = r#"{"items":[]}"#;
    let json = [("content-type", "application/json")];
    let answer = send(&proxy, Proto::H1, Method::POST, "/orders", &json, invalid).await;
    assert_refused(&answer, 400, "schema", "before the reload");

    std::fs::write(proxy.dir.path().join("order.json"), "{ broken").unwrap();
    proxy.signal("HUP");
    assert!(
        eventually(Duration::from_secs(10), || {
            let err = proxy.stderr_text();
            err.contains("reload rejected") && err.contains("json_schema: order.json")
        })
        .await,
        "no rejection logged; stderr:\n{}",
        proxy.stderr_text()
    );
    let answer = send(&proxy, Proto::H2, Method::POST, "/orders", &json, invalid).await;
    assert_refused(&answer, 400, "schema", "after the rejected reload");
    assert_eq!(upstream.count(), 0);
}
