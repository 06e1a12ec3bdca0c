//! The route table: `[[routes]]` matched by longest segment prefix.
//!
//! `/api` matches `/api` and `/api/x`, never `/apix`. Matching runs on the
//! normalized path with `;parameters` stripped, so what is judged is what the
//! upstream will read.

use std::sync::Arc;

use http::HeaderValue;

use crate::config::Route;
use crate::policy::rate_limit::RouteLimiter;
use crate::telemetry::RouteMetrics;

/// A route ready to judge requests: its configuration plus what the policies
/// need precomputed (the `Allow` header, its limiter).
pub struct RouteRuntime {
    pub label: Arc<str>,
    pub config: Route,
    pub allow: Option<HeaderValue>,
    pub limiter: Option<Arc<RouteLimiter>>,
    pub max_body_bytes: u64,
    pub metrics: RouteMetrics,
}

pub struct RouteTable {
    /// Longest path first, so the first match is the most specific.
    routes: Vec<RouteRuntime>,
    /// The label of requests that match no route, and their metrics.
    pub unmatched: Arc<str>,
    pub unmatched_metrics: RouteMetrics,
}

impl RouteTable {
    pub fn new(mut routes: Vec<RouteRuntime>, metrics: &crate::telemetry::Metrics) -> Self {
        routes.sort_by_key(|route| std::cmp::Reverse(route.config.path.len()));
        let unmatched: Arc<str> = Arc::from("-");
        RouteTable {
            routes,
            unmatched_metrics: RouteMetrics::new(metrics, unmatched.clone()),
            unmatched,
        }
    }

    pub fn find(&self, match_path: &str) -> Option<&RouteRuntime> {
        self.routes
            .iter()
            .find(|route| segment_prefix(&route.config.path, match_path))
    }

    pub fn iter(&self) -> impl Iterator<Item = &RouteRuntime> {
        self.routes.iter()
    }
}

/// True when `prefix` equals `path` or is followed in it by a `/`.
pub fn segment_prefix(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::segment_prefix;

    #[test]
    fn segment_prefixes() {
        assert!(segment_prefix("/api", "/api"));
        assert!(segment_prefix("/api", "/api/"));
        assert!(segment_prefix("/api", "/api/x"));
        assert!(!segment_prefix("/api", "/apix"));
        assert!(!segment_prefix("/api/admin", "/api/administrator"));
        assert!(segment_prefix("/", "/anything"));
        assert!(!segment_prefix("/api", "/"));
    }
}
