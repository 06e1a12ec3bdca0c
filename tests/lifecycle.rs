//! SPEC "Command line" (signals, `demo`), "Logs" and "Admin listener": the
//! proxy's life as an operator sees it.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{BIN, Proxy, ProxyConfig, TestCert, TlsClient, Upstream, dead_addr, eventually};
use http::Method;

/// A plain HTTP/1.1 GET (the admin listener speaks no TLS): status and body.
async fn metrics(proxy: &Proxy) -> String {
    let (status, body) = common::plain_get(proxy.admin.expect("admin listener"), "/metrics").await;
    assert_eq!(status, 200);
    body
}

/// The sample line `name{labels} value` for exactly these labels (any order).
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        if metric != name {
            return None;
        }
        let mut found: Vec<(String, String)> = rest
            .split(',')
            .filter(|s| !s.is_empty())
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.trim_matches('"').to_string()))
            })
            .collect();
        found.sort();
        let mut wanted: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        wanted.sort();
        (found == wanted).then(|| value.parse().ok()).flatten()
    })
}

// ---- signals ---------------------------------------------------------------

#[tokio::test]
async fn sigterm_lets_a_request_in_flight_finish_then_exits_0() {
    let upstream = Upstream::start().await;
    let config = ProxyConfig {
        server: "shutdown_timeout = \"10s\"".into(),
        ..Default::default()
    };
    let mut proxy = Proxy::start(upstream.addr, config).await;
    let client = proxy.client();
    let slow = tokio::spawn({
        let client = client.clone();
        async move { client.get("/delay/2000").await }
    });
    assert!(
        eventually(Duration::from_secs(10), || upstream.count() == 1).await,
        "the slow request reached the upstream"
    );
    let signalled = Instant::now();
    proxy.signal("TERM");

    // New connections are refused while the slow request is still running.
    let mut refused = false;
    while signalled.elapsed() < Duration::from_millis(1500) {
        if tokio::net::TcpStream::connect(proxy.https).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the HTTPS port still accepts after SIGTERM");
    assert!(!slow.is_finished(), "the slow request ended early");

    let answer = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("the slow request completes")
        .expect("request task");
    common::assert_echo(&answer, "/delay/2000", &proxy.stderr_text());
    assert!(signalled.elapsed() >= Duration::from_millis(1500));

    let code = proxy.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "stderr:\n{}", proxy.stderr_text());
    assert!(signalled.elapsed() < Duration::from_secs(10));
    // The completed request was logged before the exit.
    proxy
        .wait_event(|e| e["path"] == "/delay/2000" && e["status"] == 200)
        .await;
}

#[tokio::test]
async fn sigterm_with_nothing_in_flight_exits_0_promptly() {
    let upstream = Upstream::start().await;
    let mut proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    assert_eq!(proxy.client().get("/").await.status, 200);
    proxy.signal("INT");
    let started = Instant::now();
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)).await, Some(0));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn sigterm_gives_up_on_requests_after_shutdown_timeout() {
    let upstream = Upstream::start().await;
    let config = ProxyConfig {
        server: "shutdown_timeout = \"500ms\"".into(),
        ..Default::default()
    };
    let mut proxy = Proxy::start(upstream.addr, config).await;
    let client = proxy.client();
    let _slow = tokio::spawn(async move { client.get("/delay/20000").await });
    assert!(eventually(Duration::from_secs(10), || upstream.count() == 1).await);
    let signalled = Instant::now();
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)).await, Some(0));
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "exit took {:?}",
        signalled.elapsed()
    );
}

#[tokio::test]
async fn sighup_reloads_a_valid_config_and_keeps_the_old_one_on_error() {
    let upstream = Upstream::start().await;
    let config = ProxyConfig {
        rest: "[headers]\nset = { \"X-Version\" = \"1\" }\n".into(),
        ..Default::default()
    };
    let proxy = Proxy::start(upstream.addr, config).await;
    let client = proxy.client();
    let mut kept = client.h1().await;
    let answer = common::send(&mut kept, Method::GET, "/", &[], Bytes::new()).await;
    assert_eq!(answer.header("x-version"), Some("1"));

    let original = std::fs::read_to_string(&proxy.config_path).unwrap();
    let v2 = original.replace("\"X-Version\" = \"1\"", "\"X-Version\" = \"2\"");
    assert_ne!(v2, original);
    std::fs::write(&proxy.config_path, &v2).unwrap();
    proxy.signal("HUP");

    let mut version = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        version = client.get("/").await.header("x-version").map(String::from);
        if version.as_deref() == Some("2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        version.as_deref(),
        Some("2"),
        "reload not applied; stderr:\n{}",
        proxy.stderr_text()
    );
    // The connection opened before the reload is still served.
    let answer = common::send(&mut kept, Method::GET, "/", &[], Bytes::new()).await;
    assert_eq!(answer.status, 200);

    // An invalid file is rejected, logged, and the running config stays.
    let broken = v2.replacen("[server]\n", "[server]\nbogus = 1\n", 1);
    std::fs::write(&proxy.config_path, &broken).unwrap();
    proxy.signal("HUP");
    assert!(
        eventually(Duration::from_secs(10), || {
            let err = proxy.stderr_text();
            err.contains("reload rejected") && err.contains("server.bogus")
        })
        .await,
        "no rejection logged; stderr:\n{}",
        proxy.stderr_text()
    );
    let answer = client.get("/").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-version"), Some("2"));
    let answer = common::send(&mut kept, Method::GET, "/", &[], Bytes::new()).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-version"), Some("2"));
}

// ---- admin listener ----------------------------------------------------------

#[tokio::test]
async fn admin_healthz_and_readyz_follow_the_upstream() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let admin = proxy.admin.expect("admin listener");
    assert_eq!(common::plain_get(admin, "/healthz").await.0, 200);
    assert_eq!(common::plain_get(admin, "/readyz").await.0, 200);
    assert_eq!(common::plain_get(admin, "/nothing-here").await.0, 404);

    let down = Proxy::start(dead_addr(), ProxyConfig::default()).await;
    let admin = down.admin.expect("admin listener");
    assert_eq!(common::plain_get(admin, "/healthz").await.0, 200);
    assert_eq!(common::plain_get(admin, "/readyz").await.0, 503);
}

#[tokio::test]
async fn admin_metrics_count_requests_handshakes_rejections_and_connections() {
    let upstream = Upstream::start().await;
    let config = ProxyConfig {
        rest: "[[routes]]\npath = \"/only-get\"\nmethods = [\"GET\"]\n".into(),
        ..Default::default()
    };
    let proxy = Proxy::start(upstream.addr, config).await;
    let client = proxy.client();
    let tls13 = client.config(&[&rustls::version::TLS13], &[b"http/1.1"]);
    drop(client.connect_with(tls13, "localhost").await.unwrap());
    assert_eq!(client.get("/hello").await.status, 200);
    assert_eq!(client.get("/hello").await.status, 200);
    assert_eq!(client.get("/only-get/x").await.status, 200);
    let refused = client
        .request(Method::POST, "/only-get", &[], "x")
        .await
        .status;
    assert_eq!(refused, 405);
    // One connection held open while the metrics are read.
    let mut open = client.h1().await;
    assert_eq!(
        common::send(&mut open, Method::GET, "/", &[], Bytes::new())
            .await
            .status,
        200
    );

    let text = metrics(&proxy).await;
    for name in [
        "portcullis_requests",
        "portcullis_request_duration_seconds",
        "portcullis_upstream_errors",
        "portcullis_rejections",
        "portcullis_active_connections",
        "portcullis_tls_handshakes",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# TYPE {name} "))),
            "{name} not exposed:\n{text}"
        );
    }
    // Known label values are exposed from the start, at 0.
    for kind in ["connect", "timeout", "reset"] {
        assert_eq!(
            sample(&text, "portcullis_upstream_errors_total", &[("kind", kind)]),
            Some(0.0),
            "{text}"
        );
    }
    let requests = |route: &str, status: &str| {
        sample(
            &text,
            "portcullis_requests_total",
            &[("route", route), ("status", status)],
        )
    };
    assert!(requests("-", "200").unwrap_or(0.0) >= 3.0, "{text}");
    assert_eq!(requests("/only-get", "200"), Some(1.0), "{text}");
    assert_eq!(requests("/only-get", "405"), Some(1.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "portcullis_rejections_total",
            &[("reason", "method_not_allowed")]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "portcullis_request_duration_seconds_count",
            &[("route", "-")]
        )
        .unwrap_or(0.0)
            >= 3.0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "portcullis_request_duration_seconds_bucket",
            &[("route", "-"), ("le", "+Inf")]
        )
        .unwrap_or(0.0)
            >= 3.0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "portcullis_tls_handshakes_total",
            &[("version", "1.3")]
        )
        .unwrap_or(0.0)
            >= 5.0,
        "{text}"
    );
    assert!(
        sample(&text, "portcullis_active_connections", &[]).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    drop(open);
    // The gauge comes back down once the connections are gone.
    let admin = proxy.admin.unwrap();
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        last = common::plain_get(admin, "/metrics").await.1;
        if sample(&last, "portcullis_active_connections", &[]) == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        sample(&last, "portcullis_active_connections", &[]),
        Some(0.0),
        "{last}"
    );
}

#[tokio::test]
async fn admin_metrics_count_upstream_connect_errors() {
    let proxy = Proxy::start(dead_addr(), ProxyConfig::default()).await;
    let answer = proxy.client().get("/").await;
    assert_eq!(answer.status, 502);
    let text = metrics(&proxy).await;
    assert_eq!(
        sample(
            &text,
            "portcullis_upstream_errors_total",
            &[("kind", "connect")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "portcullis_requests_total",
            &[("route", "-"), ("status", "502")]
        ),
        Some(1.0),
        "{text}"
    );
}

// ---- logs --------------------------------------------------------------------

#[tokio::test]
async fn each_request_logs_one_json_line_without_secrets() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let client = proxy.client();
    let search = client
        .request(
            Method::GET,
            "/search?q=query-secret-value&api_key=key-secret-value",
            &[
                ("authorization", "Bearer authorization-secret-value"),
                ("cookie", "session=cookie-secret-value"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(search.status, 200);
    let answer = client
        .get("/set-cookie?sid%3Dset-cookie-secret-value")
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        client
            .request(Method::POST, "/upload", &[], "body-secret-value")
            .await
            .status,
        200
    );

    let event = proxy.wait_event(|e| e["path"] == "/search").await;
    assert_eq!(event["client"], "127.0.0.1");
    assert_eq!(event["method"], "GET");
    assert_eq!(event["route"], "-");
    assert_eq!(event["status"], 200);
    // The body the client got: the upstream's echo, secrets and all.
    assert!(search.body.len() > 100, "{}", search.text());
    assert_eq!(event["bytes"], search.body.len(), "{event}");
    assert!(event["duration_ms"].is_number(), "{event}");
    assert_eq!(event["upstream_status"], 200);
    assert!(
        event["tls"] == "1.3" || event["tls"] == "1.2",
        "tls version: {event}"
    );
    assert!(event.get("sub").is_none(), "{event}");
    proxy.wait_event(|e| e["path"] == "/set-cookie").await;
    proxy.wait_event(|e| e["path"] == "/upload").await;

    // Exactly one access event per request.
    let events = proxy.events(); // panics on any non-JSON line
    for path in ["/search", "/set-cookie", "/upload"] {
        let n = events
            .iter()
            .filter(|e| e["path"] == path && e.get("status").is_some())
            .count();
        assert_eq!(n, 1, "{path}: {events:?}");
    }
    let stdout = proxy.stdout.lock().unwrap().join("\n");
    for secret in [
        "query-secret-value",
        "key-secret-value",
        "authorization-secret-value",
        "cookie-secret-value",
        "set-cookie-secret-value",
        "body-secret-value",
    ] {
        assert!(!stdout.contains(secret), "{secret} logged:\n{stdout}");
    }
    // Banners and diagnostics are on stderr, not stdout.
    assert!(!stdout.contains("listening on"));
    assert!(proxy.stderr_text().contains("https listening on"));
}

#[tokio::test]
async fn a_502_is_logged_without_upstream_status() {
    let proxy = Proxy::start(dead_addr(), ProxyConfig::default()).await;
    assert_eq!(proxy.client().get("/unreachable").await.status, 502);
    let event = proxy.wait_event(|e| e["path"] == "/unreachable").await;
    assert_eq!(event["status"], 502);
    assert!(event.get("upstream_status").is_none(), "{event}");
    assert!(event["bytes"].as_u64().unwrap_or(0) > 0, "{event}");
}

#[tokio::test]
async fn an_upstream_error_status_is_logged_as_such() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    assert_eq!(proxy.client().get("/status/404").await.status, 404);
    let event = proxy.wait_event(|e| e["path"] == "/status/404").await;
    assert_eq!(event["status"], 404);
    assert_eq!(event["upstream_status"], 404);
}

// ---- demo --------------------------------------------------------------------

/// Kills the demo however the test ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn curl_binary() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("curl"))
            .find(|p| p.is_file())
    })
}

#[tokio::test]
async fn the_demo_serves_the_shipped_config_and_answers_curl() {
    let dir = tempfile::tempdir().unwrap();
    let (config, https) = common::shipped_config_on_free_ports(dir.path());

    let child = Command::new(BIN)
        .arg("demo")
        .arg("--config")
        .arg(&config)
        .current_dir(dir.path())
        .env_remove("PORTCULLIS_CONFIG")
        .env_remove("JWT_SECRET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the demo");
    let mut demo = Running(child);
    let stdout_lines = common::pump(demo.0.stdout.take().unwrap());
    let stderr_lines = common::pump(demo.0.stderr.take().unwrap());
    let stderr_text = || stderr_lines.lock().unwrap().join("\n");

    // The demo writes a development certificate because certs/ has none.
    let cert_path = dir.path().join("certs/cert.pem");
    let key_path = dir.path().join("certs/key.pem");
    assert!(
        eventually(Duration::from_secs(20), || key_path.exists()
            && std::fs::read_to_string(&cert_path)
                .is_ok_and(|p| p.contains("END CERTIFICATE")))
        .await,
        "no certificate written; stderr:\n{}",
        stderr_text()
    );
    let cert = TestCert::read(cert_path.clone(), key_path).expect("the written certificate");
    let client = TlsClient::new(&cert, format!("127.0.0.1:{https}").parse().unwrap());

    // Poll until the HTTPS port answers.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let config = client.config(rustls::DEFAULT_VERSIONS, &[b"http/1.1"]);
        if client.connect_with(config, "localhost").await.is_ok() {
            break;
        }
        if let Ok(Some(status)) = demo.0.try_wait() {
            panic!("the demo exited ({status}); stderr:\n{}", stderr_text());
        }
        assert!(
            Instant::now() < deadline,
            "the demo never answered on {https}; stderr:\n{}",
            stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let answer = client.get("/hello").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let echo = answer.json();
    assert_eq!(echo["method"], "GET", "{echo}");
    assert_eq!(echo["path"], "/hello", "{echo}");
    assert!(answer.header("strict-transport-security").is_some());
    // The printed walkthrough names the port the demo serves.
    assert!(
        eventually(Duration::from_secs(5), || stderr_text()
            .contains(&format!("https://localhost:{https}/hello")))
        .await,
        "{}",
        stderr_text()
    );

    match curl_binary() {
        Some(curl) => {
            let url = format!("https://localhost:{https}/hello");
            let output = tokio::process::Command::new(curl)
                .args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
                .arg("--cacert")
                .arg(&cert_path)
                .arg(&url)
                .output()
                .await
                .expect("run curl");
            let out = String::from_utf8_lossy(&output.stdout).into_owned();
            assert!(
                output.status.success(),
                "curl failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let (body, code) = out.rsplit_once('\n').unwrap();
            assert_eq!(code, "200", "{out}");
            let echo: serde_json::Value = serde_json::from_str(body).expect("JSON echo");
            assert_eq!(echo["path"], "/hello");
        }
        None => eprintln!("curl not found on PATH: skipping the curl part of the demo test"),
    }

    // The demo's standard output is the access log alone: JSON lines.
    assert!(
        eventually(Duration::from_secs(10), || {
            stdout_lines.lock().unwrap().iter().any(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .is_ok_and(|e| e["path"] == "/hello" && e["status"] == 200)
            })
        })
        .await,
        "no access event for /hello; stdout: {:?}",
        stdout_lines.lock().unwrap()
    );
    for line in stdout_lines.lock().unwrap().iter() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "non-JSON line on the demo's stdout: {line}"
        );
    }
}

/// Plain GET over loopback TCP to the admin listener.
async fn admin_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    common::read_until_quiet(&mut tcp, std::time::Duration::from_secs(5)).await
}

/// SPEC: `portcullis_upstream_errors_total{kind}` counts timeouts as `timeout`.
#[tokio::test]
async fn an_upstream_timeout_is_counted_as_kind_timeout() {
    let upstream = common::Upstream::start().await;
    let config = common::ProxyConfig {
        upstream: "timeout = \"300ms\"".into(),
        ..Default::default()
    };
    let proxy = common::Proxy::start(upstream.addr, config).await;
    let admin = proxy.admin.expect("admin listener");
    assert!(
        admin_get(admin, "/metrics")
            .await
            .contains("portcullis_upstream_errors_total{kind=\"timeout\"} 0")
    );
    assert_eq!(proxy.client().get("/delay/2000").await.status, 504);
    let metrics = admin_get(admin, "/metrics").await;
    assert!(
        metrics.contains("portcullis_upstream_errors_total{kind=\"timeout\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_upstream_errors_total{kind=\"connect\"} 0"),
        "{metrics}"
    );
}

/// `[log] format = "text"`: the access record still goes to standard output,
/// as a text line carrying the same fields, not as JSON.
#[tokio::test]
async fn text_log_format_writes_access_lines_as_text() {
    let upstream = common::Upstream::start().await;
    let config = common::ProxyConfig {
        rest: "".into(),
        ..Default::default()
    };
    let proxy = common::Proxy::start_with_log(upstream.addr, config, "text").await;
    assert_eq!(
        proxy.client().get("/texty?secret=hunter2").await.status,
        200
    );
    let found = common::eventually(std::time::Duration::from_secs(10), || {
        proxy
            .stdout
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("/texty"))
    })
    .await;
    let lines = proxy.stdout.lock().unwrap().clone();
    assert!(found, "no access line: {lines:?}");
    let line = lines.iter().find(|l| l.contains("/texty")).unwrap();
    assert!(
        serde_json::from_str::<serde_json::Value>(line).is_err(),
        "{line}"
    );
    for field in ["status=200", "route=-", "method=GET"] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
    assert!(!lines.iter().any(|l| l.contains("hunter2")), "{lines:?}");
}

/// A client that stops sending its upload is its own fault, not the
/// upstream's: `portcullis_client_aborts_total` counts it and
/// `portcullis_upstream_errors_total{kind="reset"}` stays at 0.
#[tokio::test]
async fn a_client_that_abandons_its_upload_is_counted_as_a_client_abort() {
    use tokio::io::AsyncWriteExt;
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let before = metrics(&proxy).await;
    assert_eq!(
        sample(&before, "portcullis_client_aborts_total", &[]),
        Some(0.0),
        "{before}"
    );

    let mut tls = proxy.client().connect(&[b"http/1.1"]).await;
    tls.write_all(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n\r\n")
        .await
        .unwrap();
    tls.write_all(&[b'x'; 64 * 1024]).await.unwrap();
    tls.flush().await.unwrap();
    // Half the body is on its way upstream; then the client leaves.
    drop(tls);

    let mut aborts = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while aborts.is_none() && Instant::now() < deadline {
        let text = metrics(&proxy).await;
        if sample(&text, "portcullis_client_aborts_total", &[]) == Some(1.0) {
            aborts = Some(text);
        } else {
            // Polling a scrape: the count lands when the proxy notices the close.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let text = aborts.expect("the abandoned upload was never counted as a client abort");
    assert_eq!(
        sample(
            &text,
            "portcullis_upstream_errors_total",
            &[("kind", "reset")]
        ),
        Some(0.0),
        "{text}"
    );
}

/// A reload that raises `max_header_bytes` reaches hyper's own limits too
/// (its read buffer, HTTP/2's header list) on new connections: a head the
/// old limit refused is then served over both protocols.
#[tokio::test]
async fn a_reloaded_max_header_bytes_applies_to_new_connections() {
    let upstream = Upstream::start().await;
    let config = ProxyConfig {
        server: "max_header_bytes = \"4KiB\"".into(),
        ..Default::default()
    };
    let proxy = Proxy::start(upstream.addr, config).await;
    let client = proxy.client();
    let big = "b".repeat(40 * 1024);
    let answer = client
        .request(Method::GET, "/big", &[("x-big", &big)], Bytes::new())
        .await;
    assert_eq!(answer.status, 431);

    let original = std::fs::read_to_string(&proxy.config_path).unwrap();
    let raised = original.replace(
        "max_header_bytes = \"4KiB\"",
        "max_header_bytes = \"64KiB\"",
    );
    assert_ne!(raised, original);
    std::fs::write(&proxy.config_path, raised).unwrap();
    proxy.signal("HUP");

    let mut status = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        status = client
            .request(Method::GET, "/big", &[("x-big", &big)], Bytes::new())
            .await
            .status
            .as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200, "stderr:\n{}", proxy.stderr_text());
    let mut h2 = client.h2().await;
    let request = http::Request::builder()
        .uri(format!("https://localhost:{}/big-h2", proxy.https.port()))
        .header("x-big", big.as_str())
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let answer = common::collect(h2.send_request(request).await.expect("HTTP/2 answer")).await;
    assert_eq!(answer.status, 200);
}

/// A proxy whose standard output nobody reads (a full pipe, a stuck log
/// shipper) keeps serving: access-log lines past the writer's queue are
/// dropped and counted, never waited for.
#[tokio::test]
async fn a_proxy_whose_stdout_nobody_reads_keeps_serving() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cert = common::make_cert(dir.path(), "cert", &["localhost"]);
    let (https, admin) = (common::loopback_port(), common::loopback_port());
    let toml = format!(
        "[server]\nhttps_listen = \"127.0.0.1:{https}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nworkers = 2\n\n[tls]\ncert = \"cert.pem\"\nkey = \"cert.key\"\n\n[upstream]\nurl = \"http://{}\"\n\n[log]\nformat = \"json\"\nlevel = \"info\"\n",
        upstream.addr
    );
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, toml).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped()) // held, never read
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _stdout_nobody_reads = child.stdout.take();
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Kill(child);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{https}").parse().unwrap();
    assert!(
        common::wait_listening(addr, Duration::from_secs(10)).await,
        "the proxy never listened"
    );
    let client = TlsClient::new(&cert, addr);

    // Far more lines than a pipe (64 KiB) and the writer's queue (8k) hold.
    const REQUESTS: usize = 12_000;
    let mut h2 = client.h2().await;
    let served = tokio::time::timeout(Duration::from_secs(90), async {
        let mut served = 0;
        for batch in 0..REQUESTS / 100 {
            let mut answers = Vec::new();
            for i in 0..100 {
                let request = http::Request::builder()
                    .uri(format!("https://localhost:{https}/r/{batch}/{i}"))
                    .body(http_body_util::Full::new(Bytes::new()))
                    .unwrap();
                answers.push(h2.send_request(request));
            }
            for answer in answers {
                // Body and all: a client that drops an answer unread resets
                // its stream, and hyper's client ends its own connection
                // (GOAWAY too_many_internal_resets) once 1,024 of those
                // resets met data still arriving, which a fast build sees.
                let Ok(response) = answer.await else {
                    continue;
                };
                if response.status() == 200
                    && http_body_util::BodyExt::collect(response.into_body())
                        .await
                        .is_ok()
                {
                    served += 1;
                }
            }
        }
        served
    })
    .await
    .expect("serving stalled behind an unread standard output");
    assert_eq!(served, REQUESTS);
    let (status, text) =
        common::plain_get(format!("127.0.0.1:{admin}").parse().unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    let dropped = sample(&text, "portcullis_log_lines_dropped_total", &[]).unwrap_or(0.0);
    assert!(dropped > 0.0, "no dropped lines counted:\n{text}");
}

/// A second proxy told to listen where one already does refuses to start,
/// instead of sharing the port through its workers' `SO_REUSEPORT`
/// listeners and silently taking part of the traffic.
#[tokio::test]
async fn a_second_proxy_on_a_busy_https_port_refuses_to_start() {
    let upstream = Upstream::start().await;
    let first = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let text = std::fs::read_to_string(&first.config_path).unwrap();
    let busy = format!("https_listen = \"{}\"", first.https);
    let second_config = first.dir.path().join("second.toml");
    std::fs::write(
        &second_config,
        text.replace("https_listen = \"127.0.0.1:0\"", &busy),
    )
    .unwrap();
    let mut second = tokio::process::Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&second_config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), second.wait()).await;
    let Ok(Ok(status)) = status else {
        panic!("the second proxy is still running on {}", first.https);
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = second.stderr.take() {
        use tokio::io::AsyncReadExt;
        pipe.read_to_string(&mut stderr).await.unwrap();
    }
    assert!(!status.success(), "exited {status}: {stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {}", first.https)),
        "{stderr}"
    );
    // The first one serves on.
    assert_eq!(first.client().get("/still-here").await.status, 200);
}

/// Context switches of each of the process's threads, by thread id.
fn context_switches(pid: u32) -> std::collections::HashMap<String, u64> {
    let mut by_thread = std::collections::HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_thread;
    };
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let switches = status
            .lines()
            .filter(|line| line.contains("ctxt_switches:"))
            .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        by_thread.insert(task.file_name().to_string_lossy().into_owned(), switches);
    }
    by_thread
}

/// A proxy with nothing to do sleeps: no worker wakes on a timer of its own
/// while no connection is open and no access line is waiting. Each worker
/// used to wake 30 times a second (a 50 ms accept-loop timer and a 100 ms
/// access-log tick), 120 wake-ups in this test's window.
#[tokio::test]
async fn an_idle_proxy_does_not_wake_up() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let answer = proxy
        .client()
        .request(
            Method::GET,
            "/before-idle",
            &[("connection", "close")],
            Bytes::new(),
        )
        .await;
    assert_eq!(answer.status, 200);
    // The access line is out: the worker's log buffer is empty again.
    proxy.wait_event(|e| e["path"] == "/before-idle").await;

    let before = context_switches(proxy.pid());
    assert!(before.len() >= 3, "threads of the proxy: {before:?}");
    // Not a synchronisation: the window in which nothing may happen. Only
    // the control thread's 10 s maintenance tick may fall into it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = context_switches(proxy.pid());
    let woke: u64 = after
        .iter()
        .filter_map(|(thread, n)| Some(n.saturating_sub(*before.get(thread)?)))
        .sum();
    assert!(
        woke <= 6,
        "{woke} context switches in 2 s of idleness; before {before:?}, after {after:?}"
    );
}
