//! The HTTP→HTTPS redirect answered on `http_listen`: `308` to
//! `https://HOST[:port]/path?query`; a missing or malformed `Host` is 400.
//! Never HSTS here: browsers ignore it over plain HTTP, and it must only be
//! learned from an authenticated connection.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, LOCATION};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;

pub fn respond<B>(request: &Request<B>, https_port: Option<u16>) -> Response<Full<Bytes>> {
    match location(request, https_port) {
        Some(location) => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
            response.headers_mut().insert(LOCATION, location);
            response
        }
        None => {
            let body = r#"{"error":"bad_request","message":"A valid Host header is required."}"#;
            let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
    }
}

/// The redirect target, or `None` when the Host is missing, malformed or
/// repeated (two Hosts are the textbook host-confusion input: which one a
/// cache or an app behind would use is anyone's guess).
pub fn location<B>(request: &Request<B>, https_port: Option<u16>) -> Option<HeaderValue> {
    let mut hosts = request.headers().get_all(HOST).iter();
    let host = hosts.next()?.to_str().ok()?;
    if hosts.next().is_some() {
        return None;
    }
    let authority = crate::forward::parse_host(host)?;
    let mut target = String::with_capacity(host.len() + 64);
    target.push_str("https://");
    target.push_str(&authority.host().to_ascii_lowercase());
    if let Some(port) = https_port {
        target.push(':');
        target.push_str(&port.to_string());
    }
    let path_and_query = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
    if !path_and_query.starts_with('/') {
        target.push('/');
    }
    target.push_str(path_and_query);
    HeaderValue::from_str(&target).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(host: Option<&str>, target: &str) -> Request<()> {
        let mut builder = Request::builder().uri(target);
        if let Some(host) = host {
            builder = builder.header(HOST, host);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn redirects() {
        let loc = |host, target, port| {
            location(&req(host, target), port).map(|v| v.to_str().unwrap().to_string())
        };
        assert_eq!(
            loc(Some("example.com"), "/a?b=1", None).as_deref(),
            Some("https://example.com/a?b=1")
        );
        assert_eq!(
            loc(Some("example.com:8080"), "/", Some(8443)).as_deref(),
            Some("https://example.com:8443/")
        );
        assert_eq!(
            loc(Some("[::1]:8080"), "/x", Some(8443)).as_deref(),
            Some("https://[::1]:8443/x")
        );
        assert_eq!(loc(None, "/", None), None);
        let two_hosts = Request::builder()
            .uri("/")
            .header(HOST, "good.test")
            .header(HOST, "evil.test")
            .body(())
            .unwrap();
        assert_eq!(location(&two_hosts, None), None);
        assert_eq!(loc(Some("evil.com/x"), "/", None), None);
        assert_eq!(loc(Some("user@evil.com"), "/", None), None);
        assert_eq!(loc(Some(""), "/", None), None);
        assert_eq!(loc(Some("example.com:http"), "/", None), None);
        assert_eq!(loc(Some("example.com:99999"), "/", None), None);
        assert_eq!(loc(Some("example.com:+80"), "/", None), None);
        assert_eq!(
            loc(Some("example.com:"), "/", Some(8443)).as_deref(),
            Some("https://example.com:8443/")
        );
    }
}
