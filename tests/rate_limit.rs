//! Issue 5 (rate limiting on routes), through the real binary: SPEC route
//! `rate_limit`, `server.trusted_proxies`, the 429 in "Errors the proxy writes
//! itself", the `rate_limited` security event and rejection metric, and the
//! `check` errors for a bad `rate_limit`.
//!
//! The limiter's own unit tests (fake clock, Retry-After rounding, the
//! 1,000,000-key memory bound) live in src/policy/rate_limit/; here every
//! request goes over TLS to the spawned proxy and is judged by status, JSON
//! body, headers, whether the upstream was reached, stdout events and
//! `/metrics`.
//!
//! Timing: only the refill test uses a fast rate (`2/s`), and waits for the
//! refill with a bounded poll. Every other test uses `1/m`, so no refill can
//! happen while it runs and each 429 is deterministic.

mod common;
#[path = "common/rate_limit_headers.rs"]
mod rate_limit_headers;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::{Answer, BIN, Proxy, ProxyConfig, Upstream, eventually, make_cert};
use http::Method;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rate_limit_headers::{number, params, remaining};
use serde_json::json;

/// A `1/m` bucket holding 3: nothing refills during a test.
const SLOW: &str = "rate = \"1/m\", burst = 3";

const HSTS: &str = "max-age=31536000; includeSubDomains";

/// The HS256 secret given to the proxy as `JWT_SECRET` (more than 32 bytes).
const SECRET: &str = "rate-limit-integration-test-secret-0123456789";

// ---------------------------------------------------------------------------
// helpers

/// One request on a fresh connection.
async fn get(proxy: &Proxy, path: &str, headers: &[(&str, &str)]) -> Answer {
    proxy
        .client()
        .request(Method::GET, path, headers, Bytes::new())
        .await
}

/// A forwarded 200 for `path` carrying `RateLimit` with `r = expected_remaining`.
fn assert_passed(answer: &Answer, path: &str, expected_remaining: u64, what: &str) {
    common::assert_echo(answer, path, what);
    assert_eq!(
        remaining(answer, what),
        expected_remaining,
        "{what}: RateLimit {:?}",
        answer.header("ratelimit")
    );
}

/// The proxy's 429: JSON `rate_limited`, `Retry-After` in whole seconds (at
/// least 1), `RateLimit-Policy` with `q = burst`, `RateLimit` with `r = 0`
/// and `t = Retry-After`, HSTS. Returns `Retry-After`.
fn assert_limited(answer: &Answer, burst: u64, what: &str) -> u64 {
    assert_eq!(
        answer.status,
        429,
        "{what}: expected 429, got {} {}",
        answer.status,
        answer.text()
    );
    assert!(
        answer
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "{what}: content-type {:?}",
        answer.header("content-type")
    );
    let body = answer.json();
    assert_eq!(body["error"], "rate_limited", "{what}: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: a human message: {body}"
    );
    let retry_after = answer
        .header("retry-after")
        .unwrap_or_else(|| panic!("{what}: no Retry-After; headers {:?}", answer.headers));
    let retry_after: u64 = retry_after
        .parse()
        .unwrap_or_else(|_| panic!("{what}: Retry-After is not whole seconds: {retry_after:?}"));
    assert!(retry_after >= 1, "{what}: Retry-After {retry_after}");

    let policy = answer
        .header("ratelimit-policy")
        .unwrap_or_else(|| panic!("{what}: no RateLimit-Policy; headers {:?}", answer.headers));
    let policy = params(policy);
    assert_eq!(number(&policy, "q", "RateLimit-Policy"), burst, "{what}");
    assert!(number(&policy, "w", "RateLimit-Policy") >= 1, "{what}");

    let limit = params(answer.header("ratelimit").expect("RateLimit on a 429"));
    assert_eq!(
        limit[""], policy[""],
        "{what}: RateLimit names the advertised policy"
    );
    assert_eq!(number(&limit, "r", "RateLimit"), 0, "{what}");
    assert_eq!(
        number(&limit, "t", "RateLimit"),
        retry_after,
        "{what}: RateLimit t is the Retry-After"
    );
    assert_eq!(
        answer.header("strict-transport-security"),
        Some(HSTS),
        "{what}"
    );
    retry_after
}

/// Three requests pass (`r` = 2, 1, 0) and the fourth is refused; none of
/// the refused ones reaches the upstream.
async fn drain(
    proxy: &Proxy,
    upstream: &Upstream,
    path: &str,
    headers: &[(&str, &str)],
    what: &str,
) {
    for left in [2, 1, 0] {
        let before = upstream.count();
        let answer = get(proxy, path, headers).await;
        assert_passed(&answer, path, left, &format!("{what}, r={left}"));
        assert_eq!(upstream.count(), before + 1, "{what}: forwarded");
    }
    assert_refused(proxy, upstream, path, headers, &format!("{what}, 4th")).await;
}

/// One request that must get the 429 and not reach the upstream.
async fn assert_refused(
    proxy: &Proxy,
    upstream: &Upstream,
    path: &str,
    headers: &[(&str, &str)],
    what: &str,
) {
    let before = upstream.count();
    let answer = get(proxy, path, headers).await;
    assert_limited(&answer, 3, what);
    assert_eq!(upstream.count(), before, "{what}: a 429 is never forwarded");
}

/// A plain HTTP/1.1 GET on the admin listener: status and body.
/// The admin listener's address. `Proxy::start` reads it from stderr as soon
/// as the https line is there, which the admin line follows: wait for it.
async fn admin_addr(proxy: &Proxy) -> SocketAddr {
    let marker = "admin listening on";
    let found = eventually(Duration::from_secs(10), || {
        proxy.stderr_text().contains(marker)
    })
    .await;
    assert!(found, "no admin listener; stderr:\n{}", proxy.stderr_text());
    let text = proxy.stderr_text();
    let line = text.lines().find(|l| l.contains(marker)).unwrap();
    line.split_once(marker).unwrap().1.trim().parse().unwrap()
}

/// The value of the sample `name{label="value"}` in a Prometheus text page.
fn sample(metrics: &str, name: &str, label: &str, value: &str) -> Option<f64> {
    let series = format!("{name}{{{label}=\"{value}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
}

fn hs256(sub: &str, secret: &str, ttl_secs: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({ "sub": sub, "iat": now, "exp": now + ttl_secs }),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Every stdout line so far, for "never logged" checks.
fn stdout_text(proxy: &Proxy) -> String {
    proxy.stdout.lock().unwrap().join("\n")
}

// ---------------------------------------------------------------------------
// 2/s, burst 3: the 429 and its refill, over real sockets

#[tokio::test]
async fn burst_then_429_with_headers_then_refill_and_other_routes_unaffected() {
    let upstream = Upstream::start().await;
    let limit = "rate_limit = { rate = \"2/s\", burst = 3, key = \"ip\" }";
    let proxy = Proxy::start(
        upstream.addr,
        ProxyConfig {
            rest: format!(
                "[[routes]]\npath = \"/limited\"\n{limit}\n\n[[routes]]\npath = \"/other\"\n{limit}\n"
            ),
            ..Default::default()
        },
    )
    .await;
    let client = proxy.client();
    // Warm up the upstream pool and the TLS stack on a path no limit counts,
    // so the burst below is as quick as it can be.
    assert_eq!(get(&proxy, "/warm-up", &[]).await.status, 200);
    assert!(
        get(&proxy, "/warm-up", &[])
            .await
            .header("ratelimit")
            .is_none(),
        "an unlimited path carries no RateLimit"
    );

    // Three quick requests on one keep-alive connection, then the fourth.
    let mut conn = client.h1().await;
    let started = Instant::now();
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(common::send(&mut conn, Method::GET, "/limited/x", &[], Bytes::new()).await);
    }
    let elapsed = started.elapsed();
    let forwarded = upstream.count();
    let what = |i: usize| format!("request {} of the burst ({elapsed:?} for all four)", i + 1);
    for (i, answer) in answers.iter().take(3).enumerate() {
        assert_passed(answer, "/limited/x", 2 - i as u64, &what(i));
        assert_eq!(
            answer.header("strict-transport-security"),
            Some(HSTS),
            "{}",
            what(i)
        );
    }
    let retry_after = assert_limited(&answers[3], 3, &what(3));
    let limited_at = Instant::now();
    assert_eq!(
        retry_after, 1,
        "2/s refills one request within 500 ms, rounded up to 1 s"
    );
    let policy = params(answers[3].header("ratelimit-policy").unwrap());
    assert_eq!(
        number(&policy, "w", "RateLimit-Policy"),
        2,
        "3 requests at 2/s take 1.5 s to refill completely, rounded up"
    );
    // Two warm-ups and the three allowed requests.
    assert_eq!(forwarded, 5, "the 429 was not forwarded");

    // The same keep-alive connection stays usable and still refused.
    let again = common::send(&mut conn, Method::GET, "/limited", &[], Bytes::new()).await;
    assert_limited(&again, 3, "the bare route path, same connection");

    // Meanwhile, another route (its own limiter) and an unmatched path are
    // unaffected, and a path that only shares a prefix is not the route.
    let other = get(&proxy, "/other", &[]).await;
    assert_passed(&other, "/other", 2, "another route with its own limiter");
    for path in ["/unmatched", "/limitedx", "/"] {
        let answer = get(&proxy, path, &[]).await;
        assert_eq!(answer.status, 200, "{path} while /limited is exhausted");
        assert!(answer.header("ratelimit").is_none(), "{path}: no RateLimit");
    }
    assert_eq!(upstream.count(), forwarded + 4);

    // After Retry-After, /limited passes again. Poll: a 429 is fine before
    // Retry-After has passed since the 429 (the bucket refills in 500 ms,
    // which Retry-After rounds up), never after. The refused polls must not
    // push the refill back (GCRA does not charge a refused request).
    let must_pass_by = limited_at + Duration::from_secs(retry_after) + Duration::from_millis(50);
    let mut refused = 0;
    let passed = loop {
        let sent = Instant::now();
        let answer = get(&proxy, "/limited", &[]).await;
        if answer.status == 200 {
            break answer;
        }
        assert_limited(&answer, 3, "polling for the refill");
        refused += 1;
        assert!(
            sent < must_pass_by,
            "still 429 {:?} after a 429 with Retry-After: {retry_after} ({refused} polls refused)",
            sent - limited_at
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let left = remaining(&passed, "after the refill");
    assert!(left <= 2, "r after the refill: {left}");
    assert_eq!(passed.header("strict-transport-security"), Some(HSTS));

    // The security event and the metric for the 429s.
    // Each worker writes its own batches, so the polls' events (from
    // another worker, perhaps) may come out first: wait for this one.
    let event = proxy
        .wait_event(|e| e["reason"] == "rate_limited" && e["path"] == "/limited/x")
        .await;
    assert_eq!(event["client"], "127.0.0.1", "{event}");
    assert_eq!(event["route"], "/limited", "{event}");
    let admin = admin_addr(&proxy).await;
    let total_refused = (2 + refused) as f64;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, metrics) = common::plain_get(admin, "/metrics").await;
        assert_eq!(status, 200);
        let counted = sample(
            &metrics,
            "portcullis_rejections_total",
            "reason",
            "rate_limited",
        );
        if counted == Some(total_refused) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "portcullis_rejections_total{{reason=\"rate_limited\"}} should be {total_refused}, is {counted:?}:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// Who the client is: X-Forwarded-For and trusted_proxies

/// With the peer untrusted (no `trusted_proxies`, or a list without it), a
/// client sending a new X-Forwarded-For each time still has one bucket: its
/// TCP address.
#[tokio::test]
async fn an_untrusted_client_cannot_pick_a_fresh_bucket_with_x_forwarded_for() {
    for server in ["", "trusted_proxies = [\"10.0.0.0/8\", \"::1/128\"]"] {
        let upstream = Upstream::start().await;
        let proxy = Proxy::start(
            upstream.addr,
            ProxyConfig {
                server: server.into(),
                rest: format!(
                    "[[routes]]\npath = \"/limited\"\nrate_limit = {{ {SLOW}, key = \"ip\" }}\n"
                ),
                ..Default::default()
            },
        )
        .await;
        for n in 1..=3u64 {
            let xff = format!("10.0.0.{n}");
            let answer = get(&proxy, "/limited", &[("x-forwarded-for", &xff)]).await;
            assert_passed(&answer, "/limited", 3 - n, &format!("[{server}] XFF {xff}"));
        }
        for xff in ["10.0.0.4", "10.0.0.5, 10.0.0.6", "2001:db8::1", "garbage"] {
            assert_refused(
                &proxy,
                &upstream,
                "/limited",
                &[("x-forwarded-for", xff)],
                &format!("[{server}] rotated XFF {xff:?}"),
            )
            .await;
        }
        assert_refused(
            &proxy,
            &upstream,
            "/limited",
            &[],
            &format!("[{server}] no XFF"),
        )
        .await;
        let event = proxy.wait_event(|e| e["reason"] == "rate_limited").await;
        assert_eq!(
            event["client"], "127.0.0.1",
            "[{server}] the client is the TCP peer: {event}"
        );
    }
}

/// With `trusted_proxies = ["127.0.0.1/32"]` the peer is a load balancer of
/// ours, so the right-most X-Forwarded-For entry it did not itself write is
/// the client: different values are different clients, each with its own
/// bucket. A rotating right-most entry is a new key each time, and that is
/// right: the trusted proxy appends the address it saw, so a real client
/// behind it cannot choose that entry (only those to its left, which are not
/// believed).
#[tokio::test]
async fn behind_a_trusted_proxy_x_forwarded_for_chooses_the_key() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(
        upstream.addr,
        ProxyConfig {
            server: "trusted_proxies = [\"127.0.0.1/32\"]".into(),
            rest: format!(
                "[[routes]]\npath = \"/limited\"\nrate_limit = {{ {SLOW}, key = \"ip\" }}\n"
            ),
            ..Default::default()
        },
    )
    .await;
    let xff = |v: &'static str| [("x-forwarded-for", v)];

    drain(
        &proxy,
        &upstream,
        "/limited",
        &xff("10.0.0.1"),
        "client 10.0.0.1",
    )
    .await;
    drain(
        &proxy,
        &upstream,
        "/limited",
        &xff("10.0.0.2"),
        "client 10.0.0.2",
    )
    .await;
    let event = proxy
        .wait_event(|e| e["reason"] == "rate_limited" && e["client"] == "10.0.0.1")
        .await;
    assert_eq!(event["route"], "/limited", "{event}");

    // The trusted peer's own requests (no XFF) are a third client.
    let answer = get(&proxy, "/limited", &[]).await;
    assert_passed(&answer, "/limited", 2, "the trusted peer itself");

    // Entries a client wrote to the left of what our proxy appended, a
    // trusted hop to the right, another spelling of the same IPv4 address, a
    // port, or a second header line do not make 10.0.0.1 someone else.
    for (value, what) in [
        (
            "10.0.0.99, 10.0.0.1",
            "a spoofed entry left of the real one",
        ),
        ("10.0.0.1, 127.0.0.1", "a trusted hop right of the client"),
        ("::ffff:10.0.0.1", "IPv4-mapped IPv6"),
        ("10.0.0.1:4711", "with a port"),
    ] {
        assert_refused(
            &proxy,
            &upstream,
            "/limited",
            &[("x-forwarded-for", value)],
            &format!("{what}: {value:?}"),
        )
        .await;
    }
    assert_refused(
        &proxy,
        &upstream,
        "/limited",
        &[
            ("x-forwarded-for", "10.0.0.77"),
            ("x-forwarded-for", "10.0.0.1"),
        ],
        "two header lines, the last naming 10.0.0.1",
    )
    .await;

    // A rotating right-most entry: a fresh key each time, even with the
    // exhausted 10.0.0.1 to its left.
    for n in 1..=5 {
        let value = format!("10.0.0.1, 10.0.1.{n}");
        let answer = get(&proxy, "/limited", &[("x-forwarded-for", &value)]).await;
        assert_passed(
            &answer,
            "/limited",
            2,
            &format!("rotating right-most entry {value:?}"),
        );
    }

    // IPv6 clients are keyed by their /64: one host cannot rotate through its
    // addresses, while the next /64 is another client.
    drain(
        &proxy,
        &upstream,
        "/limited",
        &xff("2001:db8:1:2::1"),
        "client 2001:db8:1:2::1",
    )
    .await;
    for value in ["2001:db8:1:2::ffff", "2001:db8:1:2:abcd:ef01:2345:6789"] {
        assert_refused(
            &proxy,
            &upstream,
            "/limited",
            &[("x-forwarded-for", value)],
            &format!("same /64: {value}"),
        )
        .await;
    }
    let answer = get(&proxy, "/limited", &xff("2001:db8:1:3::1")).await;
    assert_passed(&answer, "/limited", 2, "the next /64");
}

// ---------------------------------------------------------------------------
// Other keys

#[tokio::test]
async fn header_key_separates_api_keys_and_falls_back_to_the_client_address() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(
        upstream.addr,
        ProxyConfig {
            rest: format!(
                "[[routes]]\npath = \"/api\"\nrate_limit = {{ {SLOW}, key = \"header:X-Api-Key\" }}\n"
            ),
            ..Default::default()
        },
    )
    .await;
    let alpha = "api-key-alpha-7f3c0d";
    let beta = "api-key-beta-91e2aa";

    drain(
        &proxy,
        &upstream,
        "/api",
        &[("x-api-key", alpha)],
        "key alpha",
    )
    .await;
    // Header names are case-insensitive: the same key.
    assert_refused(
        &proxy,
        &upstream,
        "/api",
        &[("X-API-KEY", alpha)],
        "key alpha, upper-case name",
    )
    .await;
    drain(
        &proxy,
        &upstream,
        "/api",
        &[("x-api-key", beta)],
        "key beta",
    )
    .await;

    // Without the header (or with it empty) the client address is the key:
    // a bucket of its own, not alpha's or beta's.
    drain(&proxy, &upstream, "/api", &[], "no X-Api-Key").await;
    assert_refused(
        &proxy,
        &upstream,
        "/api",
        &[("x-api-key", "")],
        "an empty X-Api-Key",
    )
    .await;

    // A header value that spells the client address is not that address's
    // bucket (else anyone could drain another client's fallback bucket).
    let answer = get(&proxy, "/api", &[("x-api-key", "127.0.0.1")]).await;
    assert_passed(&answer, "/api", 2, "X-Api-Key: 127.0.0.1");

    // The API keys are never logged.
    proxy.wait_event(|e| e["reason"] == "rate_limited").await;
    let out = stdout_text(&proxy);
    assert!(
        !out.contains(alpha) && !out.contains(beta),
        "an API key was logged:\n{out}"
    );
}

#[tokio::test]
async fn sub_key_separates_subjects_and_runs_after_jwt() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(
        upstream.addr,
        ProxyConfig {
            rest: format!(
                "[jwt]\nsecret_env = \"JWT_SECRET\"\n\n[[routes]]\npath = \"/api\"\njwt = true\nrate_limit = {{ {SLOW}, key = \"sub\" }}\n"
            ),
            env: vec![("JWT_SECRET".into(), SECRET.into())],
            ..Default::default()
        },
    )
    .await;
    let bearer = |token: &str| format!("Bearer {token}");
    let alice = bearer(&hs256("alice", SECRET, 300));
    let bob = bearer(&hs256("bob", SECRET, 300));

    drain(
        &proxy,
        &upstream,
        "/api",
        &[("authorization", &alice)],
        "alice",
    )
    .await;
    // Another token for the same subject is the same bucket.
    let alice2 = bearer(&hs256("alice", SECRET, 600));
    assert_ne!(alice, alice2);
    assert_refused(
        &proxy,
        &upstream,
        "/api",
        &[("authorization", &alice2)],
        "alice, another token",
    )
    .await;
    drain(&proxy, &upstream, "/api", &[("authorization", &bob)], "bob").await;

    // The limit by subject runs after JWT: no token, or a token that does
    // not verify (claiming the exhausted subject), is 401 — never 429.
    let before = upstream.count();
    let answer = get(&proxy, "/api", &[]).await;
    assert_eq!(answer.status, 401, "no token: {}", answer.text());
    assert_eq!(answer.json()["error"], "missing_token");
    assert!(answer.header("retry-after").is_none());
    let forged = bearer(&hs256(
        "alice",
        "some-other-secret-of-at-least-32-bytes!",
        300,
    ));
    let answer = get(&proxy, "/api", &[("authorization", &forged)]).await;
    assert_eq!(answer.status, 401, "forged token: {}", answer.text());
    assert_eq!(answer.json()["error"], "invalid_token");
    assert!(answer.header("retry-after").is_none());
    assert_eq!(upstream.count(), before, "nothing forwarded");

    // A third subject is still fresh.
    let carol = bearer(&hs256("carol", SECRET, 300));
    let answer = get(&proxy, "/api", &[("authorization", &carol)]).await;
    assert_passed(&answer, "/api", 2, "carol");

    let event = proxy.wait_event(|e| e["reason"] == "rate_limited").await;
    assert_eq!(event["route"], "/api", "{event}");
}

// ---------------------------------------------------------------------------
// Order, concurrency, reload

/// SPEC policy order: limits, method, rate limit. A request refused earlier
/// (bad path, wrong method) costs nothing from the bucket.
#[tokio::test]
async fn earlier_refusals_do_not_spend_the_bucket() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(
        upstream.addr,
        ProxyConfig {
            rest: format!(
                "[[routes]]\npath = \"/limited\"\nmethods = [\"GET\"]\nrate_limit = {{ {SLOW}, key = \"ip\" }}\n"
            ),
            ..Default::default()
        },
    )
    .await;
    let client = proxy.client();
    for _ in 0..4 {
        let answer = client
            .request(Method::POST, "/limited", &[], Bytes::from_static(b"{}"))
            .await;
        assert_eq!(answer.status, 405, "{}", answer.text());
        let answer = get(&proxy, "/limited/a%2Fb", &[]).await;
        assert_eq!(answer.status, 400, "{}", answer.text());
    }
    assert_eq!(upstream.count(), 0);
    drain(
        &proxy,
        &upstream,
        "/limited",
        &[],
        "GETs after 405s and 400s",
    )
    .await;
    // Once exhausted, a wrong method still gets its 405, not a 429.
    let answer = client
        .request(Method::POST, "/limited", &[], Bytes::new())
        .await;
    assert_eq!(answer.status, 405, "{}", answer.text());
}

/// Ten requests at once on one HTTP/2 connection: exactly the burst passes,
/// the rest get the 429 (with its headers, over h2 too).
#[tokio::test]
async fn concurrent_http2_requests_get_exactly_the_burst() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(
        upstream.addr,
        ProxyConfig {
            rest: format!(
                "[[routes]]\npath = \"/limited\"\nrate_limit = {{ {SLOW}, key = \"ip\" }}\n"
            ),
            ..Default::default()
        },
    )
    .await;
    let h2 = proxy.client().h2().await;
    let port = proxy.https.port();
    let requests = (0..10).map(|i| {
        let mut h2 = h2.clone();
        async move {
            let request = http::Request::builder()
                .uri(format!("https://localhost:{port}/limited/{i}"))
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap();
            common::collect(h2.send_request(request).await.unwrap()).await
        }
    });
    let answers = futures_util::future::join_all(requests).await;
    let passed = answers.iter().filter(|a| a.status == 200).count();
    let limited: Vec<_> = answers.iter().filter(|a| a.status == 429).collect();
    assert_eq!(
        (passed, limited.len()),
        (3, 7),
        "statuses: {:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    for answer in limited {
        assert_limited(answer, 3, "a concurrent h2 request");
    }
    assert_eq!(upstream.count(), 3, "only the allowed ones were forwarded");
}

/// How many times the proxy has logged a successful reload.
fn reloads(proxy: &Proxy) -> usize {
    let out = stdout_text(proxy) + &proxy.stderr_text();
    out.matches("configuration reloaded").count()
}

/// Writes `text` as the proxy's config, sends SIGHUP and waits until the
/// reload is logged.
async fn reload(proxy: &Proxy, text: &str) {
    let before = reloads(proxy);
    std::fs::write(&proxy.config_path, text).unwrap();
    proxy.signal("HUP");
    let done = eventually(Duration::from_secs(10), || reloads(proxy) > before).await;
    assert!(done, "no reload logged; stderr:\n{}", proxy.stderr_text());
}

/// A reload keeps a route's buckets when its limit is unchanged (a client
/// cannot get a fresh bucket because the operator reloaded), and replaces
/// them when the limit changed.
#[tokio::test]
async fn reload_keeps_buckets_unless_the_limit_changed() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(
        upstream.addr,
        ProxyConfig {
            rest: format!(
                "[[routes]]\npath = \"/limited\"\nrate_limit = {{ {SLOW}, key = \"ip\" }}\n"
            ),
            ..Default::default()
        },
    )
    .await;
    drain(&proxy, &upstream, "/limited", &[], "before any reload").await;

    // Unchanged limit (another setting changed): still exhausted.
    let original = std::fs::read_to_string(&proxy.config_path).unwrap();
    let v2 = original + "\n[headers]\nset = { \"X-Version\" = \"2\" }\n";
    reload(&proxy, &v2).await;
    let answer = get(&proxy, "/limited", &[]).await;
    assert_eq!(answer.header("x-version"), Some("2"), "the reload applied");
    assert_limited(&answer, 3, "after a reload that kept the limit");

    // Changed limit: a new limiter.
    let v3 = v2.replace(SLOW, "rate = \"1/m\", burst = 4");
    assert_ne!(v3, v2);
    reload(&proxy, &v3).await;
    let answer = get(&proxy, "/limited", &[]).await;
    assert_eq!(
        answer.status,
        200,
        "after the limit changed: {}",
        answer.text()
    );
    assert_eq!(remaining(&answer, "new limit"), 3);
}

// ---------------------------------------------------------------------------
// `check`: a bad rate_limit is exit 2, named with its place

/// A whole `proxy.toml` with `routes` at the end, next to a fresh certificate.
fn write_config(dir: &Path, routes: &str) -> (std::path::PathBuf, String) {
    make_cert(dir, "cert", &["localhost"]);
    let text = format!(
        "[server]\nhttps_listen = \"127.0.0.1:0\"\n\n[tls]\ncert = \"cert.pem\"\nkey = \"cert.key\"\n\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n\n{routes}"
    );
    let path = dir.join("proxy.toml");
    std::fs::write(&path, &text).unwrap();
    (path, text)
}

fn check(config: &Path, jwt_secret: Option<&str>) -> Output {
    let mut command = Command::new(BIN);
    command
        .arg("check")
        .arg("--config")
        .arg(config)
        .env_remove("PORTCULLIS_CONFIG")
        .env_remove("JWT_SECRET");
    if let Some(secret) = jwt_secret {
        command.env("JWT_SECRET", secret);
    }
    command.output().expect("run portcullis check")
}

/// 1-based line and column of `needle` in `text`.
fn position(text: &str, needle: &str) -> (usize, usize) {
    let offset = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in {text}"));
    let before = &text[..offset];
    (
        before.matches('\n').count() + 1,
        before.rsplit('\n').next().unwrap().chars().count() + 1,
    )
}

/// `check` exits 2 and prints `FILE:LINE:COL: KEY: ` with LINE:COL the place
/// of `at`; returns stderr.
fn assert_check_error(routes: &str, at: &str, key: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (config, text) = write_config(dir.path(), routes);
    let output = check(&config, Some(SECRET));
    let err = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{routes}\nstderr: {err}");
    let (line, col) = position(&text, at);
    let expected = format!("{}:{line}:{col}: {key}: ", config.display());
    assert!(err.contains(&expected), "expected {expected:?} in {err:?}");
    assert!(
        output.stdout.is_empty(),
        "no summary for an invalid file: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    err
}

#[test]
fn check_refuses_a_sub_key_without_jwt() {
    let err = assert_check_error(
        "[[routes]]\npath = \"/api\"\nrate_limit = { rate = \"2/s\", burst = 3, key = \"sub\" }\n",
        "\"sub\"",
        "routes[0].rate_limit.key",
    );
    assert!(err.contains("jwt"), "says what is missing: {err}");

    // The same route with `jwt = true` (and a `[jwt]`) is accepted.
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_config(
        dir.path(),
        "[jwt]\nsecret_env = \"JWT_SECRET\"\n\n[[routes]]\npath = \"/api\"\njwt = true\nrate_limit = { rate = \"2/s\", burst = 3, key = \"sub\" }\n",
    );
    let output = check(&config, Some(SECRET));
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn check_names_a_bad_rate_with_its_line_and_column() {
    let err = assert_check_error(
        "[[routes]]\npath = \"/ok\"\nrate_limit = { rate = \"2/s\", burst = 3 }\n\n[[routes]]\npath = \"/bad\"\nrate_limit = { rate = \"ten\", burst = 3, key = \"ip\" }\n",
        "\"ten\"",
        "routes[1].rate_limit.rate",
    );
    assert!(
        err.contains(r#"routes[1].rate_limit.rate: expected "<n>/<s|m|h>", got "ten""#),
        "{err}"
    );
    assert!(
        err.contains("proxy.toml:17:23: "),
        "the value's place in the file: {err}"
    );

    // Other bad values, each named by its key.
    for (rate_limit, at, key) in [
        ("{ rate = \"0/s\", burst = 3 }", "\"0/s\"", "rate"),
        ("{ rate = \"10/d\" }", "\"10/d\"", "rate"),
        ("{ rate = \"2/s\", burst = 0 }", "0 }", "burst"),
        ("{ rate = \"2/s\", key = \"cookie\" }", "\"cookie\"", "key"),
        (
            "{ rate = \"2/s\", key = \"header:bad name\" }",
            "\"header:bad name\"",
            "key",
        ),
    ] {
        assert_check_error(
            &format!("[[routes]]\npath = \"/x\"\nrate_limit = {rate_limit}\n"),
            at,
            &format!("routes[0].rate_limit.{key}"),
        );
    }
}
