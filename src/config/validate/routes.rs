//! `[jwt]` and `[[routes]]`: keys decoded, each route's path normalized and
//! unique, its policies (rate limit, claims, CSRF, schema) checked against
//! the rest of the configuration.

use std::path::Path;
use std::sync::Arc;

use http::Method;

use crate::config::file;
use crate::config::{Jwt, Route, Server, Upstream};
use crate::policy::claims::{ClaimRule, ClaimValue};
use crate::policy::csrf::Origin;
use crate::policy::jwt::{JwtSettings, KeyFile, VerifierConfig};
use crate::policy::rate_limit::{KeySource, Rate, RateLimitSpec};
use crate::policy::schema::RouteSchema;

use super::{PROXY_OWNED_HEADERS, Result, header_name, invalid, read_file, resolve};

fn key_file(key: &str, base_dir: &Path, name: &str) -> Result<KeyFile> {
    Ok(KeyFile {
        name: name.to_string(),
        contents: read_file(key, base_dir, name)?,
    })
}

pub(super) fn jwt(s: &file::JwtSection, base_dir: &Path) -> Result<Jwt> {
    let uses_hmac = s
        .algorithms
        .iter()
        .any(|a| a.to_ascii_uppercase().starts_with("HS"));
    let secret = if uses_hmac {
        std::env::var_os(&s.secret_env).map(|v| v.as_encoded_bytes().to_vec())
    } else {
        None
    };
    let settings = JwtSettings {
        algorithms: s.algorithms.clone(),
        secret,
        secret_env: Some(s.secret_env.clone()),
        public_key: s
            .public_key
            .as_deref()
            .map(|name| key_file("jwt.public_key", base_dir, name))
            .transpose()?,
        jwks: s
            .jwks
            .as_deref()
            .map(|name| key_file("jwt.jwks", base_dir, name))
            .transpose()?,
        jwks_url: s.jwks_url.clone(),
        jwks_refresh: s.jwks_refresh.0,
        issuer: s.issuer.clone(),
        audience: s.audience.clone(),
        leeway: s.leeway.0,
    };
    // Checked before the key material: a wrong header name is the error to
    // report even where the secret is not set (as under `portcullis check`).
    let mut forward_claims = Vec::new();
    for (claim, header) in &s.forward_claims {
        let key = format!("jwt.forward_claims.{claim}");
        let name = header_name(&key, header)?;
        if PROXY_OWNED_HEADERS.contains(&name.as_str()) {
            return Err(invalid(
                &key,
                format!(
                    r#""{header}" is a header the proxy sets itself or that frames the request; name another, e.g. "X-Auth-{claim}""#
                ),
            ));
        }
        forward_claims.push((claim.clone(), name));
    }
    let verifier = VerifierConfig::new(settings.clone())
        .map_err(|e| invalid(format!("jwt.{}", e.key), e.message))?;
    if let Some(cookie) = &s.token_cookie
        && (cookie.is_empty() || cookie.contains([';', '=', ' ', ',']))
    {
        return Err(invalid(
            "jwt.token_cookie",
            format!(r#"not a valid cookie name: "{cookie}""#),
        ));
    }
    Ok(Jwt {
        settings,
        verifier,
        forward_claims,
        token_cookie: s.token_cookie.clone(),
    })
}

/// The body limit of a `json_schema` route that sets none. The body is read
/// whole and judged in place (`policy::json_tape`: an index under its
/// size), but the validator keeps every error it finds before the first 10
/// are reported: a body that fails everywhere takes up to ~40 times its
/// size while it is judged, so the server-wide 10 MiB default would let one
/// request cost 400 MiB.
pub const SCHEMA_DEFAULT_MAX_BODY_BYTES: u64 = 1 << 20;

/// A route's `claims` table as rules: each key a claim path, each value a
/// string, an integer, a boolean or a non-empty list of them.
fn claim_rules(table: &toml::Table, jwt: bool, i: usize) -> Result<Vec<ClaimRule>> {
    let at = |claim: &str| {
        // `locate` walks dotted keys: a claim path with a dot or a quote in
        // it is pointed at by its table, and named in the message.
        if claim.contains(['.', '"']) || claim.is_empty() {
            format!("routes[{i}].claims")
        } else {
            format!("routes[{i}].claims.{claim}")
        }
    };
    if !jwt {
        return Err(invalid(
            format!("routes[{i}].claims"),
            "claims need jwt = true on the same route",
        ));
    }
    if table.is_empty() {
        return Err(invalid(
            format!("routes[{i}].claims"),
            "list at least one claim, or leave the key out",
        ));
    }
    let one = |claim: &str, value: &toml::Value| match value {
        toml::Value::String(s) => Ok(ClaimValue::String(s.clone())),
        toml::Value::Integer(n) => Ok(ClaimValue::Integer(*n)),
        toml::Value::Boolean(b) => Ok(ClaimValue::Bool(*b)),
        other => Err(invalid(
            at(claim),
            format!(
                r#"claim "{claim}": expected a string, an integer, a boolean or a list of them, got {}"#,
                other.type_str()
            ),
        )),
    };
    table
        .iter()
        .map(|(claim, value)| {
            let accepted = match value {
                toml::Value::Array(items) if items.is_empty() => {
                    return Err(invalid(
                        at(claim),
                        format!(r#"claim "{claim}": an empty list would refuse every token"#),
                    ));
                }
                toml::Value::Array(items) => items
                    .iter()
                    .map(|item| one(claim, item))
                    .collect::<Result<Vec<_>>>()?,
                single => vec![one(claim, single)?],
            };
            ClaimRule::parse(claim, accepted).map_err(|why| {
                invalid(
                    at(claim),
                    format!(
                        r#"claim "{claim}": not a claim path ({why}); write a segment with a dot in double quotes, as in '"https://example.com/roles"'"#
                    ),
                )
            })
        })
        .collect()
}

pub(super) fn routes(
    sections: &[file::RouteSection],
    has_jwt: bool,
    server: &Server,
    base_dir: &Path,
    named_upstreams: &[Upstream],
) -> Result<Vec<Route>> {
    let case_insensitive = server.case_insensitive_routes;
    let mut routes: Vec<Route> = Vec::with_capacity(sections.len());
    for (i, r) in sections.iter().enumerate() {
        let key = |k: &str| format!("routes[{i}].{k}");
        let normalized = crate::path::normalize(&r.path)
            .map_err(|e| invalid(key("path"), format!("not a valid path: {}", e.message())))?;
        if normalized.path != r.path
            || r.path.contains(';')
            || (r.path.len() > 1 && r.path.ends_with('/'))
        {
            return Err(invalid(
                key("path"),
                format!(
                    r#"write the path in normalized form without ';' or a trailing '/', e.g. "{}""#,
                    normalized
                        .match_path()
                        .trim_end_matches('/')
                        .replace("//", "/")
                ),
            ));
        }
        if let Some(first) = routes.iter().position(|other| other.path == r.path) {
            return Err(invalid(
                key("path"),
                format!("the same path as routes[{first}]"),
            ));
        }
        if case_insensitive
            && let Some(first) = routes
                .iter()
                .position(|other| other.path.eq_ignore_ascii_case(&r.path))
        {
            return Err(invalid(
                key("path"),
                format!(
                    "the same path as routes[{first}] when routes match case-insensitively (server.case_insensitive_routes)"
                ),
            ));
        }
        let methods = r
            .methods
            .as_ref()
            .map(|list| {
                if list.is_empty() {
                    return Err(invalid(
                        key("methods"),
                        "list at least one method, or leave the key out",
                    ));
                }
                list.iter()
                    .enumerate()
                    .map(|(j, m)| {
                        let upper = m.to_ascii_uppercase();
                        if upper != *m {
                            return Err(invalid(
                                format!("routes[{i}].methods[{j}]"),
                                format!(r#"methods are upper case: "{upper}""#),
                            ));
                        }
                        Method::from_bytes(m.as_bytes()).map_err(|_| {
                            invalid(
                                format!("routes[{i}].methods[{j}]"),
                                format!(r#"not a method: "{m}""#),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?;
        if r.jwt && !has_jwt {
            return Err(invalid(
                key("jwt"),
                "a route with jwt = true needs a [jwt] section",
            ));
        }
        if let Some((j, bad)) = r
            .scopes
            .iter()
            .enumerate()
            .find(|(_, s)| !crate::policy::scopes::is_valid_scope_token(s))
        {
            return Err(invalid(
                format!("routes[{i}].scopes[{j}]"),
                format!(
                    r#"not a valid scope (RFC 6750: printable ASCII, no space, '"' or '\'): "{bad}""#
                ),
            ));
        }
        if !r.scopes.is_empty() && !r.jwt {
            return Err(invalid(
                key("scopes"),
                "scopes need jwt = true on the same route",
            ));
        }
        let claims = match &r.claims {
            None => Vec::new(),
            Some(table) => claim_rules(table, r.jwt, i)?,
        };
        let rate_limit = r
            .rate_limit
            .as_ref()
            .map(|rl| {
                let rate: Rate = rl
                    .rate
                    .parse()
                    .map_err(|e: String| invalid(key("rate_limit.rate"), e))?;
                let burst = rl.burst.unwrap_or(rate.count);
                if burst == 0 {
                    return Err(invalid(key("rate_limit.burst"), "must be at least 1"));
                }
                let source: KeySource = rl
                    .key
                    .parse()
                    .map_err(|e: String| invalid(key("rate_limit.key"), e))?;
                if source == KeySource::Sub && !r.jwt {
                    return Err(invalid(
                        key("rate_limit.key"),
                        r#""sub" needs jwt = true on the same route"#,
                    ));
                }
                Ok(RateLimitSpec {
                    rate,
                    burst,
                    key: source,
                })
            })
            .transpose()?;
        if !r.allowed_origins.is_empty() && !r.csrf {
            return Err(invalid(
                key("allowed_origins"),
                "allowed_origins has no effect without csrf = true on the same route",
            ));
        }
        let allowed_origins = r
            .allowed_origins
            .iter()
            .enumerate()
            .map(|(j, origin)| {
                Origin::parse(origin)
                    .map_err(|why| invalid(format!("routes[{i}].allowed_origins[{j}]"), why))
            })
            .collect::<Result<Vec<_>>>()?;
        let json_schema = r
            .json_schema
            .as_deref()
            .map(|name| {
                RouteSchema::load(name, &resolve(base_dir, name))
                    .map(Arc::new)
                    .map_err(|why| invalid(key("json_schema"), format!("{name}: {why}")))
            })
            .transpose()?;
        let max_body_bytes = r.max_body_bytes.map(|s| s.0).or_else(|| {
            json_schema
                .as_ref()
                .map(|_| SCHEMA_DEFAULT_MAX_BODY_BYTES.min(server.max_body_bytes))
        });
        let upstream = match &r.upstream {
            None => 0,
            Some(name) => {
                let found = named_upstreams.iter().position(|u| *u.name == **name);
                match found {
                    Some(index) => index + 1,
                    None if name == "default" => 0,
                    None => {
                        let known: Vec<&str> = named_upstreams.iter().map(|u| &*u.name).collect();
                        return Err(invalid(
                            key("upstream"),
                            if known.is_empty() {
                                format!(
                                    r#"no upstream named "{name}": add an [upstreams.{name}] table"#
                                )
                            } else {
                                format!(
                                    r#"no upstream named "{name}" (named upstreams: {})"#,
                                    known.join(", ")
                                )
                            },
                        ));
                    }
                }
            }
        };
        routes.push(Route {
            upstream,
            path: r.path.clone(),
            methods,
            jwt: r.jwt,
            scopes: r.scopes.clone(),
            claims,
            rate_limit,
            csrf: r.csrf,
            allowed_origins,
            json_schema,
            max_body_bytes,
        });
    }
    Ok(routes)
}
