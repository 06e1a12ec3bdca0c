//! Response filters: what every HTTPS response gets on its way back to the
//! client, the proxy's own errors included — HSTS, hardened `Set-Cookie`
//! attributes, and the `[headers]` add / set / remove rules.

pub mod cookies;

use http::header::{SET_COOKIE, STRICT_TRANSPORT_SECURITY};
use http::{HeaderMap, HeaderValue};

use crate::config::{Config, HeaderRules};
use cookies::{CookiePolicy, rewrite_set_cookie};

pub struct ResponseFilters {
    hsts: Option<HeaderValue>,
    cookies: CookiePolicy,
    rules: HeaderRules,
}

impl ResponseFilters {
    pub fn from_config(config: &Config) -> Self {
        ResponseFilters {
            hsts: config.hsts.clone(),
            cookies: config.cookies.clone(),
            rules: HeaderRules {
                add: config.headers.add.clone(),
                set: config.headers.set.clone(),
                remove: config.headers.remove.clone(),
            },
        }
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.rules.remove {
            headers.remove(name);
        }
        if let Some(hsts) = &self.hsts {
            headers.insert(STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
        for (name, value) in &self.rules.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.rules.add {
            if let http::header::Entry::Vacant(vacant) = headers.entry(name) {
                vacant.insert(value.clone());
            }
        }
        if let http::header::Entry::Occupied(mut cookies) = headers.entry(SET_COOKIE) {
            for value in cookies.iter_mut() {
                if let Some(rewritten) = rewrite_set_cookie(value.as_bytes(), &self.cookies)
                    && let Ok(rewritten) = HeaderValue::from_bytes(&rewritten)
                {
                    *value = rewritten;
                }
            }
        }
    }
}
