//! The Apps Script web app client.
//!
//! POST `{url}?ts&sig` runs doPost and answers 302 to an echo URL that must be fetched with GET.
//! Redirects are followed here, not by reqwest, so we know which leg failed: after a 302 the
//! action has happened, so only the GET is retried. Before it, transport errors, 429 and 5xx
//! retry the POST (safe: the bridge answers a repeated action_id as it did the first time),
//! with exponential backoff inside a time budget.

use super::signing::{sign, Secret};
use super::{interpret_body, BridgeAnswer, BridgeError, BridgeRequest, Leg};
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

impl AppsScriptBridge {
    pub fn new(cfg: BridgeClientConfig) -> Result<Self, reqwest::Error> {
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

    async fn call(&self, req: &BridgeRequest) -> Result<BridgeAnswer, BridgeError> {
        let body = serde_json::to_vec(req).expect("request serializes");
        let started = Instant::now();
        let mut backoff = self.backoff();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match self.post_once(&body, started).await {
                Ok(tool_result) => {
                    return Ok(BridgeAnswer {
                        tool_result,
                        attempts,
                    })
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(attempt = attempts, error = %e, "bridge call failed; will retry if the budget allows");
                    if !self.wait_next(&mut backoff, started).await {
                        return Err(BridgeError::Exhausted {
                            attempts,
                            elapsed_ms: started.elapsed().as_millis() as u64,
                            last: Box::new(e),
                        });
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn post_once(&self, body: &[u8], started: Instant) -> LegResult {
        let ts = time::OffsetDateTime::now_utc().unix_timestamp();
        let sig = sign(&self.cfg.secret, ts, body);
        let mut url = self.cfg.url.clone();
        url.query_pairs_mut()
            .append_pair("ts", &ts.to_string())
            .append_pair("sig", &sig);
        let resp = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| BridgeError::Transport {
                leg: Leg::Post,
                message: describe(&e),
            })?;
        let status = resp.status();
        if status.is_redirection() {
            let location = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| self.cfg.url.join(l).ok())
                .ok_or(BridgeError::BadRedirect)?;
            return self.get_echo(location, started).await;
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Err(BridgeError::Http {
                leg: Leg::Post,
                status: status.as_u16(),
                retryable: true,
            });
        }
        read_answer(resp, Leg::Post).await
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
                        return read_answer(resp, Leg::Get).await;
                    }
                }
                Err(e) => BridgeError::Transport {
                    leg: Leg::Get,
                    message: describe(&e),
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
}

async fn read_answer(resp: reqwest::Response, leg: Leg) -> LegResult {
    let status = resp.status();
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = resp.text().await.map_err(|e| BridgeError::Transport {
        leg,
        message: describe(&e),
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

/// reqwest's Display omits the cause chain ("error sending request"); include it.
fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    if e.is_timeout() {
        s.push_str(" (timeout)");
    }
    s
}

impl super::Bridge for AppsScriptBridge {
    fn execute<'a>(
        &'a self,
        request: &'a BridgeRequest,
    ) -> BoxFuture<'a, Result<BridgeAnswer, BridgeError>> {
        Box::pin(self.call(request))
    }
}
