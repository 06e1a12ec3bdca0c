//! `[redis]`: rate limits shared by every portcullis instance pointed at one
//! Redis, and what each instance does while that Redis fails. Every test
//! starts its own real `redis-server` (no persistence, on a loopback port of
//! its own) and the real binary; nothing is mocked but the upstream.
//!
//! What this file proves, through TLS requests, `/metrics`, the proxy's
//! diagnostics (JSON lines on its standard error) and the keys found in Redis:
//!
//! * two instances on one Redis share one bucket: alternating between them,
//!   exactly the burst passes and either instance answers the 429, with
//!   `Retry-After` and the `RateLimit` headers;
//! * `header:` keys are independent of each other, shared per key between
//!   instances, and stored as digests (never the header value);
//! * Redis SIGKILLed, or SIGSTOPped, with `timeout = "50ms"`: each `on_error`
//!   mode (`local`, `allow`, `deny`) answers as documented, no request waits
//!   much longer than the timeout (p90 and max over 30 requests on one
//!   keep-alive connection), `/readyz` stays 200, and Redis really was
//!   failing (the `redis is failing` event, `portcullis_redis_errors_total`,
//!   `portcullis_redis_up`);
//! * Redis restarted on its port, and Redis started after the proxies: the
//!   limit is *shared* again within 15 s (a fresh key spent through one
//!   instance is refused by the other);
//! * 5,000 distinct keys: every key in Redis starts with `key_prefix` and has
//!   a TTL, and a route without `rate_limit` runs no script;
//! * without a rate-limited route the proxy never connects to Redis;
//! * `portcullis check` accepts `[redis]` without contacting it, and names a
//!   bad `url`, `timeout`, `on_error` or `key_prefix` with `proxy.toml:LINE:COL`.

mod common;
#[path = "common/rate_limit_headers.rs"]
mod rate_limit_headers;
#[path = "common/redis_server.rs"]
mod redis_server;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Answer, BIN, Proxy, ProxyConfig, Upstream, eventually, make_cert};
use http::Method;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use rate_limit_headers::{number, params, remaining};
use redis::aio::MultiplexedConnection;
use redis_server::{RedisServer, redis_port, redis_server_installed, signal};

const HSTS: &str = "max-age=31536000; includeSubDomains";

/// The operation timeout of the failure tests, and the bounds a request's
/// time must keep while Redis fails: a request that waits for a dead Redis
/// for seconds breaks both, while a debug build on a busy 2-core machine
/// (tests in parallel) stays well inside them.
const FAILURE_TIMEOUT: Duration = Duration::from_millis(50);
const P90_BOUND: Duration = Duration::from_millis(50 + 60);
const MAX_BOUND: Duration = Duration::from_millis(50 + 250);

/// How soon shared limiting must work again once Redis answers.
const RECOVERY_BOUND: Duration = Duration::from_secs(15);

/// Every key in the Redis, by SCAN over the whole keyspace.
async fn all_keys(con: &mut MultiplexedConnection) -> HashSet<String> {
    let mut keys = HashSet::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .cursor_arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(con)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// `PTTL` of each key, in one pipeline.
async fn pttls(con: &mut MultiplexedConnection, keys: &[String]) -> Vec<i64> {
    let mut pipe = redis::pipe();
    for key in keys {
        pipe.cmd("PTTL").arg(key);
    }
    pipe.query_async(con).await.unwrap()
}

/// `calls` of a command in `INFO commandstats` (0 when it never ran).
async fn command_calls(con: &mut MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(con)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map(|n| n.parse().unwrap())
        .unwrap_or(0)
}

/// Scripts run so far (`EVALSHA` and `EVAL`).
async fn script_calls(con: &mut MultiplexedConnection) -> u64 {
    command_calls(con, "evalsha").await + command_calls(con, "eval").await
}

/// A field of `INFO stats` / `INFO clients`.
async fn info_field(con: &mut MultiplexedConnection, section: &str, field: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(con)
        .await
        .unwrap();
    let prefix = format!("{field}:");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {field} in INFO {section}:\n{info}"))
        .trim()
        .parse()
        .unwrap()
}

/// `{prefix}:rl:{route}:hdr:` followed by 32 lower-case hex digits.
fn is_header_key(key: &str, prefix: &str, route: &str) -> bool {
    key.strip_prefix(&format!("{prefix}:rl:{route}:hdr:"))
        .is_some_and(|digest| {
            digest.len() == 32
                && digest
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

// ---------------------------------------------------------------------------
// Requests and what they answer

/// A key value no other request of the test run has used.
fn fresh_key(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// How long any one request may take before the test fails (rather than
/// hangs, if the proxy waited for a dead Redis without bound).
const REQUEST_BOUND: Duration = Duration::from_secs(10);

/// One GET on a fresh connection.
async fn get(proxy: &Proxy, path: &str, headers: &[(&str, &str)]) -> Answer {
    let client = proxy.client();
    let request = client.request(Method::GET, path, headers, Bytes::new());
    tokio::time::timeout(REQUEST_BOUND, request)
        .await
        .unwrap_or_else(|_| panic!("GET {path} {headers:?}: no answer within {REQUEST_BOUND:?}"))
}

/// One GET on a keep-alive connection.
async fn send(conn: &mut SendRequest<Full<Bytes>>, path: &str, headers: &[(&str, &str)]) -> Answer {
    let request = async {
        conn.ready().await.expect("keep-alive connection usable");
        common::send(conn, Method::GET, path, headers, Bytes::new()).await
    };
    tokio::time::timeout(REQUEST_BOUND, request)
        .await
        .unwrap_or_else(|_| panic!("GET {path} {headers:?}: no answer within {REQUEST_BOUND:?}"))
}

fn api_key(value: &str) -> [(&str, &str); 1] {
    [("x-api-key", value)]
}

/// The upstream's 200 echo of `path`, carrying `RateLimit` with `r = left`
/// and `RateLimit-Policy` with `q = burst`.
fn assert_passed(answer: &Answer, path: &str, burst: u64, left: u64, what: &str) {
    common::assert_echo(answer, path, what);
    assert_eq!(
        remaining(answer, what),
        left,
        "{what}: {:?}",
        answer.headers
    );
    let policy = params(
        answer
            .header("ratelimit-policy")
            .unwrap_or_else(|| panic!("{what}: no RateLimit-Policy")),
    );
    assert_eq!(number(&policy, "q", "RateLimit-Policy"), burst, "{what}");
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
    assert_eq!(answer.json()["error"], "rate_limited", "{what}");
    let retry_after = answer
        .header("retry-after")
        .unwrap_or_else(|| panic!("{what}: no Retry-After; headers {:?}", answer.headers));
    let retry_after: u64 = retry_after
        .parse()
        .unwrap_or_else(|_| panic!("{what}: Retry-After is not whole seconds: {retry_after:?}"));
    assert!(retry_after >= 1, "{what}: Retry-After {retry_after}");
    let policy =
        params(answer.header("ratelimit-policy").unwrap_or_else(|| {
            panic!("{what}: no RateLimit-Policy; headers {:?}", answer.headers)
        }));
    assert_eq!(policy[""], "\"default\"", "{what}");
    assert_eq!(number(&policy, "q", "RateLimit-Policy"), burst, "{what}");
    assert!(number(&policy, "w", "RateLimit-Policy") >= 1, "{what}");
    let limit = params(answer.header("ratelimit").expect("RateLimit on a 429"));
    assert_eq!(limit[""], "\"default\"", "{what}");
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

/// The 503 `on_error = "deny"` gives while Redis fails.
fn assert_unavailable(answer: &Answer, what: &str) {
    assert_eq!(
        answer.status,
        503,
        "{what}: expected 503, got {} {}",
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
    assert_eq!(body["error"], "rate_limit_unavailable", "{what}: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: a human message: {body}"
    );
    assert_eq!(
        answer.header("strict-transport-security"),
        Some(HSTS),
        "{what}"
    );
}

// ---------------------------------------------------------------------------
// The proxy's side: configuration, /metrics, events

/// `[redis]` and one rate-limited route (plus `extra` routes).
fn redis_config(redis_section: &str, route: &str, rate_limit: &str, extra: &str) -> ProxyConfig {
    ProxyConfig {
        rest: format!(
            "[redis]\n{redis_section}\n\n[[routes]]\npath = \"{route}\"\nrate_limit = {{ {rate_limit} }}\n{extra}"
        ),
        ..Default::default()
    }
}

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

async fn metrics(admin: SocketAddr) -> String {
    let (status, body) = common::plain_get(admin, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of the sample `name{label="value"}` in a Prometheus text page.
fn sample(metrics: &str, name: &str, label: &str, value: &str) -> Option<f64> {
    let series = format!("{name}{{{label}=\"{value}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
}

/// `portcullis_redis_errors_total` by kind.
fn redis_errors(metrics: &str) -> HashMap<&'static str, f64> {
    ["timeout", "refused", "error"]
        .into_iter()
        .map(|kind| {
            let value = sample(metrics, "portcullis_redis_errors_total", "kind", kind)
                .unwrap_or_else(|| panic!("no redis_errors_total{{kind={kind}}}:\n{metrics}"));
            (kind, value)
        })
        .collect()
}

fn total(errors: &HashMap<&'static str, f64>) -> f64 {
    errors.values().sum()
}

/// `portcullis_redis_up`.
fn redis_up(metrics: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("portcullis_redis_up "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no portcullis_redis_up:\n{metrics}"))
}

fn message_starts(event: &serde_json::Value, start: &str) -> bool {
    event["message"]
        .as_str()
        .is_some_and(|m| m.starts_with(start))
}

/// The proxy's diagnostics: the JSON lines on its standard error (standard
/// output carries only the access and security records).
fn diagnostics(proxy: &Proxy) -> Vec<serde_json::Value> {
    proxy
        .stderr
        .lock()
        .unwrap()
        .iter()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Waits (10 s at most) for a diagnostic matching `pred`.
async fn wait_diagnostic(
    proxy: &Proxy,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut found = None;
    eventually(Duration::from_secs(10), || {
        found = diagnostics(proxy).into_iter().find(|e| pred(e));
        found.is_some()
    })
    .await;
    found.unwrap_or_else(|| panic!("no {what} on stderr:\n{}", proxy.stderr_text()))
}

fn is_failing(event: &serde_json::Value) -> bool {
    event["level"] == "WARN" && message_starts(event, "redis is failing")
}

fn is_answering(event: &serde_json::Value) -> bool {
    event["level"] == "INFO" && message_starts(event, "redis answers again")
}

fn failing_events(proxy: &Proxy) -> usize {
    diagnostics(proxy).iter().filter(|e| is_failing(e)).count()
}

/// Sends requests with throwaway keys on `conn` until `portcullis_redis_up`
/// reads 1: this worker's connection is open and the script loaded, so the
/// next requests on `conn` are Redis's to decide.
async fn wait_until_redis_decides(
    conn: &mut SendRequest<Full<Bytes>>,
    admin: SocketAddr,
    path: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let key = fresh_key("warm-up");
        let answer = send(conn, path, &api_key(&key)).await;
        // 503: on_error = "deny" while the connection is still being opened.
        assert!(
            answer.status == 200 || answer.status == 503,
            "warm-up: {} {}",
            answer.status,
            answer.text()
        );
        if redis_up(&metrics(admin).await) == 1.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "portcullis_redis_up never read 1 within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// 1. Two instances, one bucket

#[tokio::test]
async fn two_instances_share_one_bucket_alternating() {
    if !redis_server_installed() {
        return;
    }
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    // A generous timeout and "deny": a Redis operation that failed here shows
    // as a 503, never as a local decision that would pass for a shared one.
    let config = redis_config(
        &format!(
            "url = \"{}\"\ntimeout = \"1s\"\non_error = \"deny\"",
            redis.url()
        ),
        "/limited",
        "rate = \"5/m\", burst = 5",
        "",
    );
    let a = Proxy::start(upstream.addr, config.clone()).await;
    let b = Proxy::start(upstream.addr, config).await;
    let mut to_a = a.client().h1().await;
    let mut to_b = b.client().h1().await;

    let mut answers = Vec::new();
    for i in 0..12 {
        let (name, conn) = if i % 2 == 0 {
            ("A", &mut to_a)
        } else {
            ("B", &mut to_b)
        };
        answers.push((name, send(conn, "/limited", &[]).await));
    }
    let statuses: Vec<_> = answers
        .iter()
        .map(|(name, a)| format!("{name}:{}", a.status.as_u16()))
        .collect();
    assert_eq!(
        answers.iter().filter(|(_, a)| a.status == 200).count(),
        5,
        "exactly the burst passes in total: {statuses:?}"
    );
    for (i, (name, answer)) in answers.iter().enumerate() {
        let what = format!("request {} (through {name}; all: {statuses:?})", i + 1);
        if i < 5 {
            // One bucket: the remaining count goes down across both instances.
            assert_passed(answer, "/limited", 5, 4 - i as u64, &what);
            assert_eq!(
                answer.header("ratelimit-policy"),
                Some("\"default\";q=5;w=60"),
                "{what}"
            );
            assert_eq!(
                answer.header("ratelimit"),
                Some(format!("\"default\";r={};t=12", 4 - i).as_str()),
                "{what}"
            );
        } else {
            let retry_after = assert_limited(answer, 5, &what);
            // The first of five slots comes back 12 s after it was taken.
            assert!(retry_after <= 12, "{what}: Retry-After {retry_after}");
            assert_eq!(
                answer.header("ratelimit-policy"),
                Some("\"default\";q=5;w=60"),
                "{what}"
            );
        }
    }
    for name in ["A", "B"] {
        assert!(
            answers[5..].iter().any(|(n, _)| *n == name),
            "{name} refused some"
        );
    }
    assert_eq!(upstream.count(), 5, "only the five allowed were forwarded");

    // The bucket is one key in Redis, under the default prefix, with a TTL of
    // at most one full refill (60 s).
    let mut con = redis.connection().await;
    let keys = all_keys(&mut con).await;
    assert_eq!(
        keys,
        HashSet::from(["portcullis:rl:/limited:ip:127.0.0.1".to_string()]),
        "the keys in Redis"
    );
    let ttl = pttls(&mut con, &keys.into_iter().collect::<Vec<_>>()).await[0];
    assert!(0 < ttl && ttl <= 60_000, "PTTL {ttl}");
}

// ---------------------------------------------------------------------------
// 2. Header keys

#[tokio::test]
async fn header_keys_are_independent_and_each_shared_between_instances() {
    if !redis_server_installed() {
        return;
    }
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let config = redis_config(
        &format!(
            "url = \"{}\"\ntimeout = \"1s\"\non_error = \"deny\"",
            redis.url()
        ),
        "/api",
        "rate = \"1/m\", burst = 2, key = \"header:X-Api-Key\"",
        "",
    );
    let a = Proxy::start(upstream.addr, config.clone()).await;
    let b = Proxy::start(upstream.addr, config).await;
    let alpha = "alpha-api-key-5e1d07";
    let beta = "beta-api-key-c9a244";

    // alpha: one bucket of 2 across A and B.
    assert_passed(
        &get(&a, "/api", &api_key(alpha)).await,
        "/api",
        2,
        1,
        "alpha via A",
    );
    assert_passed(
        &get(&b, "/api", &api_key(alpha)).await,
        "/api",
        2,
        0,
        "alpha via B",
    );
    assert_limited(
        &get(&a, "/api", &api_key(alpha)).await,
        2,
        "alpha via A, 3rd",
    );
    assert_limited(
        &get(&b, "/api", &api_key(alpha)).await,
        2,
        "alpha via B, 4th",
    );
    // beta is untouched by alpha, and shared too.
    assert_passed(
        &get(&b, "/api", &api_key(beta)).await,
        "/api",
        2,
        1,
        "beta via B",
    );
    assert_passed(
        &get(&a, "/api", &api_key(beta)).await,
        "/api",
        2,
        0,
        "beta via A",
    );
    assert_limited(&get(&b, "/api", &api_key(beta)).await, 2, "beta via B, 3rd");
    assert_limited(
        &get(&a, "/api", &api_key(alpha)).await,
        2,
        "alpha still spent",
    );
    // Without the header, the client address is the key: a bucket of its own.
    assert_passed(
        &get(&a, "/api", &[]).await,
        "/api",
        2,
        1,
        "no X-Api-Key via A",
    );
    assert_passed(
        &get(&b, "/api", &[]).await,
        "/api",
        2,
        0,
        "no X-Api-Key via B",
    );
    assert_eq!(upstream.count(), 6);

    // In Redis: one key per API key (a digest, never the value) and one for
    // the address.
    let mut con = redis.connection().await;
    let keys = all_keys(&mut con).await;
    let headers: Vec<_> = keys
        .iter()
        .filter(|k| is_header_key(k, "portcullis", "/api"))
        .collect();
    assert_eq!(headers.len(), 2, "two header keys: {keys:?}");
    assert!(
        keys.contains("portcullis:rl:/api:ip:127.0.0.1"),
        "the address's key: {keys:?}"
    );
    assert_eq!(keys.len(), 3, "{keys:?}");
    for key in &keys {
        let value: String = redis::cmd("GET")
            .arg(key)
            .query_async(&mut con)
            .await
            .unwrap();
        for secret in [alpha, beta, "alpha", "beta"] {
            assert!(
                !key.contains(secret) && !value.contains(secret),
                "{key} = {value} holds the header value"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 3. Redis fails mid-test: on_error, and no request waits for it

#[derive(Clone, Copy, Debug, PartialEq)]
enum Outage {
    /// SIGKILL: connections reset, the port refuses.
    Killed,
    /// SIGSTOP: connections accepted, nothing ever answered.
    Stopped,
}

/// A proxy on a Redis that decides; a key `K` drained in Redis (by another
/// instance); then Redis fails and 30 requests for `K` on one keep-alive
/// connection get what `on_error` says, each within the time bounds.
async fn redis_fails_mid_test(outage: Outage, on_error: &str) {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let route = "rate = \"1/m\", burst = 3, key = \"header:X-Api-Key\"";
    let proxy = Proxy::start(
        upstream.addr,
        redis_config(
            &format!(
                "url = \"{}\"\ntimeout = \"{}ms\"\non_error = \"{on_error}\"",
                redis.url(),
                FAILURE_TIMEOUT.as_millis()
            ),
            "/limited",
            route,
            "",
        ),
    )
    .await;
    // Another instance drains K in Redis. Its generous timeout and "deny"
    // make each of its answers Redis's (or a 503), whatever the machine's
    // load; and the instance under test never sees K before the outage, so
    // its own limiter has not counted it.
    let helper = Proxy::start(
        upstream.addr,
        redis_config(
            &format!(
                "url = \"{}\"\ntimeout = \"1s\"\non_error = \"deny\"",
                redis.url()
            ),
            "/limited",
            route,
            "",
        ),
    )
    .await;
    let admin = admin_addr(&proxy).await;
    let mut conn = proxy.client().h1().await;
    let what = format!("{outage:?}, on_error = {on_error}");

    // The instance under test asks Redis (its gauge reads 1 only after a
    // Redis answer)...
    wait_until_redis_decides(&mut conn, admin, "/limited").await;
    // ...and K is spent there: 3 pass, the 4th is refused.
    let key = fresh_key("k");
    let mut to_helper = helper.client().h1().await;
    for left in [2, 1, 0] {
        let answer = send(&mut to_helper, "/limited", &api_key(&key)).await;
        assert_passed(&answer, "/limited", 3, left, "K through the helper");
    }
    let answer = send(&mut to_helper, "/limited", &api_key(&key)).await;
    assert_limited(&answer, 3, "K refused by Redis, through the helper");
    let before = metrics(admin).await;
    let errors_before = redis_errors(&before);
    assert_eq!(redis_up(&before), 1.0, "{what}");
    let failing_before = failing_events(&proxy);
    let forwarded = upstream.count();

    match outage {
        Outage::Killed => redis.kill(),
        Outage::Stopped => redis.stop().await,
    }

    // 30 requests for K, paced so that the circuit's probes (500 ms, then
    // 1 s later) fall among them: each probe may cost up to the timeout.
    let mut answers = Vec::new();
    let mut took = Vec::new();
    for _ in 0..30 {
        let started = Instant::now();
        let answer = send(&mut conn, "/limited", &api_key(&key)).await;
        took.push(started.elapsed());
        answers.push(answer);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }

    match on_error {
        "local" => {
            // This instance's own limiter, which never saw K: the burst
            // passes again, then its own 429 (Redis would refuse them all).
            for (i, answer) in answers.iter().enumerate() {
                let what = format!("{what}: request {} during the outage", i + 1);
                if i < 3 {
                    assert_passed(answer, "/limited", 3, 2 - i as u64, &what);
                } else {
                    assert_limited(answer, 3, &what);
                }
            }
            assert_eq!(upstream.count(), forwarded + 3, "{what}");
        }
        "allow" => {
            for (i, answer) in answers.iter().enumerate() {
                common::assert_echo(
                    answer,
                    "/limited",
                    &format!("{what}: request {} during the outage", i + 1),
                );
            }
            assert_eq!(
                upstream.count(),
                forwarded + 30,
                "{what}: every request reached the upstream"
            );
        }
        "deny" => {
            for (i, answer) in answers.iter().enumerate() {
                assert_unavailable(
                    answer,
                    &format!("{what}: request {} during the outage", i + 1),
                );
            }
            assert_eq!(upstream.count(), forwarded, "{what}: nothing forwarded");
        }
        other => panic!("on_error {other}"),
    }

    let mut sorted = took.clone();
    sorted.sort();
    let (p90, max) = (sorted[26], sorted[29]);
    eprintln!("{what}: p90 {p90:?}, max {max:?}");
    assert!(
        p90 <= P90_BOUND && max <= MAX_BOUND,
        "{what}: p90 {p90:?} (bound {P90_BOUND:?}), max {max:?} (bound {MAX_BOUND:?}); all: {took:?}"
    );

    // Not vacuous: Redis really was failing, and the proxy said so.
    let found = eventually(Duration::from_secs(10), || {
        failing_events(&proxy) > failing_before
    })
    .await;
    assert!(
        found,
        "{what}: no \"redis is failing\" after the outage:\n{}",
        proxy.stderr_text()
    );
    let event = diagnostics(&proxy).into_iter().rfind(is_failing).unwrap();
    assert_eq!(event["on_error"], on_error, "{event}");
    let after = metrics(admin).await;
    let errors_after = redis_errors(&after);
    assert!(
        total(&errors_after) > total(&errors_before),
        "{what}: errors before {errors_before:?}, after {errors_after:?}"
    );
    if outage == Outage::Stopped {
        assert!(
            errors_after["timeout"] > errors_before["timeout"],
            "{what}: a frozen Redis times out: {errors_after:?}"
        );
    }
    assert_eq!(redis_up(&after), 0.0, "{what}");

    // Readiness does not depend on Redis.
    let (status, body) = common::plain_get(admin, "/readyz").await;
    assert_eq!(status, 200, "{what}: /readyz {body}");
}

#[tokio::test]
async fn redis_killed_on_error_local_uses_this_instances_limiter() {
    if !redis_server_installed() {
        return;
    }
    redis_fails_mid_test(Outage::Killed, "local").await;
}

#[tokio::test]
async fn redis_killed_on_error_allow_forwards_everything() {
    if !redis_server_installed() {
        return;
    }
    redis_fails_mid_test(Outage::Killed, "allow").await;
}

#[tokio::test]
async fn redis_killed_on_error_deny_answers_503() {
    if !redis_server_installed() {
        return;
    }
    redis_fails_mid_test(Outage::Killed, "deny").await;
}

#[tokio::test]
async fn redis_stopped_on_error_local_uses_this_instances_limiter() {
    if !redis_server_installed() {
        return;
    }
    redis_fails_mid_test(Outage::Stopped, "local").await;
}

#[tokio::test]
async fn redis_stopped_on_error_allow_forwards_everything() {
    if !redis_server_installed() {
        return;
    }
    redis_fails_mid_test(Outage::Stopped, "allow").await;
}

#[tokio::test]
async fn redis_stopped_on_error_deny_answers_503() {
    if !redis_server_installed() {
        return;
    }
    redis_fails_mid_test(Outage::Stopped, "deny").await;
}

// ---------------------------------------------------------------------------
// 4. Redis comes (back) up: shared again within seconds

/// Two instances with `rate = "1/m", burst = 1` by API key and
/// `on_error = "local"`. Their local limiters never see a key twice below,
/// so a 429 can only be Redis's.
fn recovery_config(redis_url: &str) -> ProxyConfig {
    redis_config(
        &format!("url = \"{redis_url}\"\ntimeout = \"200ms\"\non_error = \"local\""),
        "/shared",
        "rate = \"1/m\", burst = 1, key = \"header:X-Api-Key\"",
        "",
    )
}

/// Whether the limit is shared right now, both ways: a fresh key spent
/// through `first` is refused by `second`, and another through `second` is
/// refused by `first`. Each first request must pass (a fresh key).
async fn shared_both_ways(a: &Proxy, b: &Proxy) -> bool {
    let mut both = true;
    for (first, second) in [(a, b), (b, a)] {
        let key = fresh_key("shared");
        let answer = get(first, "/shared", &api_key(&key)).await;
        common::assert_echo(&answer, "/shared", "a fresh key's first request");
        let answer = get(second, "/shared", &api_key(&key)).await;
        match answer.status.as_u16() {
            429 => {
                assert_limited(&answer, 1, "the same key through the other instance");
            }
            200 => both = false,
            _ => panic!("unexpected {} {}", answer.status, answer.text()),
        }
    }
    both
}

/// Requests (fresh keys: this instance's limiter passes them) through both
/// instances until each has logged that Redis is failing, and for at least
/// `at_least`, so that failed probes have pushed their back-offs up.
async fn drive_outage(a: &Proxy, b: &Proxy, at_least: Duration) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(15);
    loop {
        for proxy in [a, b] {
            let key = fresh_key("outage");
            let answer = get(proxy, "/shared", &api_key(&key)).await;
            common::assert_echo(&answer, "/shared", "on_error = local during the outage");
        }
        if failing_events(a) > 0 && failing_events(b) > 0 && started.elapsed() >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no \"redis is failing\" from both instances within 15 s:\nA:\n{}\nB:\n{}",
            a.stderr_text(),
            b.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls [`shared_both_ways`] from the moment Redis answers PING, for at
/// most [`RECOVERY_BOUND`]; then checks both instances said so.
async fn assert_shared_again(
    a: &Proxy,
    b: &Proxy,
    redis_up_at: Instant,
    after_outage: bool,
    what: &str,
) {
    let mut attempts = 0;
    loop {
        attempts += 1;
        if shared_both_ways(a, b).await {
            break;
        }
        assert!(
            redis_up_at.elapsed() < RECOVERY_BOUND,
            "{what}: not shared {:?} after Redis came up ({attempts} attempts)\nA:\n{}\nB:\n{}",
            redis_up_at.elapsed(),
            a.stderr_text(),
            b.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "{what}: shared again {:?} after Redis came up ({attempts} attempts)",
        redis_up_at.elapsed()
    );
    for proxy in [a, b] {
        // The circuit had opened, and a Redis answer closed it.
        if after_outage {
            wait_diagnostic(proxy, "\"redis answers again\"", is_answering).await;
        }
        let admin = admin_addr(proxy).await;
        assert_eq!(redis_up(&metrics(admin).await), 1.0, "{what}");
    }
}

#[tokio::test]
async fn redis_restarted_on_its_port_is_shared_again_within_15s() {
    if !redis_server_installed() {
        return;
    }
    let mut redis = RedisServer::start().await;
    let port = redis.port;
    let upstream = Upstream::start().await;
    let a = Proxy::start(upstream.addr, recovery_config(&redis.url())).await;
    let b = Proxy::start(upstream.addr, recovery_config(&redis.url())).await;
    let up_at = Instant::now();
    assert_shared_again(&a, &b, up_at, false, "before the restart").await;

    redis.kill();
    drive_outage(&a, &b, Duration::from_secs(3)).await;
    let redis = RedisServer::start_on(port).await;
    let up_at = Instant::now();
    assert_shared_again(&a, &b, up_at, true, "after the restart").await;
    // The new Redis (empty until now) holds the keys.
    let keys = all_keys(&mut redis.connection().await).await;
    assert!(
        !keys.is_empty()
            && keys
                .iter()
                .all(|k| is_header_key(k, "portcullis", "/shared")),
        "{keys:?}"
    );
}

#[tokio::test]
async fn redis_started_after_the_proxies_is_shared_within_15s_and_readyz_never_waits() {
    if !redis_server_installed() {
        return;
    }
    let port = redis_port();
    let url = format!("redis://127.0.0.1:{port}");
    let upstream = Upstream::start().await;
    let a = Proxy::start(upstream.addr, recovery_config(&url)).await;
    let b = Proxy::start(upstream.addr, recovery_config(&url)).await;

    // No Redis: requests are served (their own limiter), ready all along.
    drive_outage(&a, &b, Duration::from_secs(2)).await;
    for proxy in [&a, &b] {
        let admin = admin_addr(proxy).await;
        let (status, body) = common::plain_get(admin, "/readyz").await;
        assert_eq!(status, 200, "/readyz without Redis: {body}");
        let m = metrics(admin).await;
        assert_eq!(redis_up(&m), 0.0);
        assert!(
            redis_errors(&m)["refused"] > 0.0,
            "connections were refused: {m}"
        );
    }

    let redis = RedisServer::start_on(port).await;
    let up_at = Instant::now();
    assert_shared_again(&a, &b, up_at, true, "Redis started after the proxies").await;
    assert!(!all_keys(&mut redis.connection().await).await.is_empty());
}

// ---------------------------------------------------------------------------
// 5. Many keys: all prefixed, all expiring; unlimited routes skip Redis

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_keys_are_prefixed_and_expire_and_unlimited_routes_skip_redis() {
    if !redis_server_installed() {
        return;
    }
    const KEYS: usize = 5_000;
    const PREFIX: &str = "pc-test-5k";
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(
        upstream.addr,
        redis_config(
            &format!(
                "url = \"{}\"\nkey_prefix = \"{PREFIX}\"\ntimeout = \"1s\"\non_error = \"deny\"",
                redis.url()
            ),
            "/keys",
            "rate = \"1/h\", burst = 2, key = \"header:X-Api-Key\"",
            "\n[[routes]]\npath = \"/open\"\n",
        ),
    )
    .await;

    // 5,000 requests, each with its own API key: 64 at a time over 4 HTTP/2
    // connections.
    let started = Instant::now();
    let port = proxy.https.port();
    let mut connections = Vec::new();
    for _ in 0..4 {
        connections.push(proxy.client().h2().await);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..64 {
        let mut h2 = connections[task % connections.len()].clone();
        let next = next.clone();
        tasks.spawn(async move {
            let mut bad = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= KEYS {
                    return bad;
                }
                let request = http::Request::builder()
                    .uri(format!("https://localhost:{port}/keys"))
                    .header("x-api-key", format!("secret-api-key-{i:05}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                h2.ready().await.expect("h2 connection usable");
                let exchange =
                    async { common::collect(h2.send_request(request).await.unwrap()).await };
                let answer = tokio::time::timeout(REQUEST_BOUND, exchange)
                    .await
                    .unwrap_or_else(|_| panic!("request {i}: no answer within {REQUEST_BOUND:?}"));
                if answer.status != 200
                    || answer.header("ratelimit") != Some("\"default\";r=1;t=3600")
                {
                    bad.push((
                        i,
                        answer.status,
                        answer.header("ratelimit").map(String::from),
                    ));
                }
            }
        });
    }
    let mut bad = Vec::new();
    while let Some(result) = tasks.join_next().await {
        bad.extend(result.unwrap());
    }
    eprintln!("{KEYS} requests in {:?}", started.elapsed());
    assert!(
        bad.is_empty(),
        "{} of {KEYS} not a 200 with r=1, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    assert_eq!(upstream.count(), KEYS);

    // The whole keyspace: one key per API key, each under the prefix, as a
    // digest, with a TTL of at most one full refill (2 × 1 h).
    let mut con = redis.connection().await;
    let keys: Vec<String> = all_keys(&mut con).await.into_iter().collect();
    assert_eq!(keys.len(), KEYS, "distinct keys in Redis");
    let dbsize: u64 = redis::cmd("DBSIZE").query_async(&mut con).await.unwrap();
    assert_eq!(dbsize, KEYS as u64);
    for key in &keys {
        assert!(key.starts_with(&format!("{PREFIX}:")), "{key}");
        assert!(is_header_key(key, PREFIX, "/keys"), "{key}");
        assert!(!key.contains("secret-api-key"), "{key}");
    }
    let ttls = pttls(&mut con, &keys).await;
    let without: Vec<_> = keys
        .iter()
        .zip(&ttls)
        .filter(|(_, ttl)| !(1..=7_200_000).contains(*ttl))
        .take(5)
        .collect();
    assert!(without.is_empty(), "keys without a TTL (PTTL): {without:?}");

    // A route without rate_limit runs no script.
    let before = script_calls(&mut con).await;
    assert!(
        before >= KEYS as u64,
        "{before} script calls for {KEYS} requests"
    );
    let mut conn = proxy.client().h1().await;
    for i in 0..50 {
        let key = format!("open-{i}");
        let answer = send(&mut conn, "/open", &api_key(&key)).await;
        common::assert_echo(&answer, "/open", "a route without rate_limit");
        assert!(answer.header("ratelimit").is_none());
    }
    assert_eq!(
        script_calls(&mut con).await,
        before,
        "scripts run for /open"
    );
    assert_eq!(all_keys(&mut con).await.len(), KEYS);
}

#[tokio::test]
async fn without_a_rate_limited_route_redis_is_never_contacted() {
    if !redis_server_installed() {
        return;
    }
    let redis = RedisServer::start().await;
    let mut con = redis.connection().await;
    let connections_before = info_field(&mut con, "stats", "total_connections_received").await;
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(
        upstream.addr,
        ProxyConfig {
            rest: format!(
                "[redis]\nurl = \"{}\"\n\n[[routes]]\npath = \"/api\"\n",
                redis.url()
            ),
            ..Default::default()
        },
    )
    .await;
    let mut conn = proxy.client().h1().await;
    for path in ["/api", "/api/x", "/other"] {
        let answer = send(&mut conn, path, &api_key("some-key")).await;
        common::assert_echo(&answer, path, path);
    }
    // Said at startup, which the requests above come after.
    wait_diagnostic(&proxy, "the notice that Redis is not contacted", |e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("no route has a rate_limit"))
    })
    .await;
    assert_eq!(
        info_field(&mut con, "stats", "total_connections_received").await,
        connections_before,
        "the proxy connected to Redis"
    );
    assert!(all_keys(&mut con).await.is_empty());
}

// ---------------------------------------------------------------------------
// `check`

/// A whole `proxy.toml` with `rest` at the end, next to a fresh certificate.
fn write_config(dir: &Path, rest: &str) -> (std::path::PathBuf, String) {
    make_cert(dir, "cert", &["localhost"]);
    let text = format!(
        "[server]\nhttps_listen = \"127.0.0.1:0\"\n\n[tls]\ncert = \"cert.pem\"\nkey = \"cert.key\"\n\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n\n{rest}"
    );
    let path = dir.join("proxy.toml");
    std::fs::write(&path, &text).unwrap();
    (path, text)
}

/// `portcullis check`, which must finish within 10 s: exit code, stdout, stderr.
fn check(config: &Path) -> (Option<i32>, String, String) {
    let child = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(config)
        .env_remove("PORTCULLIS_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run portcullis check");
    let pid = child.id();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match finished.recv_timeout(Duration::from_secs(10)) {
        Ok(output) => {
            let output = output.unwrap();
            (
                output.status.code(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        }
        Err(_) => {
            signal(pid, "KILL");
            panic!("check did not finish within 10 s");
        }
    }
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

const LIMITED_ROUTE: &str =
    "[[routes]]\npath = \"/api\"\nrate_limit = { rate = \"5/m\", burst = 5 }\n";

#[test]
fn check_accepts_redis_without_contacting_it() {
    // Nothing listens: check still succeeds.
    let dead = common::dead_port();
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_config(
        dir.path(),
        &format!(
            "[redis]\nurl = \"redis://{}\"\ntimeout = \"50ms\"\non_error = \"deny\"\nkey_prefix = \"edge\"\n\n{LIMITED_ROUTE}",
            dead.addr
        ),
    );
    let (code, stdout, stderr) = check(&config);
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.contains("redis"),
        "the summary names [redis]: {stdout}"
    );

    // Something listens: check never connects to it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let (config, _) = write_config(
        dir.path(),
        &format!(
            "[redis]\nurl = \"redis://{}\"\n\n{LIMITED_ROUTE}",
            listener.local_addr().unwrap()
        ),
    );
    let (code, stdout, stderr) = check(&config);
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("check connected to the Redis address: {other:?}"),
    }
}

#[test]
fn check_names_bad_redis_values_with_line_and_column() {
    for (redis, at, key) in [
        ("url = \"http://x\"", "\"http://x\"", "redis.url"),
        (
            "url = \"redis://127.0.0.1:6379\"\ntimeout = \"0s\"",
            "\"0s\"",
            "redis.timeout",
        ),
        (
            "url = \"redis://127.0.0.1:6379\"\non_error = \"maybe\"",
            "\"maybe\"",
            "redis.on_error",
        ),
        (
            "url = \"redis://127.0.0.1:6379\"\nkey_prefix = \"\"",
            "\"\"\n\n[[routes]]",
            "redis.key_prefix",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (config, text) =
            write_config(dir.path(), &format!("[redis]\n{redis}\n\n{LIMITED_ROUTE}"));
        let (code, stdout, stderr) = check(&config);
        assert_eq!(code, Some(2), "{redis}\nstdout: {stdout}\nstderr: {stderr}");
        let (line, col) = position(&text, at);
        let expected = format!("proxy.toml:{line}:{col}: {key}: ");
        assert!(
            stderr.contains(&expected),
            "{redis}: expected {expected:?} in {stderr:?}"
        );
        assert!(
            stdout.is_empty(),
            "no summary for an invalid file: {stdout}"
        );
    }
}
