//! The request's way through the proxy, in one place.
//!
//! [`handle`] is the function to read first: every step a request goes
//! through is called from it, in order. Policies decide (they return a
//! [`Rejection`]); this module acts (answers, forwards, logs).
//!
//! ```text
//! handle
//!   0. limits on the request head (431), framing (400), fragment (400)
//!   1. normalize the path                        → 400   path.rs
//!   2. match the route                                   routes.rs
//!   3. policies in SPEC's order                  → 4xx   policy/*.rs
//!        body limit (413) · method (405) · rate limit (429;
//!        503 with on_error = "deny" while Redis fails)   redis_limits.rs
//!        · JWT (401) · rate limit by sub (429) · scopes (403)
//!        · claims (403)                           policy/claims.rs
//!        · CSRF (403) · JSON schema (415, 413, 400)   policy/csrf.rs, schema.rs
//!   4. build the upstream request                        forward.rs
//!   5. send it to the route's upstream group     → 502/504 upstream/
//!   6. response filters: HSTS, cookies, headers          filters/
//!   7. access log (when the body ends) + metrics         telemetry.rs
//! ```

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::CONNECTION;
use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body as _;
use hyper::body::Incoming;

use crate::body::ResponseBody;
use crate::connection::ConnInfo;
use crate::forward;
use crate::path;
use crate::policy::jwt::{TokenSource, VerifiedToken, extract_token};
use crate::policy::rate_limit::{self, OnError, RateLimitInfo, RouteLimiter};
use crate::policy::schema::{self, RouteSchema};
use crate::policy::{claims, csrf, limits, method, scopes};
use crate::redis_limits::SharedAnswer;
use crate::reject::Rejection;
use crate::request_body::{self, RequestBody};
use crate::routes::RouteRuntime;
use crate::runtime::Runtime;
use crate::sniffer::Anomaly;
use crate::telemetry::{self, AccessRecord};
use crate::upstream::UpstreamRequest;

/// What one request has gathered on its way; the typed per-request context.
struct RequestContext<'rt> {
    runtime: &'rt Runtime,
    conn: &'rt ConnInfo,
    record: AccessRecord,
    /// The matched route's metric handles (the unmatched ones until a route matches).
    route_metrics: &'rt telemetry::RouteMetrics,
    /// Headers a policy wants on the final response (RateLimit on allowed requests).
    rate_limit_info: Option<RateLimitInfo>,
}

/// Serves one request. Never fails: every failure becomes a response.
///
/// A plain fn around an `async move` block rather than an `async fn`: the
/// request is split before the future exists, so the future holds its
/// parts once (an `async fn` keeps room for its arguments for its whole
/// life, and every in-flight request carries its future).
pub fn handle(
    request: Request<Incoming>,
    conn: Arc<ConnInfo>,
) -> impl Future<Output = Result<Response<ResponseBody>, Infallible>> {
    let started = Instant::now();
    let (mut parts, body) = request.into_parts();
    async move {
        let mut cancelled = CancelWatch(Some(&conn.activity));
        let in_flight = conn.activity.begin_request();
        let request_index = conn.next_request_index();
        let runtime = conn.shared.runtime.load_full();

        let client = rate_limit::client_ip(
            conn.peer.ip(),
            &parts.headers,
            &runtime.config.server.trusted_proxies,
        );
        let mut ctx = RequestContext {
            runtime: &runtime,
            conn: &conn,
            record: AccessRecord {
                client,
                method: parts.method.clone(),
                path: parts.uri.path().to_owned(),
                route: runtime.routes.unmatched.clone(),
                status: 0,
                upstream_status: None,
                tls: conn.tls,
                sub: None,
            },
            route_metrics: &runtime.routes.unmatched_metrics,
            rate_limit_info: None,
        };

        let outcome = match judge_and_forward(&mut ctx, &mut parts, body, request_index).await {
            Ok(response) => response,
            Err(rejection) => reject(&ctx, rejection),
        };

        // 6. response filters, on the proxy's own answers too
        let mut response = outcome;
        if !conn.is_h2
            && response.status() != StatusCode::SWITCHING_PROTOCOLS
            && conn.anomalies.last_followed(request_index)
        {
            // Not upgraded: the bytes after this request cannot be checked.
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        runtime.filters.apply(response.headers_mut());
        if let Some(info) = &ctx.rate_limit_info {
            for (name, value) in info.header_values() {
                response.headers_mut().entry(name).or_insert(value);
            }
        }

        // 7. metrics now; the access log when the body ends
        let status = response.status().as_u16();
        ctx.record.status = status;
        ctx.route_metrics.record(status, started.elapsed());
        let record = ctx.record;
        cancelled.0 = None;
        Ok(response.map(|body| body.with_access_log(record, started, Some(in_flight))))
    }
}

/// Notes a request whose future is dropped before it has an answer: the
/// client cancelled it (see [`crate::connection::Activity::note_cancelled`]).
struct CancelWatch<'a>(Option<&'a crate::connection::Activity>);

impl Drop for CancelWatch<'_> {
    fn drop(&mut self) {
        if let Some(activity) = self.0 {
            activity.note_cancelled();
        }
    }
}

/// Steps 0 to 5. Returns the upstream's response, or the rejection that stopped the request.
async fn judge_and_forward(
    ctx: &mut RequestContext<'_>,
    parts: &mut Parts,
    body: Incoming,
    request_index: u64,
) -> Result<Response<ResponseBody>, Rejection> {
    let runtime = ctx.runtime;
    let server = &runtime.config.server;

    // 0. the request head: size, framing, a fragment the URI parser dropped
    limits::check_head(parts, server.max_header_bytes)?;
    // `request_index` counts service calls on this connection; the sniffer
    // counts the HTTP/1 request heads it read. They name the same request
    // because hyper reads the next head only after this call's future has
    // finished, and the sniffer sees a head's bytes before hyper parses them.
    // Where the sniffer stops following (after an Upgrade head, at CONNECT
    // or framing it cannot mirror) nothing later on the connection was
    // checked, so nothing later is served: the request that ended the
    // following closes the connection behind its answer (see `handle`), and
    // any request hyper reads after it anyway is refused here. See "The
    // invariant that ties it to hyper" in sniffer/mod.rs before changing how
    // either side counts.
    if !ctx.conn.is_h2 && !ctx.conn.anomalies.followed(request_index) {
        return Err(Rejection::BadRequest(
            "a request the proxy cannot delimit on this connection",
        ));
    }
    match ctx.conn.anomalies.anomaly(request_index) {
        Some(Anomaly::Fragment) => return Err(Rejection::InvalidPath(path::PathError::Fragment)),
        Some(Anomaly::LengthAndTransferEncoding) => {
            return Err(Rejection::BadRequest(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        None => {}
    }

    // 1. normalize the path, 2. match the route, and the body's framing
    let head = judge_head(runtime, parts, |normalized, route| {
        ctx.record.path.clone_from(&normalized.path);
        if let Some(route) = route {
            ctx.record.route = route.label.clone();
            ctx.route_metrics = &route.metrics;
        }
    })?;
    let Head {
        host,
        normalized,
        route,
        body_limit,
        declared_length,
    } = head;

    // 3. the route's policies, in SPEC's order
    let mut token = None;
    if let Some(route) = route {
        token = judge_route(ctx, route, parts, host.as_ref()).await?;
    }
    // Only a schema route reads a body before forwarding, and only one that has a body.
    let schema = route
        .and_then(|r| r.config.json_schema.as_deref())
        .filter(|_| !body.is_end_stream());
    let body = match schema {
        Some(schema) => RequestBody::Whole(Some(
            read_and_judge(schema, parts, body, body_limit, declared_length).await?,
        )),
        None => RequestBody::streamed(body, body_limit),
    };

    // 4. the upstream request
    let upgrade =
        parts.version == http::Version::HTTP_11 && forward::is_websocket_upgrade(&parts.headers);
    let on_client_upgrade = if upgrade {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    let peer = Peer {
        ip: ctx.conn.peer.ip(),
        header: &ctx.conn.peer_header,
    };
    let upstream_request = build_upstream_request(
        runtime,
        peer,
        parts,
        &normalized.path,
        host,
        token.as_ref(),
        upgrade,
        body,
    )?;

    // 5. send it to a server of the route's upstream group
    let group = route.map_or(0, |r| r.config.upstream);
    let sent = runtime
        .upstreams
        .send(group, ctx.conn.worker, ctx.record.client, upstream_request)
        .await;
    let mut response = match sent {
        Ok(response) => response,
        Err(rejection) => {
            let metrics = &ctx.conn.shared.metrics;
            match &rejection {
                Rejection::Upstream(kind) => {
                    metrics
                        .upstream_errors
                        .get_or_create(&telemetry::KindLabels {
                            kind: kind.as_str(),
                        })
                        .inc();
                }
                Rejection::ClientAborted => {
                    metrics.client_aborts.inc();
                }
                _ => {}
            }
            return Err(rejection);
        }
    };
    ctx.record.upstream_status = Some(response.status().as_u16());

    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(on_client_upgrade) = on_client_upgrade
    {
        if let Some(upstream) = response.body_mut().take_upgrade() {
            let server = &runtime.config.server;
            crate::tunnel::spawn(
                on_client_upgrade,
                upstream,
                ctx.conn.activity.clone(),
                crate::tunnel::TunnelTimeouts {
                    idle: server.websocket_idle_timeout,
                    send: server.send_timeout,
                },
            );
        }
        let (parts, _) = response.into_parts();
        return Ok(Response::from_parts(parts, ResponseBody::empty()));
    }
    // The upstream's hop-by-hop headers were dropped while its head was parsed.
    Ok(response.map(ResponseBody::upstream))
}

/// What [`judge_head`] found: the request's host, its normalized path, the
/// route it matched and the body limit that applies.
pub(crate) struct Head<'rt> {
    pub host: Option<HeaderValue>,
    pub normalized: path::NormalizedPath,
    pub route: Option<&'rt RouteRuntime>,
    pub body_limit: u64,
    pub declared_length: Option<u64>,
}

/// Steps 1 and 2 and the body's framing: the Host (400), the normalized path
/// (400), the route, and a declared length above the limit (413, before the
/// method). `matched` sees the path and route as soon as they are known, so
/// that a rejection later in here is logged against them.
pub(crate) fn judge_head<'rt>(
    runtime: &'rt Runtime,
    parts: &Parts,
    matched: impl FnOnce(&path::NormalizedPath, Option<&'rt RouteRuntime>),
) -> Result<Head<'rt>, Rejection> {
    let host = forward::request_host(parts).map_err(Rejection::BadRequest)?;
    // the upstream gets exactly what is judged here
    let normalized = path::normalize(parts.uri.path()).map_err(Rejection::InvalidPath)?;
    let route = runtime.routes.find(normalized.match_path());
    matched(&normalized, route);
    let body_limit = route.map_or(runtime.config.server.max_body_bytes, |r| r.max_body_bytes);
    let declared_length = limits::check_body_framing(parts, body_limit)?;
    Ok(Head {
        host,
        normalized,
        route,
        body_limit,
        declared_length,
    })
}

/// A step of [`judge_route`], named for `explain`'s report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Method,
    RateLimit,
    Jwt,
    RateLimitBySubject,
    Scopes,
    Claims,
    Csrf,
}

/// Where a request is judged: the live proxy ([`RequestContext`]) or
/// `portcullis explain` (src/explain.rs). The policy order exists once, in
/// [`judge_route`]; a judge supplies only what differs between the two: the
/// rate limit (counted live, not decidable offline), token verification
/// (keys fetched live, configured ones offline), and a note of each step
/// passed.
pub(crate) trait Judge {
    fn runtime(&self) -> &Runtime;
    /// The client the rate limit counts (behind trusted proxies, the real one).
    fn client(&self) -> std::net::IpAddr;
    async fn rate_limit(
        &mut self,
        route: &RouteRuntime,
        limiter: &RouteLimiter,
        material: rate_limit::KeyMaterial<'_>,
    ) -> Result<(), Rejection>;
    async fn verify(&mut self, token: &str) -> Result<VerifiedToken, Rejection>;
    /// `step` passed (the live proxy has nothing to do).
    fn passed(&mut self, _step: Step) {}
}

/// The route's own policies, in SPEC's order: method, rate limit, JWT, rate
/// limit by subject, scopes, claims, CSRF. Returns the verified token, if
/// the route wants one. (The JSON schema, which needs the body, follows.)
pub(crate) async fn judge_route<J: Judge>(
    judge: &mut J,
    route: &RouteRuntime,
    parts: &Parts,
    host: Option<&HeaderValue>,
) -> Result<Option<VerifiedToken>, Rejection> {
    method::check(
        &parts.method,
        route.config.methods.as_deref(),
        route.allow.as_ref(),
    )?;
    judge.passed(Step::Method);
    let limiter = route.limiter.as_deref();
    let by_subject = limiter.is_some_and(|l| l.spec().key == rate_limit::KeySource::Sub);
    if let Some(limiter) = limiter.filter(|_| !by_subject) {
        let material =
            rate_limit::key_material(&limiter.spec().key, judge.client(), &parts.headers, None);
        judge.rate_limit(route, limiter, material).await?;
        judge.passed(Step::RateLimit);
    }
    let token = if route.config.jwt {
        Some(authenticate(judge, route, parts).await?)
    } else {
        None
    };
    if route.config.csrf {
        csrf::check(
            &parts.method,
            &parts.headers,
            host,
            &route.config.allowed_origins,
        )
        .map_err(Rejection::Csrf)?;
        judge.passed(Step::Csrf);
    }
    Ok(token)
}

/// JWT, then the rate limit keyed by its subject, then scopes and claims.
async fn authenticate<J: Judge>(
    judge: &mut J,
    route: &RouteRuntime,
    parts: &Parts,
) -> Result<VerifiedToken, Rejection> {
    let token_cookie = judge
        .runtime()
        .config
        .jwt
        .as_ref()
        .and_then(|settings| settings.token_cookie.as_deref());
    let token = match extract_token(&parts.headers, token_cookie) {
        TokenSource::Found(token) => token,
        TokenSource::Missing => return Err(Rejection::MissingToken),
        TokenSource::Invalid => {
            return Err(Rejection::InvalidToken(
                crate::policy::jwt::TokenError::Malformed,
            ));
        }
    };
    let verified = judge.verify(token).await?;
    judge.passed(Step::Jwt);
    if let Some(limiter) = route
        .limiter
        .as_deref()
        .filter(|l| l.spec().key == rate_limit::KeySource::Sub)
    {
        let material = rate_limit::key_material(
            &limiter.spec().key,
            judge.client(),
            &parts.headers,
            verified.subject(),
        );
        judge.rate_limit(route, limiter, material).await?;
        judge.passed(Step::RateLimitBySubject);
    }
    if !route.config.scopes.is_empty() {
        scopes::check(&route.config.scopes, &verified.scopes())
            .map_err(|missing| Rejection::InsufficientScope(missing.to_string()))?;
        judge.passed(Step::Scopes);
    }
    if !route.config.claims.is_empty() {
        claims::check(&route.config.claims, &verified.claims)
            .map_err(|failed| Rejection::InsufficientClaims(failed.claim))?;
        judge.passed(Step::Claims);
    }
    Ok(verified)
}

/// The live proxy as a judge: the rate limit counts, the verifier uses the
/// fetched keys, and the access log learns the subject.
impl Judge for RequestContext<'_> {
    fn runtime(&self) -> &Runtime {
        self.runtime
    }

    fn client(&self) -> std::net::IpAddr {
        self.record.client
    }

    async fn rate_limit(
        &mut self,
        route: &RouteRuntime,
        limiter: &RouteLimiter,
        material: rate_limit::KeyMaterial<'_>,
    ) -> Result<(), Rejection> {
        check_rate_limit(self, route, limiter, material).await
    }

    async fn verify(&mut self, token: &str) -> Result<VerifiedToken, Rejection> {
        let jwt = self.runtime.jwt.as_ref().ok_or(Rejection::MissingToken)?;
        let verified = jwt
            .verifier
            .verify(token)
            .await
            .map_err(Rejection::InvalidToken)?;
        self.record.sub = verified.subject().map(str::to_owned);
        Ok(verified)
    }
}

/// The rate limit: shared on Redis with `[redis]` (this instance's own
/// limiter, or none, or a 503 while Redis fails, as `on_error` says), else
/// this instance's own. Remembers the headers an allowed request carries.
async fn check_rate_limit(
    ctx: &mut RequestContext<'_>,
    route: &RouteRuntime,
    limiter: &RouteLimiter,
    material: rate_limit::KeyMaterial<'_>,
) -> Result<(), Rejection> {
    let shared = ctx.runtime.redis.as_ref().zip(route.shared_quota.as_ref());
    let answer = match shared {
        None => limiter.check(&material.to_limit_key()),
        Some((redis, quota)) => {
            match redis
                .check(ctx.conn.worker, &route.label, quota, &material)
                .await
            {
                SharedAnswer::Decided(answer) => answer,
                SharedAnswer::Unavailable => match redis.on_error() {
                    OnError::Local => limiter.check(&material.to_limit_key()),
                    OnError::Allow => return Ok(()),
                    OnError::Deny => return Err(Rejection::RateLimitUnavailable),
                },
            }
        }
    };
    ctx.rate_limit_info = Some(answer.map_err(Rejection::RateLimited)?);
    Ok(())
}

/// The schema policy: a JSON media type (415), the body read whole up to the
/// route's limit (413), then judged (400). Returns the body to forward.
async fn read_and_judge(
    schema: &RouteSchema,
    parts: &Parts,
    body: Incoming,
    body_limit: u64,
    declared_length: Option<u64>,
) -> Result<Bytes, Rejection> {
    if !schema::check_media_type(&parts.headers) {
        return Err(Rejection::UnsupportedMediaType);
    }
    let whole = request_body::read_whole(body, body_limit, declared_length).await?;
    schema.judge(&whole).map_err(Rejection::Schema)?;
    Ok(whole)
}

/// The TCP peer, as the upstream request names it.
#[derive(Clone, Copy)]
pub(crate) struct Peer<'a> {
    pub ip: std::net::IpAddr,
    /// `ip` as header text.
    pub header: &'a HeaderValue,
}

/// Step 4: what the upstream receives (shared with `explain`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn build_upstream_request(
    runtime: &Runtime,
    peer: Peer<'_>,
    parts: &mut Parts,
    normalized_path: &str,
    host: Option<HeaderValue>,
    token: Option<&VerifiedToken>,
    upgrade: bool,
    body: RequestBody,
) -> Result<UpstreamRequest, Rejection> {
    // Only the path and query of this URI reach the upstream. When
    // normalizing changed nothing (nearly always), the client's URI holds
    // exactly those, already parsed and checked; not when its path is empty
    // (`http://host?q` in absolute form), which `path()` reports as "/".
    let unchanged = parts
        .uri
        .path_and_query()
        .is_some_and(|target| target.as_str().starts_with('/') && target.path() == normalized_path);
    let uri = if unchanged {
        std::mem::take(&mut parts.uri)
    } else {
        forward::upstream_uri(normalized_path, parts.uri.query())
            .map_err(|_| Rejection::BadRequest("the request target cannot be forwarded"))?
    };
    let mut headers = std::mem::take(&mut parts.headers);
    // Hop-by-hop first: a client naming an identity header in `Connection`
    // must not make the proxy drop the value it sets below.
    forward::strip_hop_by_hop(&mut headers, upgrade);
    forward::strip_identity_headers(&mut headers, &runtime.identity_headers);
    let trusted = runtime
        .config
        .server
        .trusted_proxies
        .iter()
        .any(|net| net.contains(&peer.ip));
    let fields = forward::forwarded_fields(&mut headers, peer.header, trusted, host);
    if let (Some(token), Some(jwt)) = (token, &runtime.config.jwt) {
        for (claim, header) in &jwt.forward_claims {
            if let Some(value) = token.claim_as_header_value(claim)
                && let Ok(value) = HeaderValue::try_from(value)
            {
                headers.insert(header.clone(), value);
            }
        }
    }
    forward::merge_cookie_headers(&mut headers);

    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Ok(UpstreamRequest {
        request,
        fields,
        upgrade,
    })
}

/// Turns a rejection into the response, and records it (security event, metric).
fn reject(ctx: &RequestContext<'_>, rejection: Rejection) -> Response<ResponseBody> {
    if let Some(reason) = rejection.reason() {
        ctx.conn
            .shared
            .metrics
            .rejections
            .get_or_create(&telemetry::ReasonLabels { reason })
            .inc();
    }
    telemetry::security_event(&rejection, &ctx.record);
    let close = !ctx.conn.is_h2
        && matches!(
            rejection,
            Rejection::BadRequest(_) | Rejection::BodyTooLarge | Rejection::ClientAborted
        );
    let mut response = rejection.into_response().map(ResponseBody::full);
    if close {
        // The rest of this connection's bytes cannot be trusted to be framed
        // as the client claims (smuggling), or are an unwanted body: close it.
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
