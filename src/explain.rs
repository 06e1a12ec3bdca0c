//! `portcullis explain`: what the proxy would do with one request, decided
//! by the pipeline's own code without a listener, an upstream or Redis.
//!
//! The head checks, the route match and the route's policies are
//! [`pipeline::judge_head`] and [`pipeline::judge_route`], the same functions
//! the live proxy calls; [`Offline`] is the judge that differs only where it
//! must: a rate limit is not decidable offline (its configuration is shown
//! and it passes), and a token is verified with the configured keys (a
//! `jwks_url` is fetched only with `--online`). The upstream request is
//! built by [`pipeline::build_upstream_request`], then shown with secrets
//! redacted.

use std::net::IpAddr;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use serde_json::{Value, json};

use crate::pipeline::{self, Judge, Peer, Step};
use crate::policy::jwt::VerifiedToken;
use crate::policy::rate_limit::{KeyMaterial, RouteLimiter};
use crate::policy::schema;
use crate::reject::Rejection;
use crate::request_body::RequestBody;
use crate::routes::RouteRuntime;
use crate::runtime::Runtime;

/// One request to explain.
pub struct Probe {
    pub method: Method,
    /// An origin-form target (`/path?query`) or an absolute URL, whose
    /// authority becomes the Host unless one is given.
    pub url: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
    /// The TCP peer (default 127.0.0.1).
    pub client: IpAddr,
}

/// What the proxy would do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded, with this target: the normalized path, and the query with
    /// its values redacted (`?token=…`).
    Forward { target: String },
    /// Answered by the proxy itself.
    Answer {
        status: u16,
        error: String,
        message: String,
    },
    /// A step needs what `explain` does not contact (a `jwks_url` without
    /// `--online`).
    Undecidable { why: String },
}

/// The explanation of one request.
pub struct Report {
    pub request: String,
    pub normalized_path: Option<String>,
    pub route: Option<String>,
    /// Each policy that ran, in order: (name, verdict).
    pub steps: Vec<(String, String)>,
    pub outcome: Outcome,
    /// The upstream request line and headers, secrets redacted.
    pub upstream: Option<Vec<String>>,
    /// What every response gets (on an upstream `Set-Cookie: example=1`).
    pub response_filters: Vec<String>,
}

/// The offline judge.
struct Offline<'rt> {
    runtime: &'rt Runtime,
    client: IpAddr,
    steps: Vec<(String, String)>,
    jwks_offline: bool,
    undecidable: Option<String>,
}

impl Judge for Offline<'_> {
    fn runtime(&self) -> &Runtime {
        self.runtime
    }

    fn client(&self) -> IpAddr {
        self.client
    }

    async fn rate_limit(
        &mut self,
        _route: &RouteRuntime,
        limiter: &RouteLimiter,
        _material: KeyMaterial<'_>,
    ) -> Result<(), Rejection> {
        let spec = limiter.spec();
        let shared = if self.runtime.config.redis.is_some() {
            ", shared on Redis"
        } else {
            ""
        };
        self.steps.push((
            "rate limit".into(),
            format!(
                "not decidable offline (the budget left is live state): {} burst {} by {}{shared}; 429 past it",
                spec.rate, spec.burst, spec.key
            ),
        ));
        Ok(())
    }

    async fn verify(&mut self, token: &str) -> Result<VerifiedToken, Rejection> {
        let jwt = self.runtime.jwt.as_ref().ok_or(Rejection::MissingToken)?;
        match jwt.verifier.verify(token).await {
            Ok(verified) => Ok(verified),
            Err(error) if self.jwks_offline => {
                self.undecidable = Some(format!(
                    "the token did not verify with the configured keys ({}), and keys from \
                     jwt.jwks_url are fetched only with --online",
                    error.detail()
                ));
                Err(Rejection::InvalidToken(error))
            }
            Err(error) => Err(Rejection::InvalidToken(error)),
        }
    }

    fn passed(&mut self, step: Step) {
        let name = match step {
            Step::Method => "method",
            Step::RateLimit | Step::RateLimitBySubject => return,
            Step::Jwt => "jwt",
            Step::Scopes => "scopes",
            Step::Claims => "claims",
            Step::Csrf => "csrf",
        };
        self.steps.push((name.into(), "passes".into()));
    }
}

/// Explains `probe` against `runtime`.
pub async fn explain(runtime: &Runtime, probe: Probe, online: bool) -> Report {
    let request_line = format!("{} {}", probe.method, redact_query(&probe.url));
    let mut report = Report {
        request: request_line,
        normalized_path: None,
        route: None,
        steps: Vec::new(),
        outcome: Outcome::Undecidable { why: String::new() },
        upstream: None,
        response_filters: response_filters(runtime),
    };
    let mut judge = Offline {
        runtime,
        client: probe.client,
        steps: Vec::new(),
        jwks_offline: !online
            && runtime
                .config
                .jwt
                .as_ref()
                .is_some_and(|jwt| jwt.settings.jwks_url.is_some()),
        undecidable: None,
    };
    let outcome = judge_probe(runtime, &mut judge, probe, &mut report).await;
    report.steps = judge.steps;
    report.outcome = match (outcome, judge.undecidable) {
        (Err(_), Some(why)) => Outcome::Undecidable { why },
        (Err(rejection), None) => {
            report.upstream = None;
            answer(rejection)
        }
        (Ok(target), _) => Outcome::Forward {
            target: redact_query(&target),
        },
    };
    if let Outcome::Answer { status, error, .. } = &report.outcome {
        report
            .steps
            .push(("outcome".into(), format!("answers {status} {error}")));
    }
    report
}

async fn judge_probe(
    runtime: &Runtime,
    judge: &mut Offline<'_>,
    probe: Probe,
    report: &mut Report,
) -> Result<String, Rejection> {
    let (mut parts, ()) = build_request(&probe)?.into_parts();
    crate::policy::limits::check_head(&parts, runtime.config.server.max_header_bytes)?;
    let head = pipeline::judge_head(runtime, &parts, |normalized, route| {
        report.normalized_path = Some(normalized.path.clone());
        report.route = route.map(|r| r.config.path.clone());
    })?;
    let mut token = None;
    if let Some(route) = head.route {
        token = pipeline::judge_route(judge, route, &parts, head.host.as_ref()).await?;
        if let Some(schema) = route.config.json_schema.as_deref()
            && !probe.body.is_empty()
        {
            // (a body over the limit was refused by judge_head: its length is declared)
            if !schema::check_media_type(&parts.headers) {
                return Err(Rejection::UnsupportedMediaType);
            }
            schema.judge(&probe.body).map_err(Rejection::Schema)?;
            judge.steps.push(("json schema".into(), "passes".into()));
        }
    } else {
        judge
            .steps
            .push(("route".into(), "none matches: global policies only".into()));
    }
    let peer_header = HeaderValue::from_str(&probe.client.to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    let peer = Peer {
        ip: probe.client,
        header: &peer_header,
    };
    let upgrade = crate::forward::is_websocket_upgrade(&parts.headers);
    let upstream = pipeline::build_upstream_request(
        runtime,
        peer,
        &mut parts,
        &head.normalized.path,
        head.host,
        token.as_ref(),
        upgrade,
        RequestBody::Whole(Some(probe.body.clone())),
    )?;
    let target = upstream
        .request
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned());
    let group_index = head.route.map_or(0, |r| r.config.upstream);
    let group = runtime
        .config
        .upstream_groups()
        .nth(group_index)
        .unwrap_or(&runtime.config.upstream);
    report.upstream = Some(upstream_view(&upstream, group));
    Ok(target)
}

fn build_request(probe: &Probe) -> Result<Request<()>, Rejection> {
    let uri: http::Uri = probe
        .url
        .parse()
        .map_err(|_| Rejection::BadRequest("the request target is not a valid URI"))?;
    let target = uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let mut request = Request::builder()
        .method(probe.method.clone())
        .uri(target)
        .body(())
        .map_err(|_| Rejection::BadRequest("the request target is not a valid URI"))?;
    let headers = request.headers_mut();
    for (name, value) in &probe.headers {
        headers.append(name.clone(), value.clone());
    }
    if !headers.contains_key(http::header::HOST) {
        let host = uri.authority().map_or("localhost", |a| a.as_str());
        if let Ok(host) = HeaderValue::from_str(host) {
            headers.insert(http::header::HOST, host);
        }
    }
    if !probe.body.is_empty() && !headers.contains_key(http::header::CONTENT_LENGTH) {
        headers.insert(
            http::header::CONTENT_LENGTH,
            HeaderValue::from(probe.body.len()),
        );
    }
    Ok(request)
}

fn answer(rejection: Rejection) -> Outcome {
    let response = rejection.into_response();
    let body: Value = serde_json::from_slice(response.body()).unwrap_or(Value::Null);
    Outcome::Answer {
        status: response.status().as_u16(),
        error: body["error"].as_str().unwrap_or_default().to_owned(),
        message: body["message"].as_str().unwrap_or_default().to_owned(),
    }
}

/// Header values never shown: credentials a client sent.
const SECRET_HEADERS: [&str; 3] = ["authorization", "cookie", "proxy-authorization"];

fn upstream_view(
    upstream: &crate::upstream::UpstreamRequest,
    group: &crate::config::Upstream,
) -> Vec<String> {
    let request = &upstream.request;
    let target = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let servers: Vec<String> = group.servers.iter().map(|s| s.to_string()).collect();
    let to = if servers.len() == 1 {
        servers.join("")
    } else {
        format!(
            "one of {} by {}",
            servers.join(", "),
            group.balance.as_str()
        )
    };
    let named = if &*group.name == "default" {
        String::new()
    } else {
        format!("upstream {}: ", group.name)
    };
    let mut lines = vec![format!(
        "{} {} HTTP/1.1  (to {named}{to})",
        request.method(),
        redact_query(target),
    )];
    let mut headers: HeaderMap = request.headers().clone();
    let fields = &upstream.fields;
    match &fields.host {
        crate::forward::HostField::InMap => {}
        crate::forward::HostField::Write(host) => {
            headers.insert(http::header::HOST, host.clone());
        }
        crate::forward::HostField::Missing => {
            if let Ok(host) = HeaderValue::from_str(&group.default_host()) {
                headers.insert(http::header::HOST, host);
            }
        }
    }
    headers.insert("x-forwarded-for", fields.forwarded_for.clone());
    headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
    if let Some(host) = &fields.forwarded_host {
        headers.insert("x-forwarded-host", host.clone());
    }
    for (name, value) in &headers {
        let shown = if SECRET_HEADERS.contains(&name.as_str()) {
            "<redacted>".to_owned()
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        lines.push(format!("{name}: {shown}"));
    }
    lines
}

fn response_filters(runtime: &Runtime) -> Vec<String> {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::SET_COOKIE,
        HeaderValue::from_static("example=1"),
    );
    runtime.filters.apply(&mut headers);
    headers
        .iter()
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes());
            if name == http::header::SET_COOKIE {
                format!("{name}: {value}  (an upstream's \"example=1\")")
            } else {
                format!("{name}: {value}")
            }
        })
        .collect()
}

/// `?a=1&b=2` → `?a=…&b=…`: query values can be secrets.
fn redact_query(target: &str) -> String {
    let Some((path, query)) = target.split_once('?') else {
        return target.to_owned();
    };
    let redacted: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) => format!("{name}=…"),
            None => pair.to_owned(),
        })
        .collect();
    format!("{path}?{}", redacted.join("&"))
}

impl Report {
    pub fn to_json(&self) -> Value {
        let outcome = match &self.outcome {
            Outcome::Forward { target } => json!({ "forward": target }),
            Outcome::Answer {
                status,
                error,
                message,
            } => json!({ "status": status, "error": error, "message": message }),
            Outcome::Undecidable { why } => json!({ "undecidable": why }),
        };
        json!({
            "request": self.request,
            "normalized_path": self.normalized_path,
            "route": self.route,
            "steps": self.steps.iter().map(|(step, verdict)| json!({ "step": step, "verdict": verdict })).collect::<Vec<_>>(),
            "outcome": outcome,
            "upstream": self.upstream,
            "response_filters": self.response_filters,
        })
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        out.push_str(&self.request);
        out.push('\n');
        let row = |out: &mut String, name: &str, value: &str| {
            out.push_str(&format!("  {name:<12} {value}\n"));
        };
        if let Some(path) = &self.normalized_path {
            row(&mut out, "path", &format!("{path} (normalized)"));
        }
        if let Some(route) = &self.route {
            row(&mut out, "route", route);
        }
        for (step, verdict) in &self.steps {
            if step != "outcome" {
                row(&mut out, step, verdict);
            }
        }
        let outcome = match &self.outcome {
            Outcome::Forward { target } => format!("forwarded as {target}"),
            Outcome::Answer {
                status,
                error,
                message,
            } => format!("{status} {error}: {message}"),
            Outcome::Undecidable { why } => format!("not decidable offline: {why}"),
        };
        row(&mut out, "outcome", &outcome);
        if let Some(lines) = &self.upstream {
            out.push_str("upstream receives:\n");
            for line in lines {
                out.push_str(&format!("  {line}\n"));
            }
        }
        out.push_str("every response gets:\n");
        for line in &self.response_filters {
            out.push_str(&format!("  {line}\n"));
        }
        out
    }

    /// `"forward /x"` or `"401 missing_token"`, for `--expect`.
    pub fn summary(&self) -> String {
        match &self.outcome {
            Outcome::Forward { target } => format!("forward {target}"),
            Outcome::Answer { status, error, .. } => format!("{status} {error}"),
            Outcome::Undecidable { why } => format!("undecidable ({why})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact_query;

    #[test]
    fn query_values_are_redacted() {
        assert_eq!(redact_query("/a"), "/a");
        assert_eq!(redact_query("/a?token=s3cret&x"), "/a?token=…&x");
    }
}
