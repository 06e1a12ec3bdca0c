//! The route table: `[[routes]]` matched by longest segment prefix.
//!
//! `/api` matches `/api` and `/api/x`, never `/apix`. Matching runs on the
//! normalized path with `;parameters` stripped, so what is judged is what the
//! upstream will read. With `case_insensitive_routes`, prefixes compare
//! ASCII case-insensitively, so `/API/admin` cannot walk past a policy on
//! `/api/admin` in front of an upstream that routes without case (IIS,
//! ASP.NET, some Spring and Express set-ups); the path forwarded is unchanged.

use std::sync::Arc;

use http::HeaderValue;

use crate::config::Route;
use crate::policy::rate_limit::{RouteLimiter, SharedQuota};
use crate::telemetry::RouteMetrics;

/// A route ready to judge requests: its configuration plus what the policies
/// need precomputed (the `Allow` header, its limiter).
pub struct RouteRuntime {
    pub label: Arc<str>,
    pub config: Route,
    pub allow: Option<HeaderValue>,
    pub limiter: Option<Arc<RouteLimiter>>,
    /// The limit as the shared (Redis) limiter's script arguments.
    pub shared_quota: Option<SharedQuota>,
    pub max_body_bytes: u64,
    pub metrics: RouteMetrics,
}

pub struct RouteTable {
    /// Longest path first, so the first match is the most specific.
    routes: Vec<RouteRuntime>,
    /// The label of requests that match no route, and their metrics.
    pub unmatched: Arc<str>,
    pub unmatched_metrics: RouteMetrics,
    case_insensitive: bool,
}

impl RouteTable {
    pub fn new(
        mut routes: Vec<RouteRuntime>,
        metrics: &crate::telemetry::Metrics,
        case_insensitive: bool,
    ) -> Self {
        routes.sort_by_key(|route| std::cmp::Reverse(route.config.path.len()));
        let unmatched: Arc<str> = Arc::from("-");
        RouteTable {
            routes,
            unmatched_metrics: RouteMetrics::new(metrics, unmatched.clone()),
            unmatched,
            case_insensitive,
        }
    }

    pub fn find(&self, match_path: &str) -> Option<&RouteRuntime> {
        let matches = if self.case_insensitive {
            segment_prefix_ignoring_case
        } else {
            segment_prefix
        };
        self.routes
            .iter()
            .find(|route| matches(&route.config.path, match_path))
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

/// [`segment_prefix`], comparing ASCII letters without case.
pub fn segment_prefix_ignoring_case(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.get(..prefix.len()) {
        Some(head) if head.eq_ignore_ascii_case(prefix) => {
            let rest = &path[prefix.len()..];
            rest.is_empty() || rest.starts_with('/')
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::{segment_prefix, segment_prefix_ignoring_case};

    #[test]
    fn segment_prefixes_ignoring_case() {
        assert!(segment_prefix_ignoring_case("/api/admin", "/API/Admin"));
        assert!(segment_prefix_ignoring_case("/api/admin", "/api/ADMIN/x"));
        assert!(!segment_prefix_ignoring_case(
            "/api/admin",
            "/API/administrator"
        ));
        assert!(!segment_prefix_ignoring_case("/api", "/ap"));
        assert!(!segment_prefix_ignoring_case("/é", "/É"), "ASCII only");
        assert!(segment_prefix_ignoring_case("/", "/X"));
        assert!(!segment_prefix("/api/admin", "/API/admin"));
    }

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
