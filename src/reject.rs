//! Every answer the proxy writes itself instead of forwarding.
//!
//! One enum carries the status, the JSON error code, the security-log
//! `reason` and the extra headers, so the body a client sees, the event an
//! operator reads and the rejection metric come from one place and cannot
//! drift apart.

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};

use crate::path::PathError;
use crate::policy::csrf::CrossOrigin;
use crate::policy::jwt::TokenError;
use crate::policy::rate_limit::RateLimited;
use crate::policy::schema::SchemaFailure;

/// Why the upstream leg failed; the `kind` label of `portcullis_upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect,
    Timeout,
    Reset,
}

impl UpstreamErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
        }
    }
}

#[derive(Debug)]
pub enum Rejection {
    InvalidPath(PathError),
    /// A request that cannot be forwarded safely (ambiguous framing, bad Host...).
    BadRequest(&'static str),
    MissingToken,
    InvalidToken(TokenError),
    InsufficientScope(String),
    /// The claim (its name in `proxy.toml`) whose rule did not hold.
    InsufficientClaims(String),
    Csrf(CrossOrigin),
    MethodNotAllowed(HeaderValue),
    BodyTooLarge,
    UnsupportedMediaType,
    Schema(SchemaFailure),
    RateLimited(RateLimited),
    RateLimitUnavailable,
    HeaderTooLarge,
    Upstream(UpstreamErrorKind),
    /// The client stopped sending its request body (reset its stream,
    /// closed its connection): nobody may be left to read this answer.
    ClientAborted,
}

impl Rejection {
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::InvalidPath(_)
            | Rejection::BadRequest(_)
            | Rejection::Schema(_)
            | Rejection::ClientAborted => StatusCode::BAD_REQUEST,
            Rejection::MissingToken | Rejection::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            Rejection::InsufficientScope(_)
            | Rejection::InsufficientClaims(_)
            | Rejection::Csrf(_) => StatusCode::FORBIDDEN,
            Rejection::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Rejection::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Rejection::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Rejection::RateLimitUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Rejection::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Rejection::Upstream(UpstreamErrorKind::Timeout) => StatusCode::GATEWAY_TIMEOUT,
            Rejection::Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The `error` field of the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::InvalidPath(_) => "invalid_path",
            Rejection::BadRequest(_) => "bad_request",
            Rejection::MissingToken => "missing_token",
            Rejection::InvalidToken(_) => "invalid_token",
            Rejection::InsufficientScope(_) => "insufficient_scope",
            Rejection::InsufficientClaims(_) => "insufficient_claims",
            Rejection::Csrf(_) => "csrf",
            Rejection::MethodNotAllowed(_) => "method_not_allowed",
            Rejection::BodyTooLarge => "body_too_large",
            Rejection::UnsupportedMediaType => "unsupported_media_type",
            Rejection::Schema(_) => "schema",
            Rejection::RateLimited(_) => "rate_limited",
            Rejection::RateLimitUnavailable => "rate_limit_unavailable",
            Rejection::HeaderTooLarge => "header_too_large",
            Rejection::Upstream(UpstreamErrorKind::Timeout) => "upstream_timeout",
            Rejection::Upstream(_) => "upstream_unreachable",
            Rejection::ClientAborted => "client_aborted",
        }
    }

    /// The security event's `reason`; `None` for failures that are not a
    /// judgement on the client (the upstream's faults).
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            Rejection::Upstream(_) | Rejection::RateLimitUnavailable | Rejection::ClientAborted => {
                None
            }
            Rejection::BadRequest(_) => Some("invalid_request"),
            other => Some(other.code()),
        }
    }

    /// A detail for the security log only (never the client): why a token failed, say.
    pub fn detail(&self) -> Option<std::borrow::Cow<'static, str>> {
        match self {
            Rejection::InvalidToken(e) => Some(e.detail().into()),
            Rejection::InvalidPath(e) => Some(e.message().into()),
            Rejection::InsufficientClaims(claim) => Some(format!("claim {claim}").into()),
            Rejection::BadRequest(why) => Some((*why).into()),
            Rejection::Csrf(refused) => Some(match &refused.fetch_site {
                Some(site) => format!("Sec-Fetch-Site: {site}, origin not allowed").into(),
                None => "no Sec-Fetch-Site; Origin is neither the request's own nor allowed".into(),
            }),
            // Counts only: a pointer names fields of the body, its message no value.
            Rejection::Schema(SchemaFailure::NotJson(_)) => Some("not JSON".into()),
            Rejection::Schema(SchemaFailure::Invalid(found)) => {
                Some(format!("{} schema violation(s)", found.len()).into())
            }
            _ => None,
        }
    }

    /// The request's `Origin` for the security log of a CSRF refusal (an
    /// origin is not a secret; it says who tried).
    pub fn origin(&self) -> Option<&str> {
        match self {
            Rejection::Csrf(refused) => Some(&refused.origin),
            _ => None,
        }
    }

    fn message(&self) -> String {
        match self {
            Rejection::InvalidPath(e) => {
                format!("The request path is not acceptable: {}.", e.message())
            }
            Rejection::BadRequest(why) => format!("The request is malformed: {why}."),
            Rejection::MissingToken => "This resource needs a bearer token.".into(),
            Rejection::InvalidToken(_) => "The bearer token is not valid.".into(),
            Rejection::InsufficientScope(scopes) => {
                format!("The token lacks a required scope ({scopes}).")
            }
            Rejection::InsufficientClaims(claim) => {
                format!("The token does not carry what this resource requires in the claim {claim}.")
            }
            Rejection::Csrf(_) => {
                "Cross-origin request refused: this endpoint accepts unsafe methods from its own origin only.".into()
            }
            Rejection::MethodNotAllowed(_) => "This method is not allowed here.".into(),
            Rejection::BodyTooLarge => "The request body is too large.".into(),
            Rejection::UnsupportedMediaType => "The request body must be JSON.".into(),
            Rejection::Schema(SchemaFailure::NotJson(why)) => format!("Invalid request body: {why}."),
            Rejection::Schema(SchemaFailure::Invalid(found)) => format!(
                "The request body does not match the schema ({} problem{} in details).",
                found.len(),
                if found.len() == 1 { "" } else { "s" }
            ),
            Rejection::RateLimited(_) => "Too many requests; retry later.".into(),
            Rejection::RateLimitUnavailable => {
                "The rate limiter is unavailable; retry later.".into()
            }
            Rejection::HeaderTooLarge => "The request headers are too large.".into(),
            Rejection::Upstream(UpstreamErrorKind::Timeout) => {
                "The application did not answer in time.".into()
            }
            Rejection::Upstream(_) => "The application is unreachable.".into(),
            Rejection::ClientAborted => "The request body ended before it was complete.".into(),
        }
    }

    /// The JSON response. Response filters (HSTS, security headers) are
    /// applied by the pipeline afterwards, as on any other response.
    pub fn into_response(self) -> Response<Bytes> {
        let mut body = serde_json::json!({ "error": self.code(), "message": self.message() });
        if let Rejection::Schema(SchemaFailure::Invalid(found)) = &self {
            body["details"] = serde_json::json!(found);
        }
        let mut response = Response::new(Bytes::from(body.to_string()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match self {
            Rejection::MissingToken => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Rejection::InvalidToken(_) => {
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer error="invalid_token""#),
                );
            }
            Rejection::InsufficientScope(scopes) => {
                let value = format!(r#"Bearer error="insufficient_scope", scope="{scopes}""#);
                if let Ok(value) = HeaderValue::from_str(&value) {
                    headers.insert(WWW_AUTHENTICATE, value);
                }
            }
            Rejection::MethodNotAllowed(allow) => {
                headers.insert(ALLOW, allow);
            }
            Rejection::RateLimited(limited) => {
                headers.insert(RETRY_AFTER, HeaderValue::from(limited.retry_after_secs));
                for (name, value) in limited.info.header_values() {
                    headers.insert(name, value);
                }
            }
            Rejection::RateLimitUnavailable => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}
