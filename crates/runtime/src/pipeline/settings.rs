//! The `[intake]` section: what the first stages accept (size, unverified agents) and the
//! per-agent admission limit.

use crate::clock::de;
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntakeSettings {
    /// Payloads above this many bytes are refused.
    pub max_payload_bytes: usize,
    /// Accept commands without the AMQP user_id, attributing them to the payload's agent_id,
    /// marked unverified. Off by default: identity comes from the broker.
    pub allow_unverified_agents: bool,
    /// Per-agent admission: at most `count` commands per agent within `window_secs`, counted
    /// for the whole fleet in the shared store; the rest end REJECTED (`rate_limited`) before
    /// any claim, judge or bridge call. Off when absent.
    #[serde(default)]
    pub per_agent_limit: Option<AdmissionLimit>,
}

/// A per-agent admission limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionLimit {
    pub count: usize,
    #[serde(rename = "window_secs", deserialize_with = "de::secs")]
    pub window: Duration,
}
