//! The Apps Script web app client.
//!
//! POST `{url}?ts&sig` runs doPost and answers 302 to an echo URL that must be fetched with GET.
//! Redirects are followed here, not by reqwest, so we know which leg failed: after a 302 the
//! action has happened, so the POST is never repeated: the GET is retried, and when the answer
//! is still lost the bridge is asked (with `lookup`) for the answer it remembers, which never
//! acts; without one the outcome is [`BridgeError::UnknownOutcome`]. Before the 302, transport
//! errors, 429 and 5xx retry the POST (safe: the bridge answers a repeated request as it did the
//! first time), with exponential backoff inside a time budget.

use super::signing::{sign, Secret};
use super::{interpret_body, Admission, BridgeAnswer, BridgeError, BridgeRequest, Leg};
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::future::BoxFuture;
use reqwest::{redirect, StatusCode};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct BridgeClientConfig {
    pub url: url::Url,
    pub secret: Secret,
    /// Per HTTP request; keep it below Apps Script's 6-minute execution cap.
    pub request_timeout: Duration,
    /// Total time spent retrying one command before it is FAILED.
    pub retry_budget: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

/// The client. Concurrency is limited by the pipeline (which also checks the operator gate
/// after a slot frees up), not here.
pub struct AppsScriptBridge {
    http: reqwest::Client,
    cfg: BridgeClientConfig,
}

/// What one POST (and its GET) produced.
type LegResult = Result<serde_json::Value, BridgeError>;

/// One POST-then-GET exchange, by whether the bridge ran the request.
enum Exchange {
    Answer(serde_json::Value),
    /// Failed before doPost ran (or the bridge answered with an error of its own): a transient
    /// failure may be retried with a new POST.
    BeforeRun(BridgeError),
    /// doPost ran (the 302 came back) and its answer was lost on the way.
    AfterRun(BridgeError),
}

impl AppsScriptBridge {
    pub fn new(cfg: BridgeClientConfig) -> Result<Self, reqwest::Error> {
        crate::tls::ensure_crypto_provider();
        let http = reqwest::Client::builder()
            .redirect(redirect::Policy::none())
            .timeout(cfg.request_timeout)
            .connect_timeout(cfg.request_timeout.min(Duration::from_secs(10)))
            .build()?;
        Ok(Self { http, cfg })
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> {
        ExponentialBuilder::default()
            .with_min_delay(self.cfg.min_backoff)
            .with_max_delay(self.cfg.max_backoff)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// Sleeps for the next backoff step if it fits in the budget; false when it doesn't.
    async fn wait_next(
        &self,
        backoff: &mut impl Iterator<Item = Duration>,
        started: Instant,
    ) -> bool {
        let Some(delay) = backoff.next() else {
            return false;
        };
        if started.elapsed() + delay >= self.cfg.retry_budget {
            return false;
        }
        tokio::time::sleep(delay).await;
        true
    }

    async fn call(
        &self,
        req: &BridgeRequest,
        admission: &dyn Admission,
    ) -> Result<BridgeAnswer, BridgeError> {
        let body = serde_json::to_vec(req).expect("request serializes");
        let started = Instant::now();
        let mut backoff = self.backoff();
        let mut attempts = 0u32;
        loop {
            if attempts > 0 {
                // The gate was checked before the first POST by whoever admitted the call;
                // every retry asks again.
                if let Err(why) = admission.admit() {
                    tracing::warn!(attempts, why = %why, "bridge retry held by the operator gate");
                    return Err(BridgeError::Held { attempts, why });
                }
            }
            attempts += 1;
            match self.exchange(&body, started).await {
                Exchange::Answer(tool_result) => {
                    return Ok(BridgeAnswer {
                        tool_result,
                        attempts,
                    })
                }
                // A lookup's "nothing remembered" is its answer, not a lost one.
                Exchange::AfterRun(e @ BridgeError::NotRemembered { .. }) => return Err(e),
                // doPost ran: the POST is never repeated. Ask for the remembered answer.
                Exchange::AfterRun(lost) => {
                    return self
                        .look_up(req, started, lost)
                        .await
                        .map(|tool_result| BridgeAnswer {
                            tool_result,
                            attempts,
                        })
                }
                Exchange::BeforeRun(e) if e.is_transient() => {
                    tracing::warn!(attempt = attempts, error = %e, "bridge call failed; will retry if the budget allows");
                    if !self.wait_next(&mut backoff, started).await {
                        return Err(BridgeError::Exhausted {
                            attempts,
                            elapsed_ms: started.elapsed().as_millis() as u64,
                            last: Box::new(e),
                        });
                    }
                }
                Exchange::BeforeRun(e) => return Err(e),
            }
        }
    }

    /// After an executed request's answer was lost: asks the bridge (within what is left of
    /// the budget) for the answer it remembers for this request, with `lookup` set, so the
    /// bridge never acts again. Without it, the outcome is unknown.
    async fn look_up(
        &self,
        req: &BridgeRequest,
        started: Instant,
        lost: BridgeError,
    ) -> Result<serde_json::Value, BridgeError> {
        tracing::warn!(error = %lost, "the bridge ran the action but its answer was lost; asking for the remembered answer");
        let body = serde_json::to_vec(&BridgeRequest {
            lookup: true,
            ..req.clone()
        })
        .expect("request serializes");
        let mut backoff = self.backoff();
        let last = loop {
            match self.exchange(&body, started).await {
                Exchange::Answer(v) => return Ok(v),
                // The remembered answer is an error: the action's real (failed) outcome.
                Exchange::BeforeRun(
                    e @ BridgeError::Remote {
                        retryable: false, ..
                    },
                )
                | Exchange::AfterRun(
                    e @ BridgeError::Remote {
                        retryable: false, ..
                    },
                ) => return Err(e),
                Exchange::BeforeRun(e) | Exchange::AfterRun(e) => {
                    if !e.is_transient() || !self.wait_next(&mut backoff, started).await {
                        break e;
                    }
                }
            }
        };
        Err(BridgeError::UnknownOutcome {
            cause: format!("{lost}; then, asking for the remembered answer: {last}"),
        })
    }

    /// One POST and, after a 302, its GET.
    async fn exchange(&self, body: &[u8], started: Instant) -> Exchange {
        let ts = time::OffsetDateTime::now_utc().unix_timestamp();
        let sig = sign(&self.cfg.secret, ts, body);
        let mut url = self.cfg.url.clone();
        url.query_pairs_mut()
            .append_pair("ts", &ts.to_string())
            .append_pair("sig", &sig);
        let resp = match self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec())
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return Exchange::BeforeRun(BridgeError::Transport {
                    leg: Leg::Post,
                    message: self.describe(e),
                })
            }
        };
        let status = resp.status();
        if status.is_redirection() {
            let Some(location) = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| self.cfg.url.join(l).ok())
            else {
                return Exchange::AfterRun(BridgeError::BadRedirect);
            };
            drain(resp).await;
            return match self.get_echo(location, started).await {
                Ok(v) => Exchange::Answer(v),
                // The bridge's own answer, which happens to be an error: a real outcome.
                Err(e @ BridgeError::Remote { .. }) => Exchange::BeforeRun(e),
                Err(e) => Exchange::AfterRun(e),
            };
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Exchange::BeforeRun(BridgeError::Http {
                leg: Leg::Post,
                status: status.as_u16(),
                retryable: true,
            });
        }
        match self.read_answer(resp, Leg::Post).await {
            Ok(v) => Exchange::Answer(v),
            Err(e) => Exchange::BeforeRun(e),
        }
    }

    /// The GET leg: doPost already ran, so only this request is ever repeated.
    async fn get_echo(&self, location: url::Url, started: Instant) -> LegResult {
        let mut backoff = self.backoff();
        let mut tries = 0u32;
        loop {
            tries += 1;
            let failure = match self.http.get(location.clone()).send().await {
                Ok(resp) => {
                    let status = resp.status();
                    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                        BridgeError::Http {
                            leg: Leg::Get,
                            status: status.as_u16(),
                            retryable: true,
                        }
                    } else {
                        match self.read_answer(resp, Leg::Get).await {
                            // A quota page on the GET: the GET (only) is worth another try.
                            Err(
                                e @ BridgeError::Malformed {
                                    retryable: true, ..
                                },
                            ) => e,
                            other => return other,
                        }
                    }
                }
                Err(e) => BridgeError::Transport {
                    leg: Leg::Get,
                    message: self.describe(e),
                },
            };
            tracing::warn!(try_ = tries, error = %failure, "bridge echo GET failed; retrying the GET only");
            if !self.wait_next(&mut backoff, started).await {
                // Not transient for the caller: repeating the POST is not ours to do here.
                return Err(BridgeError::Exhausted {
                    attempts: tries,
                    elapsed_ms: started.elapsed().as_millis() as u64,
                    last: Box::new(failure),
                });
            }
        }
    }

    async fn read_answer(&self, resp: reqwest::Response, leg: Leg) -> LegResult {
        let status = resp.status();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp.text().await.map_err(|e| BridgeError::Transport {
            leg,
            message: self.describe(e),
        })?;
        if status.is_success() {
            return interpret_body(status.as_u16(), content_type.as_deref(), &text);
        }
        // A non-2xx that carries contract JSON or an HTML page says more than its status.
        match interpret_body(status.as_u16(), content_type.as_deref(), &text) {
            Err(e @ BridgeError::Remote { .. }) => Err(e),
            Err(BridgeError::Malformed {
                message, retryable, ..
            }) if text.trim_start().starts_with('<') => Err(BridgeError::Malformed {
                status: status.as_u16(),
                message,
                retryable,
            }),
            _ => Err(BridgeError::Http {
                leg,
                status: status.as_u16(),
                retryable: false,
            }),
        }
    }

    /// What went wrong, for the result, alerts, audit and logs: reqwest's message and its
    /// cause chain (its Display omits the causes), never the URL. The web app's URL holds the
    /// deployment id and every request's `ts` and `sig`, and an error leaves the process in
    /// results, replies, alerts, audit records and logs. Any trace of the configured URL that a
    /// cause might still quote is masked as well.
    fn describe(&self, e: reqwest::Error) -> String {
        let timeout = e.is_timeout();
        let e = e.without_url();
        let mut s = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(cause) = src {
            s.push_str(": ");
            s.push_str(&cause.to_string());
            src = cause.source();
        }
        if timeout {
            s.push_str(" (timeout)");
        }
        scrub(&s, &self.cfg.url)
    }
}

/// Masks the configured URL's path and query (the deployment id), and any `sig`/`ts`
/// parameter, wherever they appear in `text`.
pub(crate) fn scrub(text: &str, url: &url::Url) -> String {
    let mut out = text.to_owned();
    let path = url.path();
    if path.len() > 1 {
        out = out.replace(path, "/<bridge path>");
    }
    if let Some(q) = url.query().filter(|q| !q.is_empty()) {
        out = out.replace(q, "<query>");
    }
    for key in ["sig=", "ts="] {
        while let Some(i) = out.find(key) {
            let end = out[i..]
                .find(['&', ')', ' ', '"'])
                .map_or(out.len(), |j| i + j);
            out.replace_range(i..end, "<redacted>");
        }
    }
    out
}

impl super::Bridge for AppsScriptBridge {
    fn execute<'a>(
        &'a self,
        request: &'a BridgeRequest,
        admission: &'a dyn Admission,
    ) -> BoxFuture<'a, Result<BridgeAnswer, BridgeError>> {
        Box::pin(self.call(request, admission))
    }
}

/// The most of a 302's page that is read before its GET, and how long that may take.
const REDIRECT_PAGE_LIMIT: usize = 64 * 1024;
const REDIRECT_PAGE_WAIT: Duration = Duration::from_secs(1);

/// Reads the 302's page (Apps Script sends a small HTML one) to its end, so its connection goes
/// back to the pool rather than being busy, or closed, when the next request wants one. A page
/// past [`REDIRECT_PAGE_LIMIT`], slower than [`REDIRECT_PAGE_WAIT`], or one that fails, is
/// left: the GET goes ahead either way (the action has run), on another connection.
async fn drain(mut resp: reqwest::Response) {
    let read_all = async {
        let mut read = 0;
        while let Ok(Some(chunk)) = resp.chunk().await {
            read += chunk.len();
            if read > REDIRECT_PAGE_LIMIT {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(REDIRECT_PAGE_WAIT, read_all).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CHECK_INTEGRATION_STATUS request for `action_id`.
    fn request(action_id: &str) -> super::super::BridgeRequest {
        super::super::BridgeRequest {
            action_id: action_id.into(),
            command_type: poller_core::intake::CommandType::CheckIntegrationStatus.into(),
            params: super::super::BridgeParams {
                service: "google".into(),
            },
            agent: "bot".into(),
            agent_verified: true,
            requested_at: "now".into(),
            lookup: false,
        }
    }

    #[test]
    fn scrub_masks_the_deployment_and_the_signature() {
        let url = url::Url::parse("https://script.google.com/macros/s/AKfycbDEPLOY/exec").unwrap();
        let msg = "error sending request for url (https://script.google.com/macros/s/AKfycbDEPLOY/exec?ts=1700000000&sig=abcdef0123): connection refused";
        let s = scrub(msg, &url);
        assert!(!s.contains("AKfycbDEPLOY"), "{s}");
        assert!(!s.contains("abcdef0123"), "{s}");
        assert!(!s.contains("1700000000"), "{s}");
        assert!(s.contains("connection refused"), "{s}");
    }

    #[tokio::test]
    async fn transport_errors_name_no_url() {
        // A port nobody listens on: connection refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = url::Url::parse(&format!(
            "http://127.0.0.1:{port}/macros/s/AKfycbDEPLOY/exec"
        ))
        .unwrap();
        let client = AppsScriptBridge::new(BridgeClientConfig {
            url,
            secret: Secret::new("s3cret"),
            request_timeout: Duration::from_secs(2),
            retry_budget: Duration::from_millis(1),
            min_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        })
        .unwrap();
        let req = request("a");
        let e = client
            .call(&req, &super::super::AlwaysAdmit)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("transport error"), "{e}");
        for leak in ["AKfycbDEPLOY", "sig=", "ts=", "127.0.0.1"] {
            assert!(!e.contains(leak), "{leak} in {e}");
        }
    }

    /// A lookup is answered, never acted on: "nothing remembered" before the action ran (an
    /// answer, not a lost one, so not UNKNOWN_OUTCOME), the remembered answer after.
    #[tokio::test]
    async fn a_lookup_says_nothing_is_remembered_or_returns_the_remembered_answer() {
        use crate::bridge::simulator;
        let secret = Secret::new("lookup-secret");
        let sim = simulator::start(
            simulator::SimulatorConfig::new(secret.clone()),
            ([127, 0, 0, 1], 0).into(),
        )
        .await
        .unwrap();
        let client = AppsScriptBridge::new(BridgeClientConfig {
            url: sim.url(),
            secret,
            request_timeout: Duration::from_secs(5),
            retry_budget: Duration::from_secs(5),
            min_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        })
        .unwrap();
        let look = super::super::BridgeRequest {
            lookup: true,
            ..request("l-1")
        };
        let none = client
            .call(&look, &super::super::AlwaysAdmit)
            .await
            .unwrap_err();
        assert!(matches!(none, BridgeError::NotRemembered { .. }), "{none}");
        assert_eq!(sim.executions("l-1"), 0);
        let ran = client
            .call(&request("l-1"), &super::super::AlwaysAdmit)
            .await
            .unwrap();
        let again = client
            .call(&look, &super::super::AlwaysAdmit)
            .await
            .unwrap();
        assert_eq!(again.tool_result, ran.tool_result);
        assert_eq!((sim.executions("l-1"), sim.lookups("l-1")), (1, 2));
    }

    /// A web app like Apps Script's: a POST is answered 302 with a small HTML page (as Google's
    /// "Moved Temporarily" is), its GET with the answer; every request on keep-alive
    /// connections. How many connections were opened.
    async fn apps_script_like() -> (url::Url, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let opened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = opened.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut sock = BufReader::new(sock);
                    loop {
                        let (mut line, mut length) = (String::new(), 0usize);
                        if sock.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let post = line.starts_with("POST");
                        loop {
                            let mut h = String::new();
                            if sock.read_line(&mut h).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if h == "\r\n" {
                                break;
                            }
                            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                length = v.trim().parse().unwrap();
                            }
                        }
                        let mut body = vec![0; length];
                        sock.read_exact(&mut body).await.unwrap();
                        let answer = if post {
                            let page = "<HTML><HEAD><TITLE>Moved Temporarily</TITLE></HEAD><BODY>The document has moved <A HREF=\"/echo?user_content_key=k\">here</A>.</BODY></HTML>";
                            format!("HTTP/1.1 302 Moved Temporarily\r\nLocation: /echo?user_content_key=k\r\nContent-Type: text/html; charset=UTF-8\r\nContent-Length: {}\r\n\r\n{page}", page.len())
                        } else {
                            let json = r#"{"status":"success","integration_status":"ok"}"#;
                            format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}", json.len())
                        };
                        // The head first and the page a moment later, as a page arrives from
                        // far away: the client has its answer before the page is in.
                        let (head, page) = answer.split_at(answer.find("\r\n\r\n").unwrap() + 4);
                        if sock.get_mut().write_all(head.as_bytes()).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        if sock.get_mut().write_all(page.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let url = url::Url::parse(&format!("http://{addr}/macros/s/D/exec")).unwrap();
        (url, opened)
    }

    /// The 302's page is read to its end, so the connection goes back to the pool: calls one
    /// after another share one connection instead of opening (in production: a TLS handshake
    /// with Google) one or two per call.
    #[tokio::test]
    async fn calls_one_after_another_reuse_one_connection() {
        let (url, opened) = apps_script_like().await;
        let client = AppsScriptBridge::new(BridgeClientConfig {
            url,
            secret: Secret::new("s3cret"),
            request_timeout: Duration::from_secs(5),
            retry_budget: Duration::from_secs(5),
            min_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        })
        .unwrap();
        for i in 0..5 {
            let req = request(&format!("a-{i}"));
            let answer = client.call(&req, &super::super::AlwaysAdmit).await.unwrap();
            assert_eq!(answer.attempts, 1);
        }
        assert_eq!(
            opened.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "five calls (ten requests) on one connection"
        );
    }
}
