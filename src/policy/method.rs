//! `methods = [...]` on a route: anything else is 405 with `Allow`.

use http::{HeaderValue, Method};

use crate::reject::Rejection;

/// The `Allow` header for a method list, computed once per route.
pub fn allow_header(methods: &[Method]) -> Option<HeaderValue> {
    let joined = methods
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    HeaderValue::from_str(&joined).ok()
}

pub fn check(
    method: &Method,
    allowed: Option<&[Method]>,
    allow: Option<&HeaderValue>,
) -> Result<(), Rejection> {
    match (allowed, allow) {
        (Some(list), Some(allow)) if !list.contains(method) => {
            Err(Rejection::MethodNotAllowed(allow.clone()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_methods_pass() {
        let list = [Method::GET, Method::POST];
        let allow = allow_header(&list);
        assert!(check(&Method::GET, Some(&list), allow.as_ref()).is_ok());
        match check(&Method::DELETE, Some(&list), allow.as_ref()) {
            Err(Rejection::MethodNotAllowed(v)) => assert_eq!(v, "GET, POST"),
            other => panic!("expected 405, got {other:?}"),
        }
        assert!(check(&Method::DELETE, None, None).is_ok());
    }
}
