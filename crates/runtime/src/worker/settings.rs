//! The `[processing]` section: how many commands the worker takes at once, how long it drains,
//! and how long it waits after a refused publish.

use crate::clock::de;
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessingSettings {
    /// Commands processed concurrently; also the consumer prefetch.
    pub max_in_flight: u16,
    /// On SIGTERM, how long in-flight commands may take to finish before the poller exits
    /// (unfinished ones go back to the queue). Key `drain_timeout_secs`.
    #[serde(rename = "drain_timeout_secs", deserialize_with = "de::secs")]
    pub drain_timeout: Duration,
    /// Wait before requeueing a command whose result could not be published. Key
    /// `publish_failure_pause_ms`.
    #[serde(rename = "publish_failure_pause_ms", deserialize_with = "de::millis")]
    pub publish_failure_pause: Duration,
}
