//! Route policies. Each is a small module with a pure decision over the
//! request parts; the pipeline runs them in SPEC's order — limits, method,
//! rate limit, JWT, scopes, claims, CSRF, schema (a rate limit keyed by `sub` runs
//! right after JWT) — and acts on the first [`crate::reject::Rejection`].

pub mod claims;
pub mod csrf;
pub mod json_dense;
mod json_in_place;
pub mod json_tape;
pub mod jwt;
pub mod limits;
pub mod method;
pub mod rate_limit;
pub mod schema;
pub mod scopes;
