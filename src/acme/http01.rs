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

/// The answer when `request` is a challenge request; `None` otherwise.
pub fn answer<B>(certs: &AcmeCerts, request: &Request<B>) -> Option<Response<Full<Bytes>>> {
    let token = request.uri().path().strip_prefix(CHALLENGE_PREFIX)?;
    let found = matches!(*request.method(), Method::GET | Method::HEAD)
        .then(|| certs.http_answer(token))
        .flatten();
    let (status, body) = match found {
        Some(key_authorization) => (StatusCode::OK, Bytes::from(key_authorization)),
        None => (StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acme::order::temporary_cert;

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    #[test]
    fn a_published_token_is_answered_and_any_other_is_404() {
        let domains = vec!["a.example.com".to_owned()];
        let certs = AcmeCerts::new(domains.clone(), temporary_cert(&domains).unwrap());
        certs.publish_http("tok", "tok.thumb");
        let ok = answer(&certs, &get("/.well-known/acme-challenge/tok")).unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
        let unknown = answer(&certs, &get("/.well-known/acme-challenge/other")).unwrap();
        assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
        let post = Request::post("/.well-known/acme-challenge/tok")
            .body(())
            .unwrap();
        assert_eq!(
            answer(&certs, &post).unwrap().status(),
            StatusCode::NOT_FOUND
        );
        assert!(
            answer(&certs, &get("/elsewhere")).is_none(),
            "redirected as usual"
        );
        certs.withdraw_http("tok");
        let gone = answer(&certs, &get("/.well-known/acme-challenge/tok")).unwrap();
        assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    }
}
