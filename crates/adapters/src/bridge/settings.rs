//! The `[bridge]` section: the web app (or the simulator), its secret, deadlines, retries and
//! the fleet's bridge slots.

use poller_core::clock::de;
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BridgeMode {
    /// Start the in-process simulator on a loopback port and use it.
    Simulator,
    /// Call the deployed Apps Script web app at `url`.
    AppsScript,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeSettings {
    pub mode: BridgeMode,
    /// The web app's `/exec` URL (mode `apps_script`).
    #[serde(default)]
    pub url: String,
    /// Environment variable holding the shared HMAC secret.
    pub secret_env: String,
    /// One POST's deadline (`request_timeout_secs`), below Apps Script's 6-minute limit.
    #[serde(rename = "request_timeout_secs", deserialize_with = "de::secs")]
    pub request_timeout: Duration,
    /// How long retries may go on (`retry_budget_secs`).
    #[serde(rename = "retry_budget_secs", deserialize_with = "de::secs")]
    pub retry_budget: Duration,
    /// Retry backoff bounds (`min_backoff_ms`, `max_backoff_ms`).
    #[serde(rename = "min_backoff_ms", deserialize_with = "de::millis")]
    pub min_backoff: Duration,
    #[serde(rename = "max_backoff_ms", deserialize_with = "de::millis")]
    pub max_backoff: Duration,
    /// Bridge calls at once for the whole fleet: every replica sharing the Redis or PostgreSQL
    /// store counts against this one number (Apps Script allows 30 simultaneous executions per
    /// user). With the embedded store (one poller) it is that poller's.
    pub max_concurrency: usize,
    /// How long a bridge slot's lease lasts without renewal (`slot_lease_secs`): the replica
    /// running the call renews it every third of this, so only a crashed replica's slots
    /// expire, and they come back to the fleet within this time. At least 3.
    #[serde(
        rename = "slot_lease_secs",
        deserialize_with = "de::secs",
        default = "default_slot_lease"
    )]
    pub slot_lease: Duration,
    /// Simulated execution time (mode `simulator`; `simulator_latency_ms`).
    #[serde(rename = "simulator_latency_ms", deserialize_with = "de::millis")]
    pub simulator_latency: Duration,
}

fn default_slot_lease() -> Duration {
    Duration::from_secs(15)
}
