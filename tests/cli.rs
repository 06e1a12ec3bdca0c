//! SPEC "Command line": `check`, `gen-cert`, `token`, `--config` resolution,
//! exit statuses and `file:line:col: key: message` errors.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine;
use common::{BIN, Proxy, TestCert, TlsClient, Upstream};

const SECRET: &str = "an-integration-test-secret-of-32+-bytes!";

/// `portcullis ARGS` with a clean environment for the variables it reads.
fn portcullis(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove("PORTCULLIS_CONFIG")
        .env_remove("JWT_SECRET");
    command
}

fn run(mut command: impl std::borrow::BorrowMut<Command>) -> Output {
    command.borrow_mut().output().expect("run portcullis")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn gen_cert(dir: &Path) {
    let out = dir.join("certs");
    let output = run(portcullis(&["gen-cert", "--out", out.to_str().unwrap()]).current_dir(dir));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

/// A temporary directory holding a copy of the shipped `proxy.toml` and a
/// development certificate made by `gen-cert`.
fn shipped_config() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml"),
        &config,
    )
    .unwrap();
    common::copy_shipped_schemas(dir.path());
    gen_cert(dir.path());
    (dir, config)
}

/// A minimal valid configuration with `extra_server` / `extra_tls` lines.
fn minimal(cert: &str, extra_server: &str, extra_tls: &str) -> String {
    format!(
        "[server]\nhttps_listen = \"127.0.0.1:0\"\n{extra_server}\n[tls]\ncert = \"{cert}\"\nkey = \"certs/key.pem\"\n{extra_tls}\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n"
    )
}

/// 1-based line and column of the first occurrence of `needle` in `text`.
fn position(text: &str, needle: &str) -> (usize, usize) {
    let offset = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle} not in {text}"));
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap().chars().count() + 1;
    (line, col)
}

/// Writes `text` as `proxy.toml` next to a dev certificate, runs `check` on
/// it and asserts exit 2 with `FILE:LINE:COL: KEY: ` where LINE:COL is the
/// place of `at` in the text.
fn assert_config_error(text: &str, at: &str, key: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    gen_cert(dir.path());
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, text).unwrap();
    let output = run(portcullis(&["check", "--config", config.to_str().unwrap()]));
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "stderr: {err}");
    let (line, col) = position(text, at);
    let expected = format!("{}:{line}:{col}: {key}: ", config.display());
    assert!(err.contains(&expected), "expected {expected:?} in {err:?}");
    assert!(
        stdout(&output).trim().is_empty(),
        "check printed a summary for an invalid file: {}",
        stdout(&output)
    );
    err
}

#[test]
fn check_accepts_the_shipped_proxy_toml_and_lists_listeners_and_routes() {
    let (_dir, config) = shipped_config();
    let output =
        run(portcullis(&["check", "--config", config.to_str().unwrap()]).env("JWT_SECRET", SECRET));
    let out = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    for listener in ["127.0.0.1:8443", "127.0.0.1:8080", "127.0.0.1:9901"] {
        assert!(out.contains(listener), "{listener} not listed in:\n{out}");
    }
    for route in ["/api/admin", "/api", "/login"] {
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().next() == Some(route)),
            "route {route} not listed in:\n{out}"
        );
    }
    assert!(
        out.contains("127.0.0.1:3000"),
        "upstream not listed:\n{out}"
    );
}

#[test]
fn check_changes_nothing() {
    let (dir, config) = shipped_config();
    let before = listing(dir.path());
    let output =
        run(portcullis(&["check", "--config", config.to_str().unwrap()]).env("JWT_SECRET", SECRET));
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    assert_eq!(listing(dir.path()), before);
}

fn listing(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(listing(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out.sort();
    out
}

#[test]
fn check_names_an_unknown_key() {
    let text = minimal("certs/cert.pem", "bogus = 1\n", "");
    let err = assert_config_error(&text, "bogus = 1", "server.bogus");
    assert!(err.contains("proxy.toml:3:1: server.bogus: "), "{err}");
}

#[test]
fn check_names_a_bad_duration() {
    let text = minimal("certs/cert.pem", "idle_timeout = \"ten\"\n", "");
    let err = assert_config_error(&text, "\"ten\"", "server.idle_timeout");
    assert!(
        err.contains("proxy.toml:3:16: server.idle_timeout: "),
        "{err}"
    );
    assert!(err.contains("\"ten\""), "the bad value is quoted: {err}");
}

#[test]
fn check_names_a_missing_cert_file() {
    let text = minimal("certs/missing.pem", "", "");
    let err = assert_config_error(&text, "\"certs/missing.pem\"", "tls.cert");
    assert!(err.contains("missing.pem"), "{err}");
}

#[test]
fn check_refuses_forward_claims_naming_a_header_the_proxy_sets() {
    for header in ["Host", "X-Forwarded-For", "Content-Length"] {
        let text = format!(
            "{}\n[jwt]\nalgorithms = [\"HS256\"]\nsecret_env = \"JWT_SECRET\"\nforward_claims = {{ sub = \"{header}\" }}\n",
            minimal("certs/cert.pem", "", "")
        );
        let err = assert_config_error(&text, &format!("\"{header}\""), "jwt.forward_claims.sub");
        assert!(err.contains("the proxy sets itself"), "{err}");
    }
}

#[test]
fn check_refuses_min_version_1_0() {
    let text = minimal("certs/cert.pem", "", "min_version = \"1.0\"\n");
    let err = assert_config_error(&text, "\"1.0\"", "tls.min_version");
    assert!(err.contains("\"1.0\""), "{err}");
}

#[test]
fn check_refuses_a_key_that_does_not_match_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    gen_cert(dir.path());
    let other = dir.path().join("other");
    let output = run(portcullis(&["gen-cert", "--out", other.to_str().unwrap()]));
    assert_eq!(output.status.code(), Some(0));
    let text = "[server]\nhttps_listen = \"127.0.0.1:0\"\n\n[tls]\ncert = \"certs/cert.pem\"\nkey = \"other/key.pem\"\n\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n";
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, text).unwrap();
    let output = run(portcullis(&["check", "--config", config.to_str().unwrap()]));
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("{}:", config.display())) && err.contains("tls."),
        "{err}"
    );
}

/// Runs `check` on a configuration whose `[jwt] key` names `certs/broken`,
/// a file holding `contents`: exit 2, with that value's place, the key, the
/// file and then `why`.
fn assert_broken_key_file(key: &str, contents: &str, why: &str) {
    let dir = tempfile::tempdir().unwrap();
    gen_cert(dir.path());
    std::fs::write(dir.path().join("certs/broken"), contents).unwrap();
    let text = format!(
        "{}\n[jwt]\nalgorithms = [\"ES256\"]\n{key} = \"certs/broken\"\n",
        minimal("certs/cert.pem", "", "")
    );
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, &text).unwrap();
    let output = run(portcullis(&["check", "--config", config.to_str().unwrap()]));
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let (line, col) = position(&text, "\"certs/broken\"");
    let expected = format!(
        "{}:{line}:{col}: jwt.{key}: certs/broken: {why}",
        config.display()
    );
    let err = stderr(&output);
    assert!(err.contains(&expected), "expected {expected:?} in {err:?}");
}

#[test]
fn check_names_the_file_of_a_broken_jwks() {
    assert_broken_key_file("jwks", "<html>not json</html>", "not a JWKS document (");
    assert_broken_key_file("jwks", r#"{"keys": []}"#, "holds no key usable");
}

#[test]
fn check_names_the_file_of_a_broken_public_key() {
    assert_broken_key_file("public_key", "hello", "is not a PEM file");
    // Spelled in pieces: no file in the repository holds a key's armour.
    let label = ["PRIVATE", "KEY"].join(" ");
    let private = format!("-----BEGIN {label}-----\nAAAA\n-----END {label}-----\n");
    assert_broken_key_file("public_key", &private, "holds a private key");
}

#[test]
fn check_never_fetches_jwks_url() {
    let dir = tempfile::tempdir().unwrap();
    gen_cert(dir.path());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let text = format!(
        "{}\n[jwt]\nalgorithms = [\"ES256\"]\njwks_url = \"http://{}/jwks.json\"\n",
        minimal("certs/cert.pem", "", ""),
        listener.local_addr().unwrap()
    );
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, text).unwrap();
    let output = run(portcullis(&["check", "--config", config.to_str().unwrap()]));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("jwks_url http://"),
        "{}",
        stdout(&output)
    );
    assert_eq!(
        listener.accept().map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::WouldBlock),
        "check connected to jwks_url"
    );
}

#[test]
fn run_refuses_to_start_without_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    gen_cert(dir.path());
    let text = minimal("certs/missing.pem", "", "");
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, &text).unwrap();
    let mut child = portcullis(&["run", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A proxy that started anyway would never exit: bound the wait.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("run started without its certificate");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let output = child.wait_with_output().unwrap();
    let err = stderr(&output);
    assert_eq!(status.code(), Some(2), "{err}");
    let (line, col) = position(&text, "\"certs/missing.pem\"");
    assert!(
        err.contains(&format!("proxy.toml:{line}:{col}: tls.cert: ")),
        "{err}"
    );
    assert!(!err.contains("listening on"), "{err}");
}

#[test]
fn a_usage_error_exits_2() {
    for args in [
        &["check", "--no-such-flag"][..],
        &["--no-such-flag"][..],
        &["no-such-command"][..],
        &["token"][..], // --sub is required
        &["token", "--sub", "a", "--ttl", "ten"][..],
    ] {
        let output = run(portcullis(args));
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn an_unreadable_config_file_exits_2_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.toml");
    let output = run(portcullis(&[
        "check",
        "--config",
        missing.to_str().unwrap(),
    ]));
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("nowhere.toml"),
        "{}",
        stderr(&output)
    );
}

// ---- --config resolution -------------------------------------------------

#[test]
fn config_defaults_to_proxy_toml_in_the_working_directory() {
    let (dir, _config) = shipped_config();
    let output = run(portcullis(&["check"])
        .current_dir(dir.path())
        .env("JWT_SECRET", SECRET));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stdout(&output).contains("/api/admin"));

    // No ./proxy.toml and no $PORTCULLIS_CONFIG: an error naming proxy.toml.
    let empty = tempfile::tempdir().unwrap();
    let output = run(portcullis(&["check"]).current_dir(empty.path()));
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("proxy.toml"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn config_falls_back_to_the_environment_before_the_working_directory() {
    let (dir, config) = shipped_config();
    // The working directory has a broken proxy.toml: the variable wins.
    let cwd = tempfile::tempdir().unwrap();
    std::fs::write(cwd.path().join("proxy.toml"), "[server]\nbogus = 1\n").unwrap();
    let output = run(portcullis(&["check"])
        .current_dir(cwd.path())
        .env("PORTCULLIS_CONFIG", &config)
        .env("JWT_SECRET", SECRET));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stdout(&output).contains("/api/admin"));

    // --config wins over the variable.
    let output = run(portcullis(&["check", "--config", config.to_str().unwrap()])
        .current_dir(cwd.path())
        .env("PORTCULLIS_CONFIG", cwd.path().join("proxy.toml"))
        .env("JWT_SECRET", SECRET));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    // The variable naming a broken file is used (and fails), not ./proxy.toml.
    let output = run(portcullis(&["check"])
        .current_dir(dir.path())
        .env("PORTCULLIS_CONFIG", cwd.path().join("proxy.toml"))
        .env("JWT_SECRET", SECRET));
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(
        err.contains(&format!("{}:", cwd.path().join("proxy.toml").display())),
        "{err}"
    );
}

// ---- gen-cert ------------------------------------------------------------

#[test]
fn gen_cert_writes_a_private_key_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let output = run(portcullis(&["gen-cert", "--out", out.to_str().unwrap()]));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stdout(&output).is_empty(), "{}", stdout(&output));
    let cert = std::fs::read_to_string(out.join("cert.pem")).unwrap();
    let key = std::fs::read_to_string(out.join("key.pem")).unwrap();
    assert!(cert.contains("-----BEGIN CERTIFICATE-----"));
    assert!(key.contains("PRIVATE KEY-----"));
    let mode = std::fs::metadata(out.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "key mode {:o}", mode & 0o777);

    // A second run without --force changes nothing and fails.
    let output = run(portcullis(&["gen-cert", "--out", out.to_str().unwrap()]));
    assert_ne!(output.status.code(), Some(0));
    assert!(stderr(&output).contains("--force"), "{}", stderr(&output));
    assert_eq!(std::fs::read_to_string(out.join("cert.pem")).unwrap(), cert);
    assert_eq!(std::fs::read_to_string(out.join("key.pem")).unwrap(), key);

    // With --force both are replaced, and the key is still 0600.
    let output = run(portcullis(&[
        "gen-cert",
        "--out",
        out.to_str().unwrap(),
        "--force",
    ]));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_ne!(std::fs::read_to_string(out.join("cert.pem")).unwrap(), cert);
    assert_ne!(std::fs::read_to_string(out.join("key.pem")).unwrap(), key);
    let mode = std::fs::metadata(out.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn gen_cert_default_names_are_served_by_the_proxy() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let output = run(portcullis(&["gen-cert", "--out", out.to_str().unwrap()]));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let cert = TestCert::read(out.join("cert.pem"), out.join("key.pem")).expect("cert.pem");
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nhttps_listen = \"127.0.0.1:0\"\nworkers = 1\n\n[tls]\ncert = \"certs/cert.pem\"\nkey = \"certs/key.pem\"\n\n[upstream]\nurl = \"http://{}\"\n",
            upstream.addr
        ),
    )
    .unwrap();
    let proxy = Proxy::spawn(dir, cert, config, &[]).await;
    for name in ["localhost", "127.0.0.1", "::1"] {
        let mut client: TlsClient = proxy.client();
        client.server_name = name.into();
        let answer = client.get("/hello").await;
        assert_eq!(answer.status, 200, "as {name}");
    }
    // A name the certificate does not carry is refused by the client.
    let client = proxy.client();
    let config = client.config(rustls::DEFAULT_VERSIONS, &[b"http/1.1"]);
    assert!(client.connect_with(config, "example.com").await.is_err());
}

#[test]
fn gen_cert_takes_other_names() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let output = run(portcullis(&[
        "gen-cert",
        "--out",
        out.to_str().unwrap(),
        "--host",
        "app.internal.test",
    ]));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let cert = TestCert::read(out.join("cert.pem"), out.join("key.pem")).expect("cert.pem");
    let der = cert.der.as_ref();
    let needle = b"app.internal.test";
    assert!(der.windows(needle.len()).any(|w| w == needle));
    assert!(!der.windows(9).any(|w| w == b"localhost"));
}

// ---- token ---------------------------------------------------------------

fn jwt_config(dir: &Path) -> PathBuf {
    gen_cert(dir);
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        "[server]\nhttps_listen = \"127.0.0.1:0\"\n\n[tls]\ncert = \"certs/cert.pem\"\nkey = \"certs/key.pem\"\n\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n\n[jwt]\nalgorithms = [\"HS256\"]\nsecret_env = \"JWT_SECRET\"\nissuer = \"https://auth.example.com\"\naudience = \"orders-api\"\n",
    )
    .unwrap();
    config
}

fn decode_part(part: &str) -> serde_json::Value {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap_or_else(|e| panic!("{part} is not base64url: {e}"));
    serde_json::from_slice(&bytes).expect("JSON")
}

#[test]
fn token_prints_a_signed_jwt_with_the_requested_claims() {
    let dir = tempfile::tempdir().unwrap();
    let config = jwt_config(dir.path());
    let output = run(portcullis(&[
        "token",
        "--sub",
        "alice",
        "--scope",
        "a b",
        "--config",
        config.to_str().unwrap(),
    ])
    .env("JWT_SECRET", SECRET));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let out = stdout(&output);
    let token = out.trim();
    assert_eq!(out.lines().count(), 1, "only the token on stdout: {out:?}");
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token:?}");
    assert!(parts.iter().all(|p| !p.is_empty()), "{token:?}");
    let header = decode_part(parts[0]);
    assert_eq!(header["alg"], "HS256");
    let claims = decode_part(parts[1]);
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["scope"], "a b");
    assert_eq!(claims["iss"], "https://auth.example.com");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let exp = claims["exp"].as_i64().expect("numeric exp");
    // --ttl defaults to 15 minutes.
    assert!(
        (now + 15 * 60 - 60..=now + 15 * 60 + 60).contains(&exp),
        "exp {exp}, now {now}"
    );

    // The secret comes from the environment: without it there is no token.
    let output = run(portcullis(&[
        "token",
        "--sub",
        "alice",
        "--config",
        config.to_str().unwrap(),
    ]));
    assert_ne!(output.status.code(), Some(0));
    assert!(stdout(&output).trim().is_empty());
}

#[test]
fn token_without_a_jwt_section_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    gen_cert(dir.path());
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, minimal("certs/cert.pem", "", "")).unwrap();
    let output = run(portcullis(&[
        "token",
        "--sub",
        "alice",
        "--config",
        config.to_str().unwrap(),
    ]));
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("[jwt]"), "{}", stderr(&output));
    assert!(stdout(&output).is_empty());
}

#[tokio::test]
async fn a_minted_token_is_accepted_by_the_proxy_on_a_jwt_route() {
    let upstream = Upstream::start().await;
    let config = common::ProxyConfig {
        rest: "[jwt]\nalgorithms = [\"HS256\"]\nsecret_env = \"JWT_SECRET\"\nforward_claims = { sub = \"X-Auth-Subject\" }\n\n[[routes]]\npath = \"/private\"\njwt = true\nscopes = [\"read\"]\n".into(),
        env: vec![("JWT_SECRET".into(), SECRET.into())],
        ..Default::default()
    };
    let proxy = Proxy::start(upstream.addr, config).await;
    let mint = |scope: &str| {
        let output = run(portcullis(&[
            "token",
            "--sub",
            "alice",
            "--scope",
            scope,
            "--ttl",
            "5m",
            "--config",
            proxy.config_path.to_str().unwrap(),
        ])
        .env("JWT_SECRET", SECRET));
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        stdout(&output).trim().to_string()
    };
    let client = proxy.client();
    assert_eq!(client.get("/private").await.status, 401);

    let token = mint("read write");
    let bearer = format!("Bearer {token}");
    let answer = client
        .request(
            http::Method::GET,
            "/private/doc",
            &[("authorization", &bearer)],
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        upstream.last().headers.get("x-auth-subject").unwrap(),
        "alice"
    );
    let event = proxy
        .wait_event(|e| e["path"] == "/private/doc" && e.get("status").is_some())
        .await;
    assert_eq!(event["sub"], "alice", "{event}");
    assert_eq!(event["route"], "/private", "{event}");

    // A token without the route's scope is refused.
    let token = mint("write");
    let bearer = format!("Bearer {token}");
    let answer = client
        .request(
            http::Method::GET,
            "/private/doc",
            &[("authorization", &bearer)],
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(answer.status, 403, "{}", answer.text());

    // Token values never reach the log.
    let logged = proxy.stdout.lock().unwrap().join("\n");
    let signature = token.rsplit('.').next().unwrap();
    assert!(!logged.contains(signature), "{logged}");
}

/// Each `[acme]` key is validated by `check`, which points at the value and
/// names the key, and creates nothing (not even `cache_dir`).
#[test]
fn check_refuses_each_bad_acme_key_and_creates_nothing() {
    let acme = |body: &str| {
        format!(
            "[server]\nhttps_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n\n[acme]\n{body}\n"
        )
    };
    let cases = [
        ("domains = []", "[]", "acme.domains"),
        (
            "domains = [\"a.example.com\", \"192.0.2.1\"]",
            "\"192.0.2.1\"",
            "acme.domains[1]",
        ),
        (
            "domains = [\"*.example.com\"]",
            "\"*.example.com\"",
            "acme.domains[0]",
        ),
        (
            "domains = [\"a.example.com\", \"A.example.com\"]",
            "\"A.example.com\"",
            "acme.domains[1]",
        ),
        (
            "domains = [\"a.example.com\"]\nchallenge = \"dns-01\"",
            "\"dns-01\"",
            "acme.challenge",
        ),
        (
            "domains = [\"a.example.com\"]\ndirectory = \"acme.example.com/dir\"",
            "\"acme.example.com/dir\"",
            "acme.directory",
        ),
        (
            "domains = [\"a.example.com\"]\nrenew_before = \"soon\"",
            "\"soon\"",
            "acme.renew_before",
        ),
        (
            "domains = [\"a.example.com\"]\nrenew_before = \"0s\"",
            "\"0s\"",
            "acme.renew_before",
        ),
        (
            "domains = [\"a.example.com\"]\ndirectory_ca = \"certs/missing.pem\"",
            "\"certs/missing.pem\"",
            "acme.directory_ca",
        ),
        (
            "domains = [\"a.example.com\"]\ndirectory_ca = \"certs/key.pem\"",
            "\"certs/key.pem\"",
            "acme.directory_ca",
        ),
        (
            "domains = [\"a.example.com\"]\nemail = \"nobody\"",
            "\"nobody\"",
            "acme.email",
        ),
        (
            "domains = [\"a.example.com\"]\neab_kid = \"kid-1\"",
            "\"kid-1\"",
            "acme.eab_kid",
        ),
        (
            "domains = [\"a.example.com\"]\neab_hmac_key_env = \"EAB_KEY\"",
            "\"EAB_KEY\"",
            "acme.eab_hmac_key_env",
        ),
        (
            "domains = [\"a.example.com\"]\neab_kid = \"kid-1\"\neab_hmac_key_env = \"PORTCULLIS_TEST_NEVER_SET\"",
            "\"PORTCULLIS_TEST_NEVER_SET\"",
            "acme.eab_hmac_key_env",
        ),
    ];
    for (body, at, key) in cases {
        assert_config_error(&acme(body), at, key);
    }
    // http-01 is answered on http_listen: without it, the challenge is refused.
    let text = "[server]\nhttps_listen = \"127.0.0.1:0\"\n\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n\n[acme]\ndomains = [\"a.example.com\"]\nchallenge = \"http-01\"\n";
    assert_config_error(text, "\"http-01\"", "acme.challenge");

    let dir = tempfile::tempdir().unwrap();
    gen_cert(dir.path());
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        acme("domains = [\"a.example.com\", \"www.example.com\"]\ncache_dir = \"state/acme\""),
    )
    .unwrap();
    let output = run(portcullis(&["check", "--config", config.to_str().unwrap()]));
    let out = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        out.contains("acme: a.example.com, www.example.com (http-01")
            && out.contains("no usable certificate cached"),
        "{out}"
    );
    assert!(
        !dir.path().join("state").exists(),
        "check created the cache directory"
    );
}

/// A certificate valid until `not_after` (year, month, day), for `name`,
/// written as `certs/STEM.pem` and `certs/STEM.key`.
fn cert_until(dir: &Path, stem: &str, name: &str, not_after: (i32, u8, u8)) {
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    std::fs::write(dir.join(format!("certs/{stem}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("certs/{stem}.key")), key.serialize_pem()).unwrap();
}

/// The civil date `days` after 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

#[test]
fn check_lists_each_certificate_with_its_expiry_and_warns_under_30_days() {
    let dir = tempfile::tempdir().unwrap();
    let today = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        / 86_400;
    cert_until(
        dir.path(),
        "main",
        "localhost",
        civil_from_days(today + 200),
    );
    cert_until(
        dir.path(),
        "soon",
        "soon.example.com",
        civil_from_days(today + 10),
    );
    cert_until(dir.path(), "gone", "gone.example.com", (2021, 1, 1));
    let text = "[server]\nhttps_listen = \"127.0.0.1:0\"\n\n[tls]\ncert = \"certs/main.pem\"\nkey = \"certs/main.key\"\n\n[[tls.sni]]\nserver_name = \"soon.example.com\"\ncert = \"certs/soon.pem\"\nkey = \"certs/soon.key\"\n\n[[tls.sni]]\nserver_name = \"gone.example.com\"\ncert = \"certs/gone.pem\"\nkey = \"certs/gone.key\"\n\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n";
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, text).unwrap();
    let output = run(portcullis(&["check", "--config", config.to_str().unwrap()]));
    let out = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let line = |label: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("certificate {label}:")))
            .unwrap_or_else(|| panic!("no line for {label} in:\n{out}"))
            .to_owned()
    };
    let main = line("tls.cert");
    assert!(
        main.contains("localhost (expires ") && !main.contains("WARNING"),
        "{main}"
    );
    let soon = line("tls.sni soon.example.com");
    assert!(soon.contains("WARNING: less than 30 days left"), "{soon}");
    let gone = line("tls.sni gone.example.com");
    assert!(
        gone.contains("2021-01-01T00:00:00Z") && gone.contains("WARNING: expired"),
        "{gone}"
    );
}
