//! `docs/configuration.md` is held to the code: every ```toml block in it
//! is loaded by the real binary's `check`, and every key `proxy.toml`
//! accepts is documented there.
//!
//! A block is a fragment. Before checking it, the test puts in front of it
//! the sections the fragment does not write itself, with only the keys
//! they require:
//!
//! - `[server]`   `https_listen = "127.0.0.1:8443"`
//! - `[tls]`      `cert = "certs/cert.pem"`, `key = "certs/key.pem"`
//!   (left out when the fragment has `[acme]`, which stands in for them)
//! - `[upstream]` `url = "http://127.0.0.1:3000"`
//! - `[jwt]`      defaults only, when a route of the fragment has `jwt = true`
//!
//! A fragment that writes one of these sections itself must write its
//! required keys too: TOML allows no second `[server]` to add them.
//!
//! Files the fragments may name, all relative to the configuration's
//! directory: `certs/cert.pem` + `certs/key.pem` (localhost),
//! `certs/api.pem` + `certs/api.key` (api.example.com),
//! `certs/jwt-public.pem` (an ES256 public key), `certs/jwks.json` (a JWKS
//! holding that key, kid `docs-1`), `certs/test-ca.pem` and
//! `schemas/order.json`. `JWT_SECRET` is set (64 bytes) for `check`.
//!
//! A block tagged ```toml refused shows something this version refuses:
//! `check` must exit 2, and the error it prints must point into the
//! fragment, not into the sections added in front of it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use common::BIN;

const SECRET: &str = "a-documentation-test-secret-that-is-long-enough-for-hs512-too-0123";

struct Block {
    /// 1-based line of the opening fence in the Markdown file.
    line: usize,
    refused: bool,
    text: String,
}

fn doc_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md")
}

fn toml_blocks(markdown: &str) -> Vec<Block> {
    enum State {
        Text,
        Toml(Block),
        /// Inside another language's block.
        Other,
    }
    let mut blocks = Vec::new();
    let mut state = State::Text;
    for (i, line) in markdown.lines().enumerate() {
        let fence = line.trim_start().strip_prefix("```");
        state = match (state, fence) {
            (State::Toml(block), Some(_)) => {
                blocks.push(block);
                State::Text
            }
            (State::Toml(mut block), None) => {
                block.text.push_str(line);
                block.text.push('\n');
                State::Toml(block)
            }
            (State::Other, Some(_)) => State::Text,
            (State::Other, None) => State::Other,
            (State::Text, None) => State::Text,
            (State::Text, Some(info)) => {
                let mut words = info.split_whitespace();
                if words.next() == Some("toml") {
                    let refused = match words.next() {
                        None => false,
                        Some("refused") => true,
                        Some(other) => panic!(
                            "docs/configuration.md:{}: unknown tag {other:?} on a toml block",
                            i + 1
                        ),
                    };
                    State::Toml(Block {
                        line: i + 1,
                        refused,
                        text: String::new(),
                    })
                } else {
                    State::Other
                }
            }
        };
    }
    assert!(
        matches!(state, State::Text),
        "docs/configuration.md ends inside a fenced block"
    );
    blocks
}

/// True when `text` opens the table `[name]` itself.
fn has_header(text: &str, name: &str) -> bool {
    text.lines().any(|line| {
        let line = line.split('#').next().unwrap_or_default().trim();
        line.strip_prefix('[')
            .and_then(|l| l.strip_suffix(']'))
            .is_some_and(|inner| !inner.starts_with('[') && inner.trim() == name)
    })
}

/// The sections the block does not write itself, with their required keys.
fn base_for(block: &Block) -> String {
    let parsed: toml::Table = toml::from_str(&block.text).unwrap_or_else(|e| {
        panic!(
            "docs/configuration.md:{}: not TOML: {e}\n{}",
            block.line, block.text
        )
    });
    let mut base = String::new();
    let mut require = |section: &str, keys: &[&str], lines: &str| {
        if has_header(&block.text, section) {
            let table = parsed.get(section).and_then(|v| v.as_table());
            for key in keys {
                // `[upstream]` names its servers in `url` or in `servers`.
                let alternative = (section == "upstream" && *key == "url").then_some("servers");
                assert!(
                    block.refused
                        || table.is_some_and(|t| {
                            t.contains_key(*key) || alternative.is_some_and(|a| t.contains_key(a))
                        }),
                    "docs/configuration.md:{}: the fragment writes [{section}] without its required {key}",
                    block.line
                );
            }
        } else {
            base.push_str(lines);
        }
    };
    require(
        "server",
        &["https_listen"],
        "[server]\nhttps_listen = \"127.0.0.1:8443\"\n\n",
    );
    if !parsed.contains_key("acme") {
        require(
            "tls",
            &["cert", "key"],
            "[tls]\ncert = \"certs/cert.pem\"\nkey = \"certs/key.pem\"\n\n",
        );
    }
    require(
        "upstream",
        &["url"],
        "[upstream]\nurl = \"http://127.0.0.1:3000\"\n\n",
    );
    let needs_jwt = parsed
        .get("routes")
        .and_then(|r| r.as_array())
        .is_some_and(|routes| {
            routes
                .iter()
                .any(|r| r.get("jwt").and_then(|j| j.as_bool()) == Some(true))
        });
    if needs_jwt && !parsed.contains_key("jwt") {
        base.push_str("[jwt]\n\n");
    }
    base
}

/// The files the documented fragments name.
fn provide_files(dir: &Path) {
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let cert = common::make_cert(&certs, "cert", &["localhost", "127.0.0.1", "::1"]);
    std::fs::copy(&cert.key_path, certs.join("key.pem")).unwrap();
    std::fs::copy(&cert.cert_path, certs.join("test-ca.pem")).unwrap();
    common::make_cert(&certs, "api", &["api.example.com"]);

    let jwt_key = rcgen::KeyPair::generate().unwrap();
    std::fs::write(certs.join("jwt-public.pem"), jwt_key.public_key_pem()).unwrap();
    // An uncompressed P-256 point: 0x04, then x and y.
    let point = jwt_key.public_key_raw();
    assert_eq!(point.len(), 65);
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let jwks = serde_json::json!({ "keys": [{
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "docs-1",
        "x": b64(&point[1..33]), "y": b64(&point[33..65]),
    }]});
    std::fs::write(certs.join("jwks.json"), jwks.to_string()).unwrap();

    std::fs::create_dir_all(dir.join("schemas")).unwrap();
    std::fs::write(
        dir.join("schemas/order.json"),
        r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["item", "quantity"],
  "properties": {
    "item": { "type": "string", "minLength": 1 },
    "quantity": { "type": "integer", "minimum": 1 }
  },
  "additionalProperties": false
}
"#,
    )
    .unwrap();
}

/// The line of `check`'s `FILE:LINE:COL: ` error, when it has one.
fn error_line(stderr: &str, file: &Path) -> Option<usize> {
    let prefix = format!("{}:", file.display());
    let rest = stderr.split_once(&prefix)?.1;
    rest.split(':').next()?.parse().ok()
}

#[test]
fn every_toml_block_in_the_configuration_reference_loads_as_documented() {
    let markdown = std::fs::read_to_string(doc_path()).expect("docs/configuration.md");
    let blocks = toml_blocks(&markdown);
    assert!(
        blocks.len() >= 20,
        "only {} toml blocks found",
        blocks.len()
    );
    assert!(blocks.iter().any(|b| b.refused));

    let dir = tempfile::tempdir().unwrap();
    provide_files(dir.path());
    let mut failures = Vec::new();
    for block in &blocks {
        let base = base_for(block);
        let text = format!("{base}{}", block.text);
        let file = dir
            .path()
            .join(format!("block-at-line-{}.toml", block.line));
        std::fs::write(&file, &text).unwrap();
        let output = Command::new(BIN)
            .arg("check")
            .arg("--config")
            .arg(&file)
            .env_remove("PORTCULLIS_CONFIG")
            .env("JWT_SECRET", SECRET)
            .output()
            .expect("run portcullis check");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let code = output.status.code();
        let place = format!("docs/configuration.md:{}", block.line);
        if block.refused {
            let base_lines = base.lines().count();
            match (code, error_line(&stderr, &file)) {
                (Some(2), Some(line)) if line > base_lines => {}
                (Some(2), line) => failures.push(format!(
                    "{place}: refused, but not for a line of the fragment (error at line {line:?}, the added sections end at line {base_lines}): {stderr}"
                )),
                _ => failures.push(format!(
                    "{place}: marked refused, but check exited {code:?}: {stderr}\n{text}"
                )),
            }
        } else if code != Some(0) {
            failures.push(format!("{place}: check exited {code:?}: {stderr}\n{text}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

/// Every field of `src/config/file.rs`'s sections, i.e. every key the
/// proxy accepts, is named in the reference.
#[test]
fn every_accepted_key_is_documented() {
    let markdown = std::fs::read_to_string(doc_path()).expect("docs/configuration.md");
    let source =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config/file.rs"))
            .unwrap();
    let mut in_section = false;
    let mut missing = Vec::new();
    for line in source.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("pub struct ") {
            in_section = trimmed.contains("Section") || trimmed.contains("FileConfig");
            continue;
        }
        if trimmed == "}" {
            in_section = false;
            continue;
        }
        let Some(field) = trimmed
            .strip_prefix("pub ")
            .and_then(|rest| rest.split_once(':'))
            .map(|(name, _)| name.trim())
        else {
            continue;
        };
        if !in_section || field.contains(' ') {
            continue;
        }
        let named = [
            format!("`{field}`"),
            format!("[{field}]"),
            format!(".{field}]"),
        ]
        .iter()
        .any(|form| markdown.contains(form.as_str()));
        if !named {
            missing.push(field.to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "keys accepted by src/config/file.rs but not in docs/configuration.md: {missing:?}"
    );
}
