//! `portcullis demo`: the newcomer's one command. Makes a development
//! certificate if there is none, starts the mock upstream and the proxy with
//! the repository's `proxy.toml`, and prints curl commands that work.

use std::path::Path;
use std::time::Duration;

use super::Failure;
use crate::policy::jwt::{MintRequest, mint};

/// The secret the demo signs with when `JWT_SECRET` is not set. Development only.
const DEMO_SECRET_ENV: &str = "JWT_SECRET";

pub fn demo(config_path: &Path) -> Result<(), Failure> {
    let base = config_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let certs = base.join("certs");
    if !certs.join("cert.pem").exists() || !certs.join("key.pem").exists() {
        let hosts: Vec<String> = super::gen_cert::DEFAULT_HOSTS
            .iter()
            .map(|h| h.to_string())
            .collect();
        super::gen_cert::write_dev_cert(&certs, &hosts)?;
        eprintln!(
            "demo: wrote a development certificate to {}",
            certs.display()
        );
    }
    if std::env::var_os(DEMO_SECRET_ENV).is_none() {
        let secret = random_secret();
        // SAFETY: no other thread exists yet: the demo sets the variable
        // before starting any runtime or worker.
        unsafe { std::env::set_var(DEMO_SECRET_ENV, secret) };
    }
    let config = crate::config::load(config_path)?;
    let _log = crate::telemetry::init(config.log.json, &config.log.level);

    let upstream = config.upstream.authority.clone();
    let upstream_addr: std::net::SocketAddr =
        format!("{}:{}", upstream.host(), upstream.port_u16().unwrap_or(80))
            .parse()
            .map_err(|_| {
                Failure::Usage(format!(
                    "demo: the upstream {upstream} must be an IP address and port"
                ))
            })?;
    let mock = std::net::TcpListener::bind(upstream_addr).map_err(|e| {
        anyhow::anyhow!("demo: cannot start the mock upstream on {upstream_addr}: {e}")
    })?;
    mock.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("mock-upstream".into())
        .spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(mock) {
                    Ok(listener) => {
                        let _ = super::mock_upstream::serve(listener, std::future::pending()).await;
                    }
                    Err(error) => eprintln!("demo: mock upstream failed: {error}"),
                }
            });
        })?;

    print_walkthrough(&config, config_path);
    crate::server::run(config)?;
    Ok(())
}

fn random_secret() -> String {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    // The aws-lc RNG behind rustls: a failure here means no secure randomness at all.
    let _ = aws_lc_rng_fill(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn aws_lc_rng_fill(bytes: &mut [u8]) -> Result<(), rustls::Error> {
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(bytes)
        .map_err(|_| rustls::Error::FailedToGetRandomBytes)
}

fn print_walkthrough(config: &crate::config::Config, config_path: &Path) {
    let port = config.server.https_listen.port();
    let base = format!("https://localhost:{port}");
    let cacert = config.tls.cert_path.display();
    eprintln!();
    eprintln!(
        "portcullis demo: the mock upstream is on http://{}, the proxy on {base}",
        config.upstream.authority
    );
    eprintln!("Try these in another terminal (the dev certificate is {cacert}):");
    eprintln!();
    eprintln!("  curl --cacert {cacert} -i {base}/hello");
    if let Some(addr) = config.server.http_listen {
        eprintln!(
            "  curl -i http://localhost:{}/hello            # 308 to HTTPS",
            addr.port()
        );
    }
    eprintln!(
        "  curl --cacert {cacert} -i '{base}/set-cookie?session=abc'   # Secure; HttpOnly; SameSite added"
    );
    eprintln!("  curl --cacert {cacert} -i {base}/..%2fadmin                # 400: encoded slash");
    if let Some(jwt) = &config.jwt {
        let protected = config.routes.iter().find(|r| r.jwt);
        let path = protected.map_or("/api/admin", |r| r.path.as_str());
        let scope = protected
            .map(|r| r.scopes.join(" "))
            .filter(|s| !s.is_empty());
        let request = MintRequest {
            subject: "demo-user".into(),
            scope,
            ttl: Duration::from_secs(3600),
            extra_claims: Vec::new(),
            issuer: jwt.settings.issuer.clone(),
            audience: jwt.settings.audience.clone(),
        };
        eprintln!("  curl --cacert {cacert} -i {base}{path}                # 401: no token");
        match mint(&jwt.settings, None, &request) {
            Ok(token) => eprintln!(
                "  curl --cacert {cacert} -i -H 'Authorization: Bearer {token}' {base}{path}"
            ),
            Err(error) => eprintln!("  (cannot mint a demo token: {error})"),
        }
        eprintln!(
            "  # more tokens: portcullis token --config {} --sub alice --scope admin",
            config_path.display()
        );
    }
    if let Some(admin) = config.server.admin_listen {
        eprintln!("  curl http://{admin}/metrics");
    }
    eprintln!();
    eprintln!("Stop with Ctrl-C.");
}
