//! The optional webhook notifier: posts each parked approval (and its reminder) to a
//! Slack-compatible incoming webhook.
//!
//! In: a notice ([`super::render::webhook_notice`]). Out: a POST, retried with backoff for up
//! to [`RETRY_BUDGET`] in a task of its own, so a slow or failing webhook never holds back the
//! pipeline or the sweep. The URL is a secret (Slack's carry their token): never logged.

use crate::bridge::signing::Secret;
use backon::{ExponentialBuilder, Retryable};
use std::time::Duration;

/// How long one notice is retried.
pub const RETRY_BUDGET: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Notifier {
    client: reqwest::Client,
    url: Secret,
}

impl Notifier {
    /// A notifier posting to `url` (each post bounded by `timeout`).
    pub fn new(url: Secret, timeout: Duration) -> Result<Self, String> {
        url::Url::parse(&url.expose()).map_err(|e| {
            format!("approval.webhook_url_env: the variable does not hold a URL ({e})")
        })?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("approval webhook client: {e}"))?;
        Ok(Self { client, url })
    }

    /// Posts `notice` in the background, retrying failures with backoff.
    pub fn post(&self, notice: serde_json::Value, what: &'static str) {
        let me = self.clone();
        tokio::spawn(async move {
            let attempt = || async {
                let r = me
                    .client
                    .post(me.url.expose())
                    .json(&notice)
                    .send()
                    .await
                    // Without the URL: it carries the webhook's token.
                    .map_err(|e| format!("{}", e.without_url()))?;
                if r.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("answered {}", r.status()))
                }
            };
            let sent = attempt
                .retry(
                    ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(200))
                        .with_max_delay(Duration::from_secs(10))
                        .with_jitter()
                        .with_total_delay(Some(RETRY_BUDGET))
                        .without_max_times(),
                )
                .notify(|e, after| {
                    tracing::warn!(error = %e, retry_in_ms = after.as_millis() as u64, what, "approval webhook post failed; retrying");
                })
                .await;
            match sent {
                Ok(()) => tracing::info!(what, "approval webhook notified"),
                Err(e) => {
                    tracing::error!(error = %e, what, "approval webhook not notified; gave up")
                }
            }
        });
    }
}
