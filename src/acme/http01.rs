//! The http-01 answer on the HTTP listener (RFC 8555 §8.3): `GET
//! /.well-known/acme-challenge/TOKEN` gets the key authorization while an
//! order of ours waits on that token, and 404 otherwise: never a redirect
//! (a validator follows it to HTTPS, whose certificate may be the very one
//! being ordered), never forwarded, no HSTS.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

use super::certs::AcmeCerts;

pub const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// The token of a challenge request; `None` for any other request.
pub fn challenge_token<B>(request: &Request<B>) -> Option<&str> {
    request.uri().path().strip_prefix(CHALLENGE_PREFIX)
}

/// The answer to a challenge request for `token`: this instance's, else,
/// with `[redis]`, another instance's (the load balancer may send the CA's
/// request to any of them).
pub async fn answer(certs: &AcmeCerts, method: &Method, token: &str) -> Response<Full<Bytes>> {
    // ACME tokens are base64url, at least 128 bits (RFC 8555 §8.1): anything
    // else is not worth a trip to Redis.
    let plausible = (16..=256).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let mut found = None;
    if matches!(*method, Method::GET | Method::HEAD) && plausible {
        found = certs.http_answer(token);
        if found.is_none()
            && let Some(shared) = certs.shared()
        {
            found = match shared.http_answer(token).await {
                Ok(answer) => answer,
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "acme: cannot look up an http-01 answer in Redis");
                    None
                }
            };
        }
    }
    respond(found)
}

fn respond(found: Option<String>) -> Response<Full<Bytes>> {
    let (status, body) = match found {
        Some(key_authorization) => (StatusCode::OK, Bytes::from(key_authorization)),
        None => (StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acme::order::temporary_cert;

    #[tokio::test]
    async fn a_published_token_is_answered_and_any_other_is_404() {
        let domains = vec!["a.example.com".to_owned()];
        let certs = AcmeCerts::new(domains.clone(), temporary_cert(&domains).unwrap(), None);
        let token = "tok_0123456789abcdef";
        certs.publish_http(token, "tok.thumb");
        let ok = answer(&certs, &Method::GET, token).await;
        assert_eq!(ok.status(), StatusCode::OK);
        let unknown = answer(&certs, &Method::GET, "other_0123456789abcdef").await;
        assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            answer(&certs, &Method::POST, token).await.status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            answer(&certs, &Method::GET, "a/../b").await.status(),
            StatusCode::NOT_FOUND
        );
        let elsewhere = Request::get("/elsewhere").body(()).unwrap();
        assert!(challenge_token(&elsewhere).is_none(), "redirected as usual");
        let challenge = Request::get("/.well-known/acme-challenge/x")
            .body(())
            .unwrap();
        assert_eq!(challenge_token(&challenge), Some("x"));
        certs.withdraw_http(token);
        assert_eq!(
            answer(&certs, &Method::GET, token).await.status(),
            StatusCode::NOT_FOUND
        );
    }
}
