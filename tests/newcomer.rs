//! The newcomer's path through `portcullis demo`: a certificate that has run
//! out is replaced, and the JWT secret the demo signs with is kept in a file
//! that `portcullis token` finds, so a token minted in a second terminal
//! (without `JWT_SECRET`) is accepted by the running demo — also after the
//! demo restarts.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::{BIN, TestCert, TlsClient, eventually};

/// A certificate and key for localhost that expired in 2001.
fn write_expired_cert(certs: &Path) {
    std::fs::create_dir_all(certs).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(certs.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(certs.join("key.pem"), key.serialize_pem()).unwrap();
}

/// A running `portcullis demo`, killed however the test ends.
struct Demo {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Demo {
    fn start(dir: &Path, config: &Path) -> Demo {
        let mut child = Command::new(BIN)
            .arg("demo")
            .arg("--config")
            .arg(config)
            .current_dir(dir)
            .env_remove("PORTCULLIS_CONFIG")
            .env_remove("JWT_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the demo");
        let stderr = common::pump(child.stderr.take().unwrap());
        Demo { child, stderr }
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// A client trusting the demo's certificate, once the demo answers on `port`.
    async fn client(&mut self, certs: &Path, port: u16) -> TlsClient {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the demo exited ({status}); stderr:\n{}",
                    self.stderr_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the demo never answered on {port}; stderr:\n{}",
                self.stderr_text()
            );
            if let Some(client) = try_connect(certs, port).await {
                return client;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS handshake that verifies the served certificate against the one in
/// `certs/cert.pem` (so an expired one would fail).
async fn try_connect(certs: &Path, port: u16) -> Option<TlsClient> {
    let cert = TestCert::read(certs.join("cert.pem"), certs.join("key.pem"))?;
    let client = TlsClient::new(&cert, format!("127.0.0.1:{port}").parse().unwrap());
    let config = client.config(rustls::DEFAULT_VERSIONS, &[b"http/1.1"]);
    client.connect_with(config, "localhost").await.ok()?;
    Some(client)
}

/// `portcullis token` as typed in a second terminal: no `JWT_SECRET`.
fn mint(config: &Path, cwd: &Path) -> (String, String) {
    let output = Command::new(BIN)
        .args(["token", "--sub", "alice", "--scope", "admin", "--config"])
        .arg(config)
        .current_dir(cwd)
        .env_remove("PORTCULLIS_CONFIG")
        .env_remove("JWT_SECRET")
        .output()
        .expect("run portcullis token");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(
        stdout.lines().count(),
        1,
        "only the token on stdout: {stdout:?}"
    );
    (stdout.trim().to_string(), stderr)
}

async fn admin_status(client: &TlsClient, token: &str) -> u16 {
    let bearer = format!("Bearer {token}");
    client
        .request(
            http::Method::GET,
            "/api/admin",
            &[("authorization", &bearer)],
            bytes::Bytes::new(),
        )
        .await
        .status
        .as_u16()
}

#[tokio::test]
async fn a_token_minted_in_a_second_terminal_is_accepted_by_the_demo() {
    let dir = tempfile::tempdir().unwrap();
    let (config, https) = common::shipped_config_on_free_ports(dir.path());
    let certs = dir.path().join("certs");
    write_expired_cert(&certs);
    let expired = std::fs::read(certs.join("cert.pem")).unwrap();

    let mut demo = Demo::start(dir.path(), &config);
    let client = demo.client(&certs, https).await;

    // The expired certificate was replaced by one good for 90 days.
    let pem = std::fs::read(certs.join("cert.pem")).unwrap();
    assert_ne!(pem, expired);
    let validity = portcullis::cmd::gen_cert::validity(&pem).expect("a certificate");
    let left = validity
        .not_after
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(
        left > Duration::from_secs(89 * 86_400) && left <= Duration::from_secs(90 * 86_400),
        "{left:?} left"
    );
    let key_mode = std::fs::metadata(certs.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);

    // The secret is in a file only its owner reads, and the walkthrough says so.
    let secret_file = certs.join("demo-jwt-secret.key");
    let secret = std::fs::read_to_string(&secret_file).expect("the demo's secret file");
    assert!(secret.trim().len() >= 64, "{secret:?}");
    let mode = std::fs::metadata(&secret_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        eventually(Duration::from_secs(10), || demo
            .stderr_text()
            .contains("certs/demo-jwt-secret.key (made now)"))
        .await,
        "{}",
        demo.stderr_text()
    );
    assert!(
        demo.stderr_text().contains("expired"),
        "{}",
        demo.stderr_text()
    );

    // A second terminal: no JWT_SECRET, the token comes from the file.
    let (token, said) = mint(&config, dir.path());
    assert!(
        said.contains(&format!(
            "token: JWT_SECRET is unset; using the demo's secret from {}",
            secret_file.display()
        )),
        "{said}"
    );
    assert_eq!(client.get("/api/admin").await.status, 401);
    assert_eq!(admin_status(&client, &token).await, 200);

    // A relative --config from the configuration's directory, as in the README.
    let (relative_token, said) = mint(Path::new("proxy.toml"), dir.path());
    assert!(
        said.contains("using the demo's secret from certs/demo-jwt-secret.key"),
        "{said}"
    );
    assert_eq!(admin_status(&client, &relative_token).await, 200);

    // Restarted, the demo keeps its secret (and its certificate): the same
    // token is still accepted.
    drop(client);
    drop(demo);
    let mut demo = Demo::start(dir.path(), &config);
    let client = demo.client(&certs, https).await;
    assert_eq!(std::fs::read(certs.join("cert.pem")).unwrap(), pem);
    assert_eq!(std::fs::read_to_string(&secret_file).unwrap(), secret);
    assert_eq!(admin_status(&client, &token).await, 200);
    assert!(
        eventually(Duration::from_secs(10), || demo
            .stderr_text()
            .contains("(kept from an earlier run)"))
        .await,
        "{}",
        demo.stderr_text()
    );
}

#[test]
fn token_without_the_secret_or_the_demo_file_names_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let (cert, key) = (certs.join("cert.pem"), certs.join("key.pem"));
    let output = Command::new(BIN)
        .args(["gen-cert", "--out"])
        .arg(&certs)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("valid until"), "{said}");
    assert!(cert.exists() && key.exists());
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        "[server]\nhttps_listen = \"127.0.0.1:0\"\n\n[tls]\ncert = \"certs/cert.pem\"\nkey = \"certs/key.pem\"\n\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n\n[jwt]\n",
    )
    .unwrap();
    let output = Command::new(BIN)
        .args(["token", "--sub", "alice", "--config"])
        .arg(&config)
        .env_remove("PORTCULLIS_CONFIG")
        .env_remove("JWT_SECRET")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("JWT_SECRET is not set"), "{stderr}");
    assert!(!stderr.contains("demo"), "{stderr}");
    assert!(output.stdout.is_empty());
}
