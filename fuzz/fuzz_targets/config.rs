//! `portcullis::config::load_str` on arbitrary UTF-8 (input byte 0 even) and
//! on TOML put together from lines of a real configuration, each input byte
//! picking one (byte 0 odd): no panic, and every error names the file (and,
//! when it has a place, a line and column inside the text).
//!
//! The configuration is read as if from a fixture directory made once per
//! process, with a development certificate (`certs/cert.pem`,
//! `certs/key.pem`), the shipped `schemas/order.json` and `JWT_SECRET` set,
//! so that validation gets past `[tls]` to `[jwt]`, the routes and the rest.
//! Other files it names do not exist. An input naming an existing file that
//! is not a small regular file (`/dev/zero`, a FIFO, `/proc/...`) is skipped:
//! reading it would hang or exhaust memory, and tells nothing about the
//! parser.
//!
//! Run with `cargo +nightly fuzz run config` from the repository root.

#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// Lines of a configuration, valid and not; generated input picks among them.
const LINES: &[&str] = &[
    "[server]",
    "https_listen = \"127.0.0.1:8443\"",
    "https_listen = \"[::1]:0\"",
    "https_listen = \"localhost:8443\"",
    "http_listen = \"127.0.0.1:8080\"",
    "redirect_https_port = 8443",
    "redirect_https_port = 0",
    "admin_listen = \"127.0.0.1:9901\"",
    "trusted_proxies = [\"10.0.0.0/8\", \"192.0.2.1\", \"::1/128\"]",
    "trusted_proxies = [\"10.0.0.0/33\"]",
    "max_connections = 10000",
    "max_connections = 0",
    "header_read_timeout = \"10s\"",
    "idle_timeout = \"0s\"",
    "shutdown_timeout = \"18446744073709551615s\"",
    "send_timeout = \"1h\"",
    "websocket_idle_timeout = \"5m\"",
    "max_header_bytes = \"16KiB\"",
    "max_header_bytes = \"2MiB\"",
    "max_body_bytes = \"10MiB\"",
    "max_body_bytes = \"1 GB\"",
    "case_insensitive_routes = true",
    "workers = 0",
    "workers = 2",
    "[tls]",
    "cert = \"certs/cert.pem\"",
    "key = \"certs/key.pem\"",
    "cert = \"certs/key.pem\"",
    "key = \"certs/cert.pem\"",
    "min_version = \"1.3\"",
    "min_version = \"1.1\"",
    "alpn = [\"h2\", \"http/1.1\"]",
    "alpn = [\"spdy\"]",
    "[[tls.sni]]",
    "server_name = \"example.com\"",
    "[upstream]",
    "url = \"http://127.0.0.1:3000\"",
    "url = \"https://app.internal\"",
    "url = \"http://[::1]:3000/base?q\"",
    "connect_timeout = \"5s\"",
    "timeout = \"30s\"",
    "pool_idle_timeout = \"90s\"",
    "[hsts]",
    "enabled = false",
    "max_age = 31536000",
    "include_subdomains = true",
    "preload = true",
    "[cookies]",
    "secure = false",
    "http_only = true",
    "same_site = \"Lax\"",
    "same_site = \"none\"",
    "same_site = \"keep\"",
    "same_site = \"sometimes\"",
    "[headers]",
    "add = { \"X-Content-Type-Options\" = \"nosniff\", \"X-Frame-Options\" = \"DENY\" }",
    "set = { \"Server\" = \"portcullis\", \"Bad Name\" = \"x\" }",
    "set = { \"X-Bad-Value\" = \"a\\nb\" }",
    "remove = [\"Server\", \"X-Powered-By\"]",
    "remove = [\"Content-Length\"]",
    "[jwt]",
    "algorithms = [\"HS256\"]",
    "algorithms = [\"RS256\", \"ES256\", \"EdDSA\"]",
    "algorithms = [\"none\"]",
    "algorithms = []",
    "secret_env = \"JWT_SECRET\"",
    "secret_env = \"UNSET_SECRET\"",
    "public_key = \"certs/cert.pem\"",
    "jwks = \"schemas/order.json\"",
    "jwks_url = \"https://auth.example.com/.well-known/jwks.json\"",
    "jwks_url = \"ftp://x\"",
    "jwks_refresh = \"10m\"",
    "issuer = \"https://auth.example.com\"",
    "audience = \"orders-api\"",
    "leeway = \"30s\"",
    "forward_claims = { sub = \"X-Auth-Subject\", scope = \"X-Auth-Scope\" }",
    "forward_claims = { sub = \"Content-Length\" }",
    "forward_claims = { sub = \"X_Forwarded_For\" }",
    "token_cookie = \"access_token\"",
    "token_cookie = \"a=b\"",
    "[log]",
    "format = \"json\"",
    "format = \"text\"",
    "level = \"debug\"",
    "level = \"loud\"",
    "[redis]",
    "url = \"redis://127.0.0.1:6379\"",
    "key_prefix = \"portcullis:\"",
    "on_error = \"allow\"",
    "[acme]",
    "domains = [\"example.com\"]",
    "[[routes]]",
    "path = \"/api\"",
    "path = \"/api/admin\"",
    "path = \"/API\"",
    "path = \"/a/../b\"",
    "path = \"relative\"",
    "path = \"/\"",
    "methods = [\"GET\", \"POST\"]",
    "methods = [\"get\"]",
    "methods = []",
    "jwt = true",
    "scopes = [\"admin\"]",
    "scopes = [\"\"]",
    "rate_limit = { rate = \"10/s\", burst = 20, key = \"sub\" }",
    "rate_limit = { rate = \"5/m\", key = \"ip\" }",
    "rate_limit = { rate = \"0/s\" }",
    "rate_limit = { rate = \"ten\" }",
    "rate_limit = { rate = \"1/h\", burst = 0, key = \"header:X-Api-Key\" }",
    "csrf = true",
    "allowed_origins = [\"https://app.example.com\"]",
    "allowed_origins = [\"null\", \"https://x:99999\"]",
    "json_schema = \"schemas/order.json\"",
    "json_schema = \"certs/cert.pem\"",
    "json_schema = \"missing.json\"",
    "max_body_bytes = \"64KiB\"",
    "max_body_bytes = \"-1\"",
    "# a comment",
    "",
    "x = 1",
    "[server",
    "= \"value\"",
    "\"quoted key\" = 1",
    "key = '''",
    "''' ",
    "[[routes]] # again",
    "path = \"/login\"",
    "path = \"/account\"",
];

struct Fixture {
    config_path: PathBuf,
    dir: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("portcullis-fuzz-config-{}", std::process::id()));
        portcullis::cmd::gen_cert::write_dev_cert(&dir.join("certs"), &["localhost".into()])
            .expect("development certificate");
        std::fs::create_dir_all(dir.join("schemas")).expect("schemas dir");
        std::fs::write(
            dir.join("schemas/order.json"),
            include_str!("../../schemas/order.json"),
        )
        .expect("schema");
        // SAFETY: set once, before any other thread of this process reads
        // the environment (libFuzzer runs the target on one thread).
        unsafe {
            std::env::set_var(
                "JWT_SECRET",
                "fuzzing-secret-that-is-long-enough-0123456789",
            )
        };
        Fixture {
            config_path: dir.join("proxy.toml"),
            dir,
        }
    })
}

/// False when a string in the configuration names something that is not
/// safe to read: an existing file that is not a regular file of at most
/// 1 MiB, or anything under /proc or /sys (whose files look regular).
fn safe_to_load(source: &str, base_dir: &Path) -> bool {
    fn strings<'a>(value: &'a toml::Value, out: &mut Vec<&'a str>) {
        match value {
            toml::Value::String(s) => out.push(s),
            toml::Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
            toml::Value::Table(table) => table.values().for_each(|v| strings(v, out)),
            _ => {}
        }
    }
    let Ok(table) = source.parse::<toml::Table>() else {
        // Not TOML: the loader stops at the syntax, before any file.
        return true;
    };
    let mut found = Vec::new();
    table.values().for_each(|v| strings(v, &mut found));
    found.iter().all(|name| {
        let path = base_dir.join(name);
        let canonical = path.canonicalize().unwrap_or_else(|_| path.clone());
        if canonical.starts_with("/proc")
            || canonical.starts_with("/sys")
            || canonical.starts_with("/dev")
        {
            return false;
        }
        match std::fs::metadata(&path) {
            Ok(meta) => meta.is_file() && meta.len() <= 1 << 20,
            Err(_) => true,
        }
    })
}

fn check(source: &str) {
    let fixture = fixture();
    if !safe_to_load(source, &fixture.dir) {
        return;
    }
    let Err(error) = portcullis::config::load_str(source, &fixture.config_path) else {
        return;
    };
    let file = fixture.config_path.display().to_string();
    assert_eq!(error.file, file);
    let shown = error.to_string();
    assert!(
        shown.starts_with(&format!("{file}:")),
        "error without the file name: {shown}"
    );
    if !error.key.is_empty() {
        assert!(shown.contains(&error.key), "error without its key: {shown}");
    }
    if let Some((line, column)) = error.position {
        let lines = source.split('\n').count();
        assert!(
            line >= 1 && column >= 1 && line <= lines,
            "{line}:{column} is outside the text ({lines} lines): {shown}"
        );
        let line_text = source.split('\n').nth(line - 1).unwrap_or_default();
        assert!(
            column <= line_text.chars().count() + 1,
            "column {column} past the end of line {line}: {shown}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        if let Ok(text) = std::str::from_utf8(rest) {
            check(text);
        }
    } else {
        let mut text = String::new();
        for &pick in rest {
            text.push_str(LINES[usize::from(pick) % LINES.len()]);
            text.push('\n');
        }
        check(&text);
    }
});
