//! `portcullis explain`: one request explained (text or `--json`), or a
//! file of cases with the outcome each must have (`--expect`), the routing
//! test suite an operator keeps next to `proxy.toml`. The judging itself is
//! `crate::explain`, on the pipeline's own code.
//!
//! A cases file:
//!
//! ```toml
//! [[case]]
//! name = "the admin API needs a token"      # optional
//! request = "GET /api/admin"                # METHOD URL
//! expect = { status = 401, error = "missing_token" }
//!
//! [[case]]
//! request = "POST https://shop.example.com/api/orders"
//! headers = ["Content-Type: application/json"]
//! body = '{"items": [{"sku": "ABC-1", "qty": 1}]}'   # or body_file = "order.json"
//! token = { sub = "alice", scope = "admin" }  # minted with the configured key; or a JWT string
//! client = "192.0.2.7"                      # optional TCP peer
//! expect = { forward = "/api/orders" }      # forwarded to this path (with a `?`, the
//!                                           # query too, its values written as `…`)
//! ```

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;

use super::Failure;
use super::token::{MintRequest, mint, use_demo_secret};
use crate::explain::{Outcome, Probe, Report};
use crate::runtime::Runtime;

pub struct Args {
    pub method: String,
    pub url: String,
    pub headers: Vec<String>,
    pub token: Option<String>,
    pub body_file: Option<PathBuf>,
    pub client: Option<IpAddr>,
    pub json: bool,
    pub online: bool,
}

pub fn explain(config_path: &Path, args: Args) -> Result<(), Failure> {
    let runtime = load(config_path, args.online)?;
    let body = match &args.body_file {
        Some(path) => std::fs::read(path)
            .map_err(|e| Failure::Usage(format!("--body-file {}: {e}", path.display())))?,
        None => Vec::new(),
    };
    let probe = probe(
        &args.method,
        &args.url,
        &args.headers,
        args.token.as_deref(),
        body.into(),
        args.client,
    )?;
    let report = block_on(crate::explain::explain(&runtime, probe, args.online))?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Cases {
    #[serde(default)]
    case: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: Option<String>,
    request: String,
    #[serde(default)]
    headers: Vec<String>,
    token: Option<TokenSpec>,
    body: Option<String>,
    body_file: Option<PathBuf>,
    client: Option<IpAddr>,
    expect: Expect,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Raw(String),
    Claims(toml::Table),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    forward: Option<String>,
    status: Option<u16>,
    error: Option<String>,
}

pub fn expect(config_path: &Path, cases_path: &Path, online: bool) -> Result<(), Failure> {
    let runtime = load(config_path, online)?;
    let text = std::fs::read_to_string(cases_path)
        .map_err(|e| Failure::Usage(format!("{}: {e}", cases_path.display())))?;
    let cases: Cases = toml::from_str(&text)
        .map_err(|e| Failure::Usage(format!("{}: {e}", cases_path.display())))?;
    if cases.case.is_empty() {
        return Err(Failure::Usage(format!(
            "{}: no [[case]] in it",
            cases_path.display()
        )));
    }
    let base = cases_path.parent().unwrap_or(Path::new("."));
    let (mut passed, mut failed) = (0, 0);
    for (i, case) in cases.case.iter().enumerate() {
        let name = case
            .name
            .clone()
            .unwrap_or_else(|| format!("case {}", i + 1));
        let (method, url) = case.request.split_once(' ').ok_or_else(|| {
            Failure::Usage(format!(
                "{name}: request must be \"METHOD URL\", got \"{}\"",
                case.request
            ))
        })?;
        let token = match &case.token {
            None => None,
            Some(TokenSpec::Raw(token)) => Some(token.clone()),
            Some(TokenSpec::Claims(claims)) => Some(mint_for_case(&runtime, claims, &name)?),
        };
        let body: Bytes = match (&case.body, &case.body_file) {
            (Some(_), Some(_)) => {
                return Err(Failure::Usage(format!(
                    "{name}: body or body_file, not both"
                )));
            }
            (Some(body), None) => Bytes::from(body.clone()),
            (None, Some(file)) => std::fs::read(base.join(file))
                .map_err(|e| Failure::Usage(format!("{name}: body_file {}: {e}", file.display())))?
                .into(),
            (None, None) => Bytes::new(),
        };
        let probe = probe(
            method,
            url.trim(),
            &case.headers,
            token.as_deref(),
            body,
            case.client,
        )
        .map_err(|e| match e {
            Failure::Usage(why) => Failure::Usage(format!("{name}: {why}")),
            other => other,
        })?;
        let report = block_on(crate::explain::explain(&runtime, probe, online))?;
        match verdict(&case.expect, &report) {
            Ok(()) => {
                passed += 1;
                println!("ok    {name}: {} → {}", case.request, report.summary());
            }
            Err(wanted) => {
                failed += 1;
                println!(
                    "FAIL  {name}: {} → {}, expected {wanted}",
                    case.request,
                    report.summary()
                );
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        return Err(Failure::Other(anyhow::anyhow!(
            "{failed} of {} cases failed",
            passed + failed
        )));
    }
    Ok(())
}

/// `Err(what was expected)` when `report` does not match.
fn verdict(expect: &Expect, report: &Report) -> Result<(), String> {
    match (&expect.forward, expect.status, &report.outcome) {
        (Some(_), Some(_), _) => Err("either forward or status, not both".into()),
        (None, None, _) => Err("an expect with forward or status".into()),
        (Some(want), None, Outcome::Forward { target })
            if want == target
                || (!want.contains('?') && target.split('?').next() == Some(want)) =>
        {
            Ok(())
        }
        (Some(want), None, _) => Err(format!("forward {want}")),
        (
            None,
            Some(status),
            Outcome::Answer {
                status: got, error, ..
            },
        ) if *got == status && expect.error.as_ref().is_none_or(|e| e == error) => Ok(()),
        (None, Some(status), _) => Err(match &expect.error {
            Some(error) => format!("{status} {error}"),
            None => status.to_string(),
        }),
    }
}

fn mint_for_case(runtime: &Runtime, claims: &toml::Table, name: &str) -> Result<String, Failure> {
    let jwt = runtime.config.jwt.as_ref().ok_or_else(|| {
        Failure::Usage(format!(
            "{name}: a token table needs a [jwt] section to sign for"
        ))
    })?;
    let mut claims: serde_json::Map<String, serde_json::Value> = serde_json::to_value(claims)
        .ok()
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    let subject = match claims.remove("sub") {
        Some(serde_json::Value::String(sub)) => sub,
        _ => "explain".to_owned(),
    };
    let scope = match claims.remove("scope") {
        Some(serde_json::Value::String(scope)) => Some(scope),
        Some(other) => {
            claims.insert("scope".into(), other);
            None
        }
        None => None,
    };
    let request = MintRequest {
        subject,
        scope,
        ttl: Duration::from_secs(300),
        extra_claims: claims.into_iter().collect(),
        issuer: jwt.settings.issuer.clone(),
        audience: jwt.settings.audience.clone(),
    };
    mint(&jwt.settings, None, &request).map_err(|e| {
        Failure::Usage(format!(
            "{name}: cannot sign a token with the configured key (jwt.{e}); give the token as a string"
        ))
    })
}

fn probe(
    method: &str,
    url: &str,
    headers: &[String],
    token: Option<&str>,
    body: Bytes,
    client: Option<IpAddr>,
) -> Result<Probe, Failure> {
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| Failure::Usage(format!("not a method: \"{method}\"")))?;
    let mut parsed = Vec::with_capacity(headers.len() + 1);
    for header in headers {
        let (name, value) = header.split_once(':').ok_or_else(|| {
            Failure::Usage(format!("header \"{header}\": expected \"Name: value\""))
        })?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| Failure::Usage(format!("header \"{header}\": not a header name")))?;
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| Failure::Usage(format!("header \"{header}\": not a header value")))?;
        parsed.push((name, value));
    }
    if let Some(token) = token {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| Failure::Usage("--token: not a header value".into()))?;
        parsed.push((http::header::AUTHORIZATION, value));
    }
    Ok(Probe {
        method,
        url: url.to_owned(),
        headers: parsed,
        body,
        client: client.unwrap_or(IpAddr::from([127, 0, 0, 1])),
    })
}

fn load(config_path: &Path, online: bool) -> Result<Runtime, Failure> {
    use_demo_secret(config_path)?;
    let config = crate::config::load(config_path)?;
    Ok(Runtime::build_for_explain(config, online)?)
}

fn block_on<F: std::future::Future>(future: F) -> Result<F::Output, Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(future))
}
