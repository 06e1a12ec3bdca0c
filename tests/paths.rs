//! SPEC "What a client sees" → Paths, and `[[routes]]` matching (issue 3):
//! every spelling of `/admin` reaches the `/admin` policy, the upstream sees
//! only the normalized path, the spellings whose meaning differs between
//! upstreams get a 400, and routes match by longest segment prefix.
//!
//! Requests are written as raw bytes so that the request target reaches the
//! proxy exactly as spelled here (a client library would drop a `#fragment`
//! or resolve dot-segments itself).

mod common;

use std::time::Duration;

use common::{Proxy, ProxyConfig, RawResponse, Upstream, parse_responses};

const ADMIN_GET_ONLY: &str = "[[routes]]\npath = \"/admin\"\nmethods = [\"GET\"]\n";

async fn admin_proxy(upstream: &Upstream) -> Proxy {
    let config = ProxyConfig {
        rest: ADMIN_GET_ONLY.into(),
        ..Default::default()
    };
    Proxy::start(upstream.addr, config).await
}

/// One request with the target written byte for byte, on its own connection.
async fn exchange(proxy: &Proxy, method: &str, target: &str) -> RawResponse {
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let (text, closed) = proxy
        .client()
        .raw_until_closed(request.as_bytes(), Duration::from_secs(10))
        .await;
    assert!(
        closed,
        "{method} {target}: connection not closed; got {text:?}"
    );
    let mut responses = parse_responses(&text);
    assert_eq!(
        responses.len(),
        1,
        "{method} {target}: expected one response, got {text:?}"
    );
    responses.remove(0)
}

#[tokio::test]
async fn every_spelling_of_admin_reaches_the_admin_policy_and_upstream_sees_it_normalized() {
    let upstream = Upstream::start().await;
    let proxy = admin_proxy(&upstream).await;
    let cases = [
        ("/admin", "/admin"),
        ("/public/../admin", "/admin"),
        ("/%61dmin", "/admin"),
        ("//admin", "/admin"),
        ("/./admin", "/admin"),
        ("/admin/", "/admin/"),
        // `;params` are ignored for matching but passed on as sent.
        ("/admin;x=1", "/admin;x=1"),
    ];
    for (target, normalized) in cases {
        let before = upstream.count();
        let post = exchange(&proxy, "POST", target).await;
        assert_eq!(post.status, 405, "POST {target}: {post:?}");
        assert_eq!(post.header("allow"), Some("GET"), "POST {target}: {post:?}");
        assert_eq!(post.json()["error"], "method_not_allowed", "POST {target}");
        assert_eq!(upstream.count(), before, "POST {target} was forwarded");

        let get = exchange(&proxy, "GET", target).await;
        assert_eq!(get.status, 200, "GET {target}: {get:?}");
        assert_eq!(
            upstream.count(),
            before + 1,
            "GET {target} not forwarded once"
        );
        assert_eq!(
            upstream.last().target,
            normalized,
            "GET {target}: the upstream must see the normalized path"
        );
    }
}

#[tokio::test]
async fn ambiguous_paths_get_400_invalid_path_and_nothing_is_forwarded() {
    let upstream = Upstream::start().await;
    let proxy = admin_proxy(&upstream).await;
    let targets = [
        "/admin%2f",
        "/admin%2F",
        "/admin%00",
        "/admin%5c",
        "/admin%5C",
        "/admin\\x",
        "/admin#x",
        "/..%2fadmin",
        "/../admin",
        "/public/../../admin",
    ];
    for target in targets {
        for method in ["GET", "POST"] {
            let answer = exchange(&proxy, method, target).await;
            assert_eq!(answer.status, 400, "{method} {target}: {answer:?}");
            assert_eq!(
                answer.json()["error"],
                "invalid_path",
                "{method} {target}: {answer:?}"
            );
            assert!(
                answer.header("strict-transport-security").is_some(),
                "{method} {target}: the proxy's own error carries HSTS"
            );
        }
    }
    assert_eq!(upstream.count(), 0, "{:?}", upstream.recorded());
    // The same connection-level sniffing must not misjudge a clean request afterwards.
    assert_eq!(exchange(&proxy, "GET", "/admin").await.status, 200);
}

#[tokio::test]
async fn the_query_string_is_passed_untouched() {
    let upstream = Upstream::start().await;
    let proxy = admin_proxy(&upstream).await;
    for target in [
        "/x?a=%2F&b=..",
        "/x?a=%2f&b=%5C&c=%00&d=/../",
        "/admin?next=/../admin&q=%61",
    ] {
        let answer = exchange(&proxy, "GET", target).await;
        assert_eq!(answer.status, 200, "GET {target}: {answer:?}");
        assert_eq!(upstream.last().target, target);
    }
    // The path is still normalized when a query follows it.
    let answer = exchange(&proxy, "GET", "/a/./b/../c?x=%2F").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(upstream.last().target, "/a/c?x=%2F");
}

#[tokio::test]
async fn a_route_matches_whole_segments_only() {
    let upstream = Upstream::start().await;
    let proxy = admin_proxy(&upstream).await;
    for target in ["/administrator", "/admins", "/adminx/y", "/x/admin"] {
        let answer = exchange(&proxy, "POST", target).await;
        assert_eq!(
            answer.status, 200,
            "POST {target} is not under /admin: {answer:?}"
        );
        assert_eq!(upstream.last().target, target);
    }
    let answer = exchange(&proxy, "POST", "/admin/users").await;
    assert_eq!(answer.status, 405, "{answer:?}");
    assert_eq!(answer.header("allow"), Some("GET"));
}

#[tokio::test]
async fn the_longest_matching_prefix_wins() {
    let upstream = Upstream::start().await;
    // The shorter prefix first, so a first-match table would get it wrong.
    let config = ProxyConfig {
        rest: "[[routes]]\npath = \"/api\"\nmethods = [\"GET\"]\n\n\
               [[routes]]\npath = \"/api/admin\"\nmethods = [\"POST\"]\n"
            .into(),
        ..Default::default()
    };
    let proxy = Proxy::start(upstream.addr, config).await;
    let cases = [
        ("POST", "/api/admin", 200, None),
        ("POST", "/api/admin/x", 200, None),
        ("GET", "/api/admin", 405, Some("POST")),
        ("GET", "/api/admin/x", 405, Some("POST")),
        ("GET", "/api", 200, None),
        ("GET", "/api/x", 200, None),
        // `/api/administrator` is under `/api`, not `/api/admin`.
        ("GET", "/api/administrator", 200, None),
        ("POST", "/api/administrator", 405, Some("GET")),
        ("POST", "/api/x", 405, Some("GET")),
        // Normalization happens before matching.
        ("GET", "/api/x/../admin", 405, Some("POST")),
        ("GET", "/api//admin", 405, Some("POST")),
        ("GET", "/api/admin;jsessionid=1", 405, Some("POST")),
        // No route: forwarded whatever the method.
        ("POST", "/apix", 200, None),
    ];
    for (method, target, status, allow) in cases {
        let answer = exchange(&proxy, method, target).await;
        assert_eq!(answer.status, status, "{method} {target}: {answer:?}");
        assert_eq!(answer.header("allow"), allow, "{method} {target}");
    }
}

#[tokio::test]
async fn path_parameter_values_are_forwarded_but_never_logged() {
    let upstream = Upstream::start().await;
    let proxy = admin_proxy(&upstream).await;
    let answer = exchange(&proxy, "GET", "/app;jsessionid=SECRET-SESSION/x;v=2").await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        upstream.last().target,
        "/app;jsessionid=SECRET-SESSION/x;v=2"
    );
    let refused = exchange(&proxy, "POST", "/admin;jsessionid=SECRET-ADMIN").await;
    assert_eq!(refused.status, 405);

    let access = proxy
        .wait_event(|e| e["target"] == "access" && e["path"] == "/app;jsessionid/x;v")
        .await;
    assert_eq!(access["status"], 200, "{access}");
    let security = proxy
        .wait_event(|e| e["reason"] == "method_not_allowed")
        .await;
    assert_eq!(security["path"], "/admin;jsessionid", "{security}");
    let log = proxy.stdout.lock().unwrap().join("\n");
    assert!(
        !log.contains("SECRET"),
        "a parameter value reached the log:\n{log}"
    );
}

#[tokio::test]
async fn case_insensitive_routes_put_every_spelling_under_the_policy() {
    let upstream = Upstream::start().await;
    // Default: case-sensitive, as SPEC's segment prefix reads.
    let proxy = admin_proxy(&upstream).await;
    assert_eq!(exchange(&proxy, "POST", "/admin/x").await.status, 405);
    assert_eq!(exchange(&proxy, "POST", "/ADMIN/x").await.status, 200);
    assert_eq!(upstream.last().target, "/ADMIN/x");
    drop(proxy);

    let config = ProxyConfig {
        server: "case_insensitive_routes = true".into(),
        rest: ADMIN_GET_ONLY.into(),
        ..Default::default()
    };
    let proxy = Proxy::start(upstream.addr, config).await;
    let before = upstream.count();
    for target in ["/ADMIN/x", "/Admin", "/aDmIn;v=1/y"] {
        let answer = exchange(&proxy, "POST", target).await;
        assert_eq!(answer.status, 405, "{target}");
    }
    assert_eq!(upstream.count(), before, "a refused spelling was forwarded");
    let answer = exchange(&proxy, "GET", "/AdMiN/Page").await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        upstream.last().target,
        "/AdMiN/Page",
        "the path is forwarded as sent"
    );
    assert_eq!(exchange(&proxy, "POST", "/ADMINISTRATOR").await.status, 200);
}

#[test]
fn routes_differing_only_in_case_are_refused_when_matching_ignores_case() {
    let dir = tempfile::tempdir().unwrap();
    common::make_cert(dir.path(), "cert", &["localhost"]);
    let write = |server: &str| {
        let toml = format!(
            "[server]\nhttps_listen = \"127.0.0.1:0\"\n{server}\n[tls]\ncert = \"cert.pem\"\nkey = \"cert.key\"\n\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n\n[[routes]]\npath = \"/api\"\n\n[[routes]]\npath = \"/API\"\n"
        );
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, toml).unwrap();
        std::process::Command::new(common::BIN)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    };
    assert!(write("").status.success());
    let refused = write("case_insensitive_routes = true\n");
    assert_eq!(refused.status.code(), Some(2));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("routes[1].path") && err.contains("routes[0]"),
        "{err}"
    );
}
