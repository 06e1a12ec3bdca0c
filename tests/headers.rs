//! SPEC "What a client sees" → HSTS, Cookies, and `[hsts]` / `[cookies]` /
//! `[headers]`: the response filters every HTTPS response goes through,
//! the proxy's own errors included.

mod common;

use bytes::Bytes;
use common::{Answer, Proxy, ProxyConfig, Upstream, dead_addr};
use portcullis::cmd::mock_upstream;

const HSTS_DEFAULT: &str = "max-age=31536000; includeSubDomains";

fn with_rest(rest: &str) -> ProxyConfig {
    ProxyConfig {
        rest: rest.into(),
        ..Default::default()
    }
}

/// Every value of a header, in order.
fn all<'a>(answer: &'a Answer, name: &str) -> Vec<&'a str> {
    answer
        .headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().expect("header is text"))
        .collect()
}

/// The only value of `name`; fails when it is missing or repeated.
fn one<'a>(answer: &'a Answer, name: &str) -> &'a str {
    let values = all(answer, name);
    assert_eq!(values.len(), 1, "{name}: {values:?}");
    values[0]
}

/// A Set-Cookie's `name=value` and its attributes (name lower-cased, value trimmed).
fn cookie(set_cookie: &str) -> (String, Vec<(String, String)>) {
    let mut parts = set_cookie.split(';');
    let pair = parts.next().unwrap_or("").trim().to_string();
    let attributes = parts
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| match a.split_once('=') {
            Some((n, v)) => (n.trim().to_ascii_lowercase(), v.trim().to_string()),
            None => (a.to_ascii_lowercase(), String::new()),
        })
        .collect();
    (pair, attributes)
}

fn count(attributes: &[(String, String)], name: &str) -> usize {
    attributes.iter().filter(|(n, _)| n == name).count()
}

fn same_site(attributes: &[(String, String)]) -> Vec<&str> {
    attributes
        .iter()
        .filter(|(n, _)| n == "samesite")
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Asks the upstream for the given Set-Cookie values (one per element) and
/// returns the Set-Cookie values the client got.
async fn set_cookies(proxy: &Proxy, cookies: &[&str]) -> Vec<String> {
    let query: Vec<String> = cookies.iter().map(|c| encode(c)).collect();
    let answer = proxy
        .client()
        .get(&format!("/set-cookie?{}", query.join("&")))
        .await;
    assert_eq!(answer.status, 200);
    all(&answer, "set-cookie")
        .into_iter()
        .map(str::to_string)
        .collect()
}

/// Percent-encodes everything but unreserved characters and `=`.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~=".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// ---------------------------------------------------------------- HSTS

#[tokio::test]
async fn hsts_on_a_200_an_upstream_404_and_the_proxys_502() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let client = proxy.client();

    let ok = client.get("/").await;
    assert_eq!(ok.status, 200);
    assert_eq!(one(&ok, "strict-transport-security"), HSTS_DEFAULT);

    let not_found = client.get("/status/404").await;
    assert_eq!(not_found.status, 404);
    assert_eq!(upstream.last().target, "/status/404");
    assert_eq!(one(&not_found, "strict-transport-security"), HSTS_DEFAULT);

    let down = Proxy::start(dead_addr(), ProxyConfig::default()).await;
    let bad_gateway = down.client().get("/").await;
    assert_eq!(bad_gateway.status, 502);
    assert_eq!(bad_gateway.json()["error"], "upstream_unreachable");
    assert_eq!(one(&bad_gateway, "strict-transport-security"), HSTS_DEFAULT);
    // The proxy's own errors get the security headers too.
    assert_eq!(one(&bad_gateway, "x-content-type-options"), "nosniff");
    assert_eq!(one(&bad_gateway, "x-frame-options"), "DENY");
}

/// SPEC: "every HTTPS response, including the proxy's own errors". The
/// answers hyper writes itself, before the pipeline sees a request (a head
/// that does not parse, conflicting Content-Lengths, a head over the parser's
/// buffer), are bare: no HSTS, no security headers, no JSON body.
#[tokio::test]
#[ignore = "known limitation (README, Deviations): hyper writes its own bare 400/431 for heads it cannot parse"]
async fn hsts_on_the_errors_hyper_writes_itself() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let huge = "x".repeat(64 * 1024);
    for head in [
        "GET / HTTP/1.1\r\nHost: localhost\r\nNot A Header\r\n\r\n".to_string(),
        "GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
            .to_string(),
        format!("GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {huge}\r\n\r\n"),
    ] {
        let (text, _) = proxy
            .client()
            .raw_until_closed(head.as_bytes(), std::time::Duration::from_secs(10))
            .await;
        let responses = common::parse_responses(&text);
        assert_eq!(responses.len(), 1, "{text}");
        assert!(responses[0].status >= 400, "{text}");
        assert_eq!(
            responses[0].header("strict-transport-security"),
            Some(HSTS_DEFAULT),
            "{text}"
        );
    }
    assert_eq!(upstream.count(), 0);
}

#[tokio::test]
async fn hsts_on_the_proxys_other_errors() {
    let upstream = Upstream::start().await;
    let config = ProxyConfig {
        server: "max_header_bytes = \"4KiB\"\nmax_body_bytes = \"1KiB\"".into(),
        ..Default::default()
    };
    let proxy = Proxy::start(upstream.addr, config).await;
    let big = "x".repeat(5000);
    for (head, status) in [
        (
            "GET /a%2Fb HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".to_string(),
            400,
        ),
        (
            "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n"
                .to_string(),
            413,
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {big}\r\nConnection: close\r\n\r\n"),
            431,
        ),
    ] {
        let (text, _) = proxy
            .client()
            .raw_until_closed(head.as_bytes(), std::time::Duration::from_secs(10))
            .await;
        let responses = common::parse_responses(&text);
        assert_eq!(responses.len(), 1, "{text}");
        assert_eq!(responses[0].status, status, "{text}");
        assert_eq!(
            responses[0].header("strict-transport-security"),
            Some(HSTS_DEFAULT),
            "{text}"
        );
        assert_eq!(
            responses[0].header("x-content-type-options"),
            Some("nosniff")
        );
    }
    assert_eq!(upstream.count(), 0);
}

#[tokio::test]
async fn hsts_on_an_http2_response() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let mut h2 = proxy.client().h2().await;
    let request = http::Request::builder()
        .uri(format!("https://localhost:{}/h2", proxy.https.port()))
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let answer = common::collect(h2.send_request(request).await.unwrap()).await;
    assert_eq!(answer.status, 200);
    assert_eq!(one(&answer, "strict-transport-security"), HSTS_DEFAULT);
}

#[tokio::test]
async fn hsts_preload_and_no_subdomains_as_configured() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(
        upstream.addr,
        with_rest("[hsts]\nmax_age = 600\ninclude_subdomains = false\npreload = true\n"),
    )
    .await;
    let answer = proxy.client().get("/").await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        one(&answer, "strict-transport-security"),
        "max-age=600; preload"
    );

    // preload alone keeps the default max-age and includeSubDomains.
    let proxy = Proxy::start(upstream.addr, with_rest("[hsts]\npreload = true\n")).await;
    let answer = proxy.client().get("/").await;
    assert_eq!(
        one(&answer, "strict-transport-security"),
        "max-age=31536000; includeSubDomains; preload"
    );
}

#[tokio::test]
async fn hsts_disabled_is_absent_everywhere() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, with_rest("[hsts]\nenabled = false\n")).await;
    let answer = proxy.client().get("/").await;
    assert_eq!(answer.status, 200);
    assert!(answer.headers.get("strict-transport-security").is_none());

    let down = Proxy::start(dead_addr(), with_rest("[hsts]\nenabled = false\n")).await;
    let answer = down.client().get("/").await;
    assert_eq!(answer.status, 502);
    assert!(answer.headers.get("strict-transport-security").is_none());
}

// ---------------------------------------------------------------- cookies

#[tokio::test]
async fn cookies_get_secure_httponly_and_samesite_lax() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let got = set_cookies(&proxy, &["id=abc; Path=/"]).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let (pair, attributes) = cookie(&got[0]);
    assert_eq!(pair, "id=abc");
    assert_eq!(count(&attributes, "path"), 1, "{got:?}");
    assert_eq!(count(&attributes, "secure"), 1, "{got:?}");
    assert_eq!(count(&attributes, "httponly"), 1, "{got:?}");
    assert_eq!(same_site(&attributes), ["Lax"], "{got:?}");
}

#[tokio::test]
async fn attributes_already_present_are_not_duplicated_whatever_their_case() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let got = set_cookies(&proxy, &["id=abc; secure; HTTPONLY"]).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let (pair, attributes) = cookie(&got[0]);
    assert_eq!(pair, "id=abc");
    assert_eq!(count(&attributes, "secure"), 1, "{got:?}");
    assert_eq!(count(&attributes, "httponly"), 1, "{got:?}");
    assert_eq!(same_site(&attributes), ["Lax"], "{got:?}");
    // The upstream's own spelling is passed on.
    assert!(got[0].starts_with("id=abc; secure; HTTPONLY"), "{got:?}");

    let got = set_cookies(&proxy, &["id=abc; SECURE; httponly; samesite=lax"]).await;
    assert_eq!(got, ["id=abc; SECURE; httponly; samesite=lax"]);
}

#[tokio::test]
async fn an_upstream_samesite_strict_is_kept() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let got = set_cookies(&proxy, &["id=abc; SameSite=Strict"]).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let (_, attributes) = cookie(&got[0]);
    assert_eq!(same_site(&attributes), ["Strict"], "{got:?}");
    assert_eq!(count(&attributes, "secure"), 1, "{got:?}");
    assert_eq!(count(&attributes, "httponly"), 1, "{got:?}");
}

#[tokio::test]
async fn samesite_none_gains_secure_even_with_secure_false() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, with_rest("[cookies]\nsecure = false\n")).await;
    let got = set_cookies(&proxy, &["plain=1", "cross=1; SameSite=None"]).await;
    assert_eq!(got.len(), 2, "{got:?}");
    // secure = false is respected where SameSite is not None...
    let (pair, plain) = cookie(&got[0]);
    assert_eq!(pair, "plain=1");
    assert_eq!(count(&plain, "secure"), 0, "{got:?}");
    assert_eq!(count(&plain, "httponly"), 1, "{got:?}");
    assert_eq!(same_site(&plain), ["Lax"], "{got:?}");
    // ...but SameSite=None always comes with Secure.
    let (pair, cross) = cookie(&got[1]);
    assert_eq!(pair, "cross=1");
    assert_eq!(same_site(&cross), ["None"], "{got:?}");
    assert_eq!(count(&cross, "secure"), 1, "{got:?}");
}

#[tokio::test]
async fn configured_samesite_none_brings_secure_with_secure_false() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(
        upstream.addr,
        with_rest("[cookies]\nsecure = false\nhttp_only = false\nsame_site = \"None\"\n"),
    )
    .await;
    let got = set_cookies(&proxy, &["id=abc"]).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let (_, attributes) = cookie(&got[0]);
    assert_eq!(same_site(&attributes), ["None"], "{got:?}");
    assert_eq!(count(&attributes, "secure"), 1, "{got:?}");
    assert_eq!(count(&attributes, "httponly"), 0, "{got:?}");
}

#[tokio::test]
async fn samesite_keep_adds_none() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(
        upstream.addr,
        with_rest("[cookies]\nsame_site = \"keep\"\n"),
    )
    .await;
    let got = set_cookies(&proxy, &["id=abc", "other=2; SameSite=Strict"]).await;
    assert_eq!(got.len(), 2, "{got:?}");
    let (_, first) = cookie(&got[0]);
    assert!(same_site(&first).is_empty(), "{got:?}");
    assert_eq!(count(&first, "secure"), 1, "{got:?}");
    assert_eq!(count(&first, "httponly"), 1, "{got:?}");
    let (_, second) = cookie(&got[1]);
    assert_eq!(same_site(&second), ["Strict"], "{got:?}");
}

#[tokio::test]
async fn two_set_cookie_headers_in_one_response_are_both_rewritten() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let got = set_cookies(
        &proxy,
        &["session=s1; Path=/", "theme=dark; Max-Age=60; Secure"],
    )
    .await;
    assert_eq!(got.len(), 2, "{got:?}");
    let names: Vec<String> = got.iter().map(|c| cookie(c).0).collect();
    assert_eq!(names, ["session=s1", "theme=dark"]);
    for set_cookie in &got {
        let (_, attributes) = cookie(set_cookie);
        assert_eq!(count(&attributes, "secure"), 1, "{set_cookie}");
        assert_eq!(count(&attributes, "httponly"), 1, "{set_cookie}");
        assert_eq!(same_site(&attributes), ["Lax"], "{set_cookie}");
    }
}

// ---------------------------------------------------------------- [headers]

#[tokio::test]
async fn default_security_headers_are_added_and_server_headers_removed() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let answer = proxy.client().get("/").await;
    common::assert_echo(&answer, "/", "the default answer");
    assert_eq!(one(&answer, "x-content-type-options"), "nosniff");
    assert_eq!(one(&answer, "x-frame-options"), "DENY");
    assert_eq!(
        one(&answer, "referrer-policy"),
        "strict-origin-when-cross-origin"
    );
    // The mock upstream sends both on every answer.
    assert!(
        answer.headers.get("server").is_none(),
        "{:?}",
        answer.headers
    );
    assert!(
        answer.headers.get("x-powered-by").is_none(),
        "{:?}",
        answer.headers
    );
}

#[tokio::test]
async fn an_upstream_value_for_an_add_header_is_kept() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let answer = proxy
        .client()
        .get("/headers?X-Frame-Options=SAMEORIGIN&Referrer-Policy=no-referrer")
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(one(&answer, "x-frame-options"), "SAMEORIGIN");
    assert_eq!(one(&answer, "referrer-policy"), "no-referrer");
    // The one the upstream did not set is still added.
    assert_eq!(one(&answer, "x-content-type-options"), "nosniff");
}

#[tokio::test]
async fn set_replaces_the_upstream_value() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(
        upstream.addr,
        with_rest(
            "[headers]\nset = { \"X-Frame-Options\" = \"DENY\", \"Cache-Control\" = \"no-store\" }\n",
        ),
    )
    .await;
    let answer = proxy
        .client()
        .get("/headers?X-Frame-Options=ALLOWALL&Cache-Control=public%2C%20max-age%3D60&Cache-Control=immutable")
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(one(&answer, "x-frame-options"), "DENY");
    assert_eq!(one(&answer, "cache-control"), "no-store");
    // The keys left out of [headers] keep their defaults.
    assert_eq!(one(&answer, "x-content-type-options"), "nosniff");
    let plain = proxy.client().get("/").await;
    assert!(plain.headers.get("server").is_none());
    assert_eq!(one(&plain, "cache-control"), "no-store");
}

#[tokio::test]
async fn remove_removes_the_configured_headers() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(
        upstream.addr,
        with_rest("[headers]\nremove = [\"X-Debug\", \"x-powered-by\"]\n"),
    )
    .await;
    let answer = proxy
        .client()
        .get("/headers?X-Debug=1&X-Debug=2&X-Kept=yes")
        .await;
    assert_eq!(answer.status, 200);
    assert!(
        answer.headers.get("x-debug").is_none(),
        "{:?}",
        answer.headers
    );
    assert_eq!(one(&answer, "x-kept"), "yes");
    let plain = proxy.client().get("/").await;
    assert!(plain.headers.get("x-powered-by").is_none());
    // `remove` was replaced, so Server is no longer on it.
    assert_eq!(one(&plain, "server"), mock_upstream::SERVER);
}
