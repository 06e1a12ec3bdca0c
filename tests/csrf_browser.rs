//! `[[routes]] csrf = true` against what a real browser sends: a headless
//! Chromium, driven over the Chrome DevTools Protocol (CDP), submits a form
//! to a proxied route from a cross-site page (plain http on 127.0.0.1), from
//! a same-site but cross-origin page (https on another localhost port), and
//! from a cross-site page the route lists in `allowed_origins`; and runs a
//! same-origin `fetch()` from a page loaded through the proxy.
//!
//! A refusal is proven both ways: the browser lands on the proxy's 403
//! `{"error":"csrf"}` page, and the upstream recorded no POST. What the
//! browser sent (`Sec-Fetch-Site`, `Origin`, read from its Network events)
//! is asserted too, so each scenario is the one its name says.
//!
//! Needs `/usr/bin/chromium` (Debian package `chromium`). Without it the
//! tests pass with a note on stderr, unless `CI` is set: then they fail.
//! Nothing here sleeps to synchronise: waits poll with a deadline.

mod common;

use std::convert::Infallible;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use common::{Proxy, ProxyConfig, Recorded, Upstream, eventually, make_cert};

const CHROMIUM: &str = "/usr/bin/chromium";

/// How long any one wait on the browser may take.
const WITHIN: Duration = Duration::from_secs(20);

/// The proxied route every scenario posts to.
fn csrf_route(extra: &str) -> String {
    format!("[[routes]]\npath = \"/form\"\ncsrf = true\n{extra}")
}

// ---------------------------------------------------------------------------
// The scenarios

/// A form auto-submitted from `from(env)`'s page is refused, and Chromium
/// sent it with `Sec-Fetch-Site: fetch_site` and that page's origin.
async fn a_form_from_is_refused(from: fn(&Env) -> &Site, fetch_site: &str) {
    let Some(mut env) = Env::start(|_| csrf_route("")).await else {
        return;
    };
    let from = from(&env).clone();
    let (landed, sent) = env.submit_form_from(&from).await;
    env.assert_refused(&landed, &sent);
    assert_eq!(sent.sec_fetch_site.as_deref(), Some(fetch_site), "{sent:?}");
    assert_eq!(
        sent.origin.as_deref(),
        Some(from.origin.as_str()),
        "{sent:?}"
    );
}

#[tokio::test]
async fn a_form_auto_submitted_from_a_cross_site_page_is_refused() {
    a_form_from_is_refused(|env| &env.cross_site, "cross-site").await;
}

#[tokio::test]
async fn a_form_auto_submitted_from_a_same_site_cross_origin_page_is_refused() {
    a_form_from_is_refused(|env| &env.same_site, "same-site").await;
}

#[tokio::test]
async fn a_same_origin_fetch_post_from_a_page_behind_the_proxy_passes() {
    let Some(mut env) = Env::start(|_| csrf_route("")).await else {
        return;
    };
    // Any page of the app will do: the upstream's JSON echo of `/page`.
    let page = env.proxy_url("/page");
    env.navigate(&page).await;
    env.wait_page("the app's page", |p| {
        p.href == page && p.ready == "complete" && shows_echo(&p.text, "GET", "/page")
    })
    .await;

    let answer = env
        .evaluate(
            "fetch('/form', {method: 'POST', body: 'x=1', \
             headers: {'content-type': 'application/x-www-form-urlencoded'}})\
             .then(async r => [r.status, (await r.json()).path])",
        )
        .await
        .expect("the fetch() settles");
    let sent = env.sent_request(&env.proxy_url("/form")).await;
    eprintln!("same-origin fetch: Chromium sent {sent}; fetch() got {answer}");
    assert_eq!(answer, json!([200, "/form"]), "{sent:?}");
    let posts = env.posts();
    assert_eq!(posts.len(), 1, "the upstream saw one POST: {posts:?}");
    assert_eq!(posts[0].target, "/form");
    assert_eq!(posts[0].body, b"x=1");
    assert_eq!(header(&posts[0], "sec-fetch-site"), Some("same-origin"));
    assert_eq!(
        sent.sec_fetch_site.as_deref(),
        Some("same-origin"),
        "{sent:?}"
    );
    assert_eq!(sent.status, Some(200), "{sent:?}");
}

#[tokio::test]
async fn a_form_from_a_cross_site_page_in_allowed_origins_passes() {
    let Some(mut env) =
        Env::start(|cross_site| csrf_route(&format!("allowed_origins = [\"{cross_site}\"]\n")))
            .await
    else {
        return;
    };
    let from = env.cross_site.clone();
    let (landed, sent) = env.submit_form_from(&from).await;
    assert!(
        shows_echo(&landed.text, "POST", "/form"),
        "the browser landed on the upstream's answer: {landed:?}; sent {sent:?}"
    );
    assert_eq!(sent.status, Some(200), "{sent:?}");
    let posts = env.posts();
    assert_eq!(posts.len(), 1, "the upstream saw one POST: {posts:?}");
    assert_eq!(posts[0].target, "/form");
    assert_eq!(posts[0].body, b"x=1");
    assert_eq!(header(&posts[0], "sec-fetch-site"), Some("cross-site"));
    assert_eq!(header(&posts[0], "origin"), Some(from.origin.as_str()));
    assert_eq!(
        sent.sec_fetch_site.as_deref(),
        Some("cross-site"),
        "{sent:?}"
    );
}

/// Whether a page's text is the mock upstream's JSON echo of `method
/// path` (Chromium shows JSON as text, and may offer to pretty-print it).
fn shows_echo(text: &str, method: &str, path: &str) -> bool {
    let json = match (text.find('{'), text.rfind('}')) {
        (Some(start), Some(end)) if start < end => &text[start..=end],
        _ => return false,
    };
    serde_json::from_str::<Value>(json)
        .is_ok_and(|echo| echo["method"] == method && echo["path"] == path)
}

/// A recorded request's header, when it is there once and is text.
fn header<'a>(recorded: &'a Recorded, name: &str) -> Option<&'a str> {
    recorded.headers.get(name).and_then(|v| v.to_str().ok())
}

// ---------------------------------------------------------------------------
// The environment: upstream, two foreign sites, the proxy, a browser tab

struct Env {
    /// Behind the proxy: the mock upstream, recording every request.
    upstream: Upstream,
    /// `http://127.0.0.1:PORT`: another site than `https://localhost:PROXY`.
    cross_site: Site,
    /// `https://localhost:PORT`: the proxy's site, another origin.
    same_site: Site,
    proxy: Proxy,
    browser: Browser,
    /// The CDP session of the one tab every scenario uses.
    tab: String,
    _dir: tempfile::TempDir,
}

impl Env {
    /// Everything running, `routes(cross_site_origin)` as the proxy's
    /// `[[routes]]`. `None` (after a note) when Chromium is missing outside CI.
    async fn start(routes: impl FnOnce(&str) -> String) -> Option<Env> {
        if !Path::new(CHROMIUM).exists() {
            if std::env::var_os("CI").is_some() {
                panic!(
                    "{CHROMIUM} is missing and CI is set: install the Debian package `chromium` \
                     (apt-get install --no-install-recommends chromium)"
                );
            }
            eprintln!(
                "note: skipping the browser CSRF test: {CHROMIUM} is missing \
                 (apt-get install --no-install-recommends chromium)"
            );
            return None;
        }
        let dir = tempfile::tempdir().expect("a temporary directory");
        let upstream = Upstream::start().await;
        let cross_site = Site::plain().await;
        let same_site = Site::tls(dir.path()).await;
        let config = ProxyConfig {
            rest: routes(&cross_site.origin),
            ..Default::default()
        };
        let proxy = Proxy::start(upstream.addr, config).await;
        let mut browser = Browser::launch().await;
        let tab = browser.open_tab().await;
        Some(Env {
            upstream,
            cross_site,
            same_site,
            proxy,
            browser,
            tab,
            _dir: dir,
        })
    }

    /// The POSTs the upstream received.
    fn posts(&self) -> Vec<Recorded> {
        let recorded = self.upstream.recorded().into_iter();
        recorded.filter(|r| r.method == Method::POST).collect()
    }

    fn proxy_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.proxy.https.port())
    }

    async fn navigate(&mut self, url: &str) {
        let answer = self
            .browser
            .cdp
            .call(Some(&self.tab), "Page.navigate", json!({ "url": url }))
            .await
            .unwrap_or_else(|e| panic!("Page.navigate {url}: {e}"));
        if let Some(error) = answer.get("errorText") {
            panic!("Chromium could not open {url}: {error}");
        }
    }

    async fn evaluate(&mut self, expression: &str) -> Result<Value, String> {
        self.browser.evaluate(&self.tab, expression).await
    }

    /// Polls the tab's URL, readyState and text until `done` holds.
    async fn wait_page(&mut self, what: &str, done: impl Fn(&PageState) -> bool) -> PageState {
        let deadline = Instant::now() + WITHIN;
        loop {
            // Fails while a navigation swaps the document: that is "not yet".
            let last = self
                .evaluate(
                    "[location.href, document.readyState, \
                     document.body ? document.body.innerText : '']",
                )
                .await
                .and_then(|v| {
                    serde_json::from_value::<(String, String, String)>(v).map_err(|e| e.to_string())
                })
                .map(|(href, ready, text)| PageState { href, ready, text });
            if let Ok(state) = &last
                && done(state)
            {
                return state.clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "waited {WITHIN:?} for {what}; the tab: {last:?}; upstream saw {:?}; \
                     proxy stderr:\n{}",
                    self.upstream.recorded(),
                    self.proxy.stderr_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Opens `from`'s page whose form posts itself (on load) to the proxy's
    /// `/form`; returns the page the tab lands on and what Chromium sent.
    async fn submit_form_from(&mut self, from: &Site) -> (PageState, SentRequest) {
        let page = format!("{}/post-to/{}", from.origin, self.proxy.https.port());
        let target = self.proxy_url("/form");
        self.navigate(&page).await;
        let landed = self
            .wait_page("the form's answer", |p| {
                p.href == target && p.ready == "complete" && !p.text.is_empty()
            })
            .await;
        let sent = self.sent_request(&target).await;
        eprintln!(
            "form from {}: Chromium sent {sent}; the tab shows {:?}",
            from.origin, landed.text
        );
        let loaded = from.seen();
        assert!(
            loaded
                .iter()
                .any(|s| s.method == "GET" && s.path.starts_with("/post-to/")),
            "the browser loaded the form page from {}: {loaded:?}",
            from.origin
        );
        (landed, sent)
    }

    /// The 403 page is what the browser got, and the upstream saw no POST.
    fn assert_refused(&self, landed: &PageState, sent: &SentRequest) {
        assert!(
            landed.text.contains(r#""error":"csrf""#),
            "the browser landed on the proxy's csrf refusal: {landed:?}; sent {sent:?}"
        );
        assert_eq!(sent.status, Some(403), "{sent:?}");
        let posts = self.posts();
        assert!(posts.is_empty(), "nothing was forwarded: {posts:?}");
    }

    /// What Chromium's network stack put on the wire for the POST to `url`
    /// and the status it got, from the tab's Network events.
    async fn sent_request(&mut self, url: &str) -> SentRequest {
        let deadline = Instant::now() + WITHIN;
        loop {
            if let Some(sent) = self.browser.cdp.sent_request("POST", url)
                && sent.status.is_some()
            {
                return sent;
            }
            if Instant::now() > deadline {
                panic!(
                    "no Network events for POST {url} within {WITHIN:?}: {:?}",
                    self.browser.cdp.sent_request("POST", url)
                );
            }
            // Any answered command reads the events queued before it.
            self.browser
                .cdp
                .call(None, "Browser.getVersion", json!({}))
                .await
                .expect("Browser.getVersion");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[derive(Debug, Clone)]
struct PageState {
    href: String,
    ready: String,
    text: String,
}

/// One request as Chromium sent it (`Network.requestWillBeSentExtraInfo`)
/// and the status of its response (`Network.responseReceived`).
#[derive(Debug, Clone)]
struct SentRequest {
    sec_fetch_site: Option<String>,
    origin: Option<String>,
    status: Option<u64>,
    /// `h2` or `http/1.1`, as Chromium reports it.
    protocol: Option<String>,
}

impl std::fmt::Display for SentRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
        write!(
            f,
            "Sec-Fetch-Site: {}, Origin: {}, over {}, answered {:?}",
            or_none(&self.sec_fetch_site),
            or_none(&self.origin),
            or_none(&self.protocol),
            self.status
        )
    }
}

// ---------------------------------------------------------------------------
// The two foreign sites: the test's own HTTP/1.1 servers

/// What one of the sites received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
}

/// A site that records every request and answers `GET /post-to/PORT` with
/// a form that posts itself on load to `https://localhost:PORT/form`.
#[derive(Clone)]
struct Site {
    origin: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Site {
    /// Plain http on 127.0.0.1.
    async fn plain() -> Site {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("a bound address");
        Site::serve(listener, format!("http://127.0.0.1:{}", addr.port()), None)
    }

    /// https on 127.0.0.1, named `localhost`, with a self-signed certificate.
    async fn tls(dir: &Path) -> Site {
        let cert = make_cert(dir, "site", &["localhost"]);
        let key = PrivateKeyDer::from_pem_file(&cert.key_path).expect("read the site's key");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.der.clone()], key)
            .expect("the site's certificate and key");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("a bound address");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        Site::serve(
            listener,
            format!("https://localhost:{}", addr.port()),
            Some(acceptor),
        )
    }

    fn serve(listener: TcpListener, origin: String, tls: Option<TlsAcceptor>) -> Site {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let site = Site {
            origin,
            seen: seen.clone(),
        };
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let seen = seen.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let seen = seen.clone();
                        async move { Ok::<_, Infallible>(answer(req, &seen).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        // A handshake Chromium gives up on is not the test's concern.
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                        }
                    }
                });
            }
        });
        site
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("the record lock").clone()
    }
}

async fn answer(req: Request<Incoming>, seen: &Mutex<Vec<Seen>>) -> Response<Full<Bytes>> {
    seen.lock().expect("the record lock").push(Seen {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
    });
    let port = req
        .uri()
        .path()
        .strip_prefix("/post-to/")
        .and_then(|p| p.parse::<u16>().ok());
    let (status, content_type, text) = if let Some(port) = port {
        let page = format!(
            "<!doctype html><title>elsewhere</title>\
             <body onload=\"document.forms[0].submit()\">\
             <form method=post action=\"https://localhost:{port}/form\">\
             <input name=x value=1></form></body>"
        );
        (StatusCode::OK, "text/html; charset=utf-8", page)
    } else {
        (StatusCode::NOT_FOUND, "text/plain", "not found".to_string())
    };
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

// ---------------------------------------------------------------------------
// Chromium and a minimal CDP client

/// A headless Chromium in its own process group, killed (the whole group)
/// on drop, with a throwaway profile.
struct Browser {
    cdp: Cdp,
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn launch() -> Browser {
        let profile = tempfile::tempdir().expect("a profile directory");
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--ignore-certificate-errors",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {CHROMIUM}: {e}"));
        let stderr = common::pump(child.stderr.take().expect("chromium's stderr is piped"));
        let devtools_url = || {
            stderr
                .lock()
                .expect("the stderr lock")
                .iter()
                .find_map(|l| l.strip_prefix("DevTools listening on ").map(str::to_string))
        };
        let mut exited = false;
        eventually(WITHIN, || {
            exited = matches!(child.try_wait(), Ok(Some(_)));
            exited || devtools_url().is_some()
        })
        .await;
        let Some(url) = devtools_url() else {
            let _ = child.kill();
            panic!(
                "Chromium did not print its DevTools URL (exited: {exited}); stderr:\n{}",
                stderr.lock().expect("the stderr lock").join("\n")
            );
        };
        let (ws, _) = tokio_tungstenite::connect_async(url.trim())
            .await
            .unwrap_or_else(|e| panic!("connect to Chromium's DevTools at {url}: {e}"));
        Browser {
            cdp: Cdp {
                ws,
                next_id: 0,
                events: Vec::new(),
            },
            child,
            stderr,
            _profile: profile,
        }
    }

    /// A new tab, attached (flat session), with Page and Network events on.
    async fn open_tab(&mut self) -> String {
        let target = self
            .cdp
            .call(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await
            .expect("Target.createTarget");
        let attached = self
            .cdp
            .call(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await
            .expect("Target.attachToTarget");
        let session = attached["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no sessionId in {attached}"))
            .to_string();
        for domain in ["Page.enable", "Network.enable"] {
            self.cdp
                .call(Some(&session), domain, json!({}))
                .await
                .unwrap_or_else(|e| panic!("{domain}: {e}"));
        }
        session
    }

    /// `expression`'s value (promises awaited), or why there is none.
    async fn evaluate(&mut self, session: &str, expression: &str) -> Result<Value, String> {
        let params =
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true });
        let result = self
            .cdp
            .call(Some(session), "Runtime.evaluate", params)
            .await?;
        if let Some(exception) = result.get("exceptionDetails") {
            return Err(format!("{expression} threw: {exception}"));
        }
        Ok(result["result"]["value"].clone())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The group is Chromium's own (process_group(0)): its pid is the id.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // Without the D-Bus complaints of a machine that has no D-Bus.
            let stderr = self
                .stderr
                .lock()
                .map(|lines| {
                    let useful = lines.iter().filter(|l| !l.contains("dbus"));
                    useful.cloned().collect::<Vec<_>>().join("\n")
                })
                .unwrap_or_default();
            eprintln!("chromium stderr:\n{stderr}");
        }
    }
}

/// Commands in order, one at a time; every event read on the way is kept.
struct Cdp {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    events: Vec<Value>,
}

impl Cdp {
    /// Sends `method` (to `session`, or the browser) and waits for its answer.
    async fn call(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut command = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            command["sessionId"] = json!(session);
        }
        let exchange = async {
            self.ws
                .send(Message::text(command.to_string()))
                .await
                .map_err(|e| format!("send {method}: {e}"))?;
            loop {
                let message = self
                    .ws
                    .next()
                    .await
                    .ok_or_else(|| format!("DevTools closed during {method}"))?
                    .map_err(|e| format!("read during {method}: {e}"))?;
                let Message::Text(text) = message else {
                    continue;
                };
                let value: Value = serde_json::from_str(text.as_str())
                    .map_err(|e| format!("DevTools sent non-JSON ({e}): {text}"))?;
                if value["id"] == id {
                    if let Some(error) = value.get("error") {
                        return Err(format!("{method}: {error}"));
                    }
                    return Ok(value["result"].clone());
                }
                if value.get("method").is_some() {
                    self.events.push(value);
                }
            }
        };
        tokio::time::timeout(WITHIN, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer to {method} within {WITHIN:?}")))
    }

    /// The last `method` request to `url` among the events read so far.
    fn sent_request(&self, method: &str, url: &str) -> Option<SentRequest> {
        let params_of = |event: &'static str| {
            self.events
                .iter()
                .filter(move |e| e["method"] == event)
                .map(|e| &e["params"])
        };
        let id = params_of("Network.requestWillBeSent")
            .filter(|p| p["request"]["method"] == method && p["request"]["url"] == url)
            .map(|p| p["requestId"].clone())
            .next_back()?;
        let headers = params_of("Network.requestWillBeSentExtraInfo")
            .find(|p| p["requestId"] == id)
            .map(|p| p["headers"].clone())?;
        let header = |name: &str| {
            headers.as_object().and_then(|h| {
                h.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .and_then(|(_, v)| v.as_str())
                    .map(str::to_string)
            })
        };
        let response = params_of("Network.responseReceived")
            .find(|p| p["requestId"] == id)
            .map(|p| &p["response"]);
        Some(SentRequest {
            sec_fetch_site: header("sec-fetch-site"),
            origin: header("origin"),
            status: response.and_then(|r| r["status"].as_u64()),
            protocol: response.and_then(|r| r["protocol"].as_str().map(str::to_string)),
        })
    }
}
