//! `portcullis demo`: the newcomer's one command. Makes a development
//! certificate if there is none (or the one there runs out within a week),
//! keeps a JWT secret in a file that `portcullis token` finds too, starts
//! the mock upstream and the proxy with the repository's `proxy.toml`, and
//! prints curl commands that work.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use http::header;

use super::Failure;
use crate::cmd::token::{MintRequest, mint};

/// Where the demo keeps its HS* secret, relative to the configuration's
/// directory. A file rather than the demo's own environment so that
/// `portcullis token` in a second terminal signs with the same secret; in
/// `certs/` with a `.key` suffix because `.gitignore` already keeps
/// `certs/*.key` out of the repository.
pub const SECRET_FILE: &str = "certs/demo-jwt-secret.key";

/// A development certificate with less than this left is replaced, so that
/// a demo started today still serves next week.
pub const RENEW_WITHIN: Duration = Duration::from_secs(7 * 86_400);

/// What `[jwt] secret_env` defaults to (SPEC), for reading the raw file.
const DEFAULT_SECRET_ENV: &str = "JWT_SECRET";

/// Where the demo's HS* secret came from, for the walkthrough.
enum SecretSource {
    /// The operator exported the variable: the demo uses it and leaves the file alone.
    Environment { var: String },
    File {
        var: String,
        path: PathBuf,
        created: bool,
    },
}

pub fn demo(config_path: &Path) -> Result<(), Failure> {
    let certs = config_dir(config_path).join("certs");
    ensure_dev_cert(&certs, SystemTime::now())?;
    let secret = match hmac_secret_env(config_path) {
        Some(var) if std::env::var_os(&var).is_none() => {
            let path = secret_path(config_path);
            let (secret, created) = load_or_create_secret(&path)?;
            // SAFETY: no other thread exists yet: the demo sets the variable
            // before starting any runtime or worker.
            unsafe { std::env::set_var(&var, secret) };
            Some(SecretSource::File { var, path, created })
        }
        Some(var) => Some(SecretSource::Environment { var }),
        None => None,
    };
    let config = crate::config::load(config_path)?;
    let _log = crate::telemetry::init(config.log.json, &config.log.level);

    let upstream = match config.upstream.servers.as_slice() {
        [crate::config::ServerAddress::Tcp(authority)] => authority.clone(),
        _ => {
            return Err(Failure::Usage(
                "demo: [upstream] must be one url = \"http://IP:PORT\" for the mock upstream"
                    .into(),
            ));
        }
    };
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

    print_walkthrough(&config, config_path, secret.as_ref());
    crate::server::run(config)?;
    Ok(())
}

/// The directory relative file names in the configuration start from.
fn config_dir(config_path: &Path) -> &Path {
    config_path.parent().unwrap_or(Path::new(""))
}

/// The demo's secret file for the configuration at `config_path`.
pub fn secret_path(config_path: &Path) -> PathBuf {
    config_dir(config_path).join(SECRET_FILE)
}

/// The variable `[jwt]` reads its HS* secret from, when the configuration
/// at `config_path` has a `[jwt]` section that lists an HS* algorithm.
///
/// Read from the raw TOML because validating the configuration is what
/// fails while that variable is unset; a file that cannot be read or parsed
/// yields `None`, and `config::load` then reports it with its place.
pub fn hmac_secret_env(config_path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(config_path).ok()?;
    let file: toml::Table = toml::from_str(&text).ok()?;
    let jwt = file.get("jwt")?.as_table()?;
    let uses_hmac = match jwt.get("algorithms") {
        None => true,
        Some(list) => list.as_array()?.iter().any(|alg| {
            alg.as_str()
                .is_some_and(|a| a.to_ascii_uppercase().starts_with("HS"))
        }),
    };
    if !uses_hmac {
        return None;
    }
    let var = match jwt.get("secret_env") {
        None => DEFAULT_SECRET_ENV,
        Some(value) => value.as_str()?,
    };
    // `set_var` panics on such a name; no environment can hold it anyway.
    if var.is_empty() || var.contains(['=', '\0']) {
        return None;
    }
    Some(var.to_string())
}

/// The secret in the demo's file, `None` when there is no such file.
/// Surrounding whitespace is not part of it: the file ends with a newline
/// and may have been written by hand.
pub fn read_secret(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Ok(None),
        // An environment variable cannot hold a NUL (`set_var` would panic).
        Ok(text) if text.contains('\0') => Err(anyhow::anyhow!(
            "{} holds a NUL byte; delete it and the demo makes a new secret",
            path.display()
        )),
        Ok(text) => Ok(Some(text.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The secret in `path`, or a new random one written there (mode 0600).
/// The flag says whether it was created now.
fn load_or_create_secret(path: &Path) -> anyhow::Result<(String, bool)> {
    if let Some(secret) = read_secret(path)? {
        return Ok((secret, false));
    }
    let secret = random_secret()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // An empty file left by an interrupted write is replaced; `create_new`
    // then gives the fresh file mode 0600 from its first byte.
    let _ = std::fs::remove_file(path);
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?
    };
    file.write_all(format!("{secret}\n").as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok((secret, true))
}

/// 64 random bytes, base64url: long enough for HS512, the most demanding
/// HS* algorithm (64 bytes, its hash output size).
fn random_secret() -> anyhow::Result<String> {
    use base64::Engine;
    let mut bytes = [0u8; 64];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("no secure random numbers for the demo's JWT secret"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Why the demo writes a new certificate into `certs`, if it must.
#[derive(Debug, PartialEq, Eq)]
enum CertState {
    Missing,
    Expiring {
        not_after: SystemTime,
    },
    Fine,
    /// A certificate whose dates cannot be read: perhaps the operator's own,
    /// so it is left for `config::load` to judge rather than overwritten.
    Unreadable,
}

fn cert_state(certs: &Path, now: SystemTime) -> CertState {
    let (cert, key) = (certs.join("cert.pem"), certs.join("key.pem"));
    if !cert.exists() || !key.exists() {
        return CertState::Missing;
    }
    let Some(validity) = std::fs::read(&cert)
        .ok()
        .and_then(|pem| super::gen_cert::validity(&pem))
    else {
        return CertState::Unreadable;
    };
    match now.checked_add(RENEW_WITHIN) {
        Some(soon) if validity.not_after > soon => CertState::Fine,
        _ => CertState::Expiring {
            not_after: validity.not_after,
        },
    }
}

fn ensure_dev_cert(certs: &Path, now: SystemTime) -> anyhow::Result<()> {
    let why = match cert_state(certs, now) {
        CertState::Fine => return Ok(()),
        CertState::Unreadable => {
            eprintln!(
                "demo: cannot read the dates of {}; keeping it",
                certs.join("cert.pem").display()
            );
            return Ok(());
        }
        CertState::Missing => String::new(),
        CertState::Expiring { not_after } => {
            let verb = if not_after <= now {
                "expired"
            } else {
                "expires"
            };
            format!(
                " ({} {verb} {})",
                certs.join("cert.pem").display(),
                super::gen_cert::display_date(not_after)
            )
        }
    };
    let hosts: Vec<String> = super::gen_cert::DEFAULT_HOSTS
        .iter()
        .map(|h| h.to_string())
        .collect();
    let validity = super::gen_cert::write_dev_cert(certs, &hosts)?;
    eprintln!(
        "demo: wrote a development certificate to {}, valid until {}{why}",
        certs.display(),
        super::gen_cert::display_date(validity.not_after)
    );
    Ok(())
}

fn print_walkthrough(
    config: &crate::config::Config,
    config_path: &Path,
    secret: Option<&SecretSource>,
) {
    let port = config.server.https_listen.port();
    let base = format!("https://localhost:{port}");
    let cacert = config
        .tls
        .cert_path
        .as_deref()
        .unwrap_or(Path::new("(none)"))
        .display();
    eprintln!();
    eprintln!(
        "portcullis demo: the mock upstream is on {}, the proxy on {base}",
        config.upstream.servers[0]
    );
    eprintln!("Try these in another terminal (the dev certificate is {cacert}):");
    eprintln!();
    eprintln!("  curl --cacert {cacert} -i {base}/hello");
    let dropped: Vec<&str> = [header::SERVER.as_str(), "x-powered-by"]
        .into_iter()
        .filter(|name| config.headers.remove.iter().any(|r| r == name))
        .collect();
    if !dropped.is_empty() {
        eprintln!(
            "  curl -i {}/hello             # the app itself: it also sends {}, which the proxy drops",
            config.upstream.servers[0],
            dropped.join(" and ")
        );
    }
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
            scope: scope.clone(),
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
        eprintln!();
        match secret {
            Some(SecretSource::File { var, path, created }) => {
                let state = if *created {
                    "made now"
                } else {
                    "kept from an earlier run"
                };
                eprintln!(
                    "  # {var} is unset, so the demo signs with the secret in {} ({state});",
                    path.display()
                );
                eprintln!("  # `portcullis token` reads it from there too, in any terminal:");
            }
            Some(SecretSource::Environment { var }) => {
                eprintln!(
                    "  # the demo signs with {var}; export the same value where you run `token`:"
                );
            }
            None => eprintln!("  # more tokens:"),
        }
        let scope_arg = match scope {
            Some(s) if s.contains(' ') => format!(" --scope '{s}'"),
            Some(s) => format!(" --scope {s}"),
            None => String::new(),
        };
        eprintln!(
            "  TOKEN=$({} token --config {} --sub alice{scope_arg})",
            self_command(),
            config_path.display()
        );
        eprintln!("  curl --cacert {cacert} -i -H \"Authorization: Bearer $TOKEN\" {base}{path}");
        eprintln!();
    }
    if let Some(form) = config
        .routes
        .iter()
        .find(|r| r.csrf && r.json_schema.is_none())
    {
        let path = &form.path;
        eprintln!(
            "  curl --cacert {cacert} -i -X POST -H 'Origin: https://evil.example' -d 'email=x' {base}{path}   # 403: cross-origin (CSRF)"
        );
    }
    if let Some(orders) = config.routes.iter().find(|r| r.json_schema.is_some()) {
        let path = &orders.path;
        eprintln!(
            "  curl --cacert {cacert} -i -H 'Content-Type: application/json' -d '{{\"items\":[{{\"sku\":\"abc\",\"qty\":0}}]}}' {base}{path}   # 400: schema, with details"
        );
    }
    if let Some(admin) = config.server.admin_listen {
        eprintln!("  curl http://{admin}/metrics");
    }
    eprintln!();
    eprintln!("Stop with Ctrl-C.");
}

/// How to run this binary from another terminal in the same directory:
/// `portcullis` when it is on `PATH`, else its path (a newcomer's
/// `cargo run` leaves it in `target/release/`, which is on no `PATH`).
fn self_command() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "portcullis".into();
    };
    let on_path = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| Some(dir.as_path()) == exe.parent())
    });
    if on_path {
        return "portcullis".into();
    }
    let relative = std::env::current_dir()
        .ok()
        .and_then(|cwd| exe.strip_prefix(cwd).ok().map(Path::to_path_buf));
    relative.unwrap_or(exe).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write_config(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("proxy.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_secret_variable_is_read_from_the_jwt_section() {
        let dir = tempfile::tempdir().unwrap();
        let base = "[server]\nhttps_listen = \"127.0.0.1:0\"\n";
        let cases = [
            ("", None),
            ("[jwt]\n", Some("JWT_SECRET")),
            ("[jwt]\nsecret_env = \"DEMO_KEY\"\n", Some("DEMO_KEY")),
            (
                "[jwt]\nalgorithms = [\"RS256\", \"hs384\"]\n",
                Some("JWT_SECRET"),
            ),
            ("[jwt]\nalgorithms = [\"RS256\"]\n", None),
            ("[jwt]\nsecret_env = 3\n", None),
            ("[jwt]\nsecret_env = \"\"\n", None),
            ("[jwt]\nsecret_env = \"A=B\"\n", None),
            ("[jwt\n", None),
        ];
        for (jwt, expected) in cases {
            let path = write_config(dir.path(), &format!("{base}{jwt}"));
            assert_eq!(hmac_secret_env(&path).as_deref(), expected, "{jwt}");
        }
        assert_eq!(hmac_secret_env(&dir.path().join("missing.toml")), None);
    }

    #[test]
    fn the_secret_file_is_made_once_with_mode_0600_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("proxy.toml");
        let path = secret_path(&config);
        assert_eq!(path, dir.path().join("certs/demo-jwt-secret.key"));
        assert_eq!(read_secret(&path).unwrap(), None);

        let (first, created) = load_or_create_secret(&path).unwrap();
        assert!(created);
        assert!(first.len() >= 64, "{first}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read_secret(&path).unwrap().as_deref(), Some(first.as_str()));

        let (again, created) = load_or_create_secret(&path).unwrap();
        assert!(!created);
        assert_eq!(again, first);

        std::fs::write(&path, "a\0b").unwrap();
        assert!(read_secret(&path).is_err());

        // An empty file (an interrupted write) is replaced.
        std::fs::write(&path, "\n").unwrap();
        let (fresh, created) = load_or_create_secret(&path).unwrap();
        assert!(created);
        assert_ne!(fresh, first);
    }

    #[test]
    fn a_relative_config_keeps_the_secret_under_its_own_certs() {
        assert_eq!(
            secret_path(Path::new("proxy.toml")),
            Path::new("certs/demo-jwt-secret.key")
        );
        assert_eq!(
            secret_path(Path::new("/etc/portcullis/proxy.toml")),
            Path::new("/etc/portcullis/certs/demo-jwt-secret.key")
        );
    }

    #[test]
    fn a_certificate_is_replaced_within_a_week_of_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        let now = SystemTime::now();
        assert_eq!(cert_state(&certs, now), CertState::Missing);

        ensure_dev_cert(&certs, now).unwrap();
        assert_eq!(cert_state(&certs, now), CertState::Fine);
        let pem = std::fs::read(certs.join("cert.pem")).unwrap();
        let validity = crate::cmd::gen_cert::validity(&pem).unwrap();
        let day = Duration::from_secs(86_400);

        let later = validity.not_after - RENEW_WITHIN - day;
        assert_eq!(cert_state(&certs, later), CertState::Fine);
        let within_a_week = validity.not_after - RENEW_WITHIN + day;
        assert_eq!(
            cert_state(&certs, within_a_week),
            CertState::Expiring {
                not_after: validity.not_after
            }
        );
        let expired = validity.not_after + day;
        assert!(matches!(
            cert_state(&certs, expired),
            CertState::Expiring { .. }
        ));

        // Replacing it writes a new pair.
        ensure_dev_cert(&certs, within_a_week).unwrap();
        assert_ne!(std::fs::read(certs.join("cert.pem")).unwrap(), pem);

        // A certificate from before 1970 is replaced too, its date named
        // without the formatter's panic on such dates.
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(1955, 1, 1);
        params.not_after = rcgen::date_time_ymd(1960, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let ancient = params.self_signed(&key).unwrap().pem();
        std::fs::write(certs.join("cert.pem"), &ancient).unwrap();
        assert!(matches!(
            cert_state(&certs, now),
            CertState::Expiring { .. }
        ));
        ensure_dev_cert(&certs, now).unwrap();
        assert_eq!(cert_state(&certs, now), CertState::Fine);

        std::fs::write(certs.join("cert.pem"), "not a certificate").unwrap();
        assert_eq!(cert_state(&certs, now), CertState::Unreadable);
        std::fs::remove_file(certs.join("key.pem")).unwrap();
        assert_eq!(cert_state(&certs, now), CertState::Missing);
    }
}
