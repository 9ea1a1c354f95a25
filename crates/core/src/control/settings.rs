//! The `[control]` section: the exchanges and streams of operator control, who may pull the
//! levers, and the automatic trips.

use crate::control::trip::TripRule;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSettings {
    /// Topic exchange operators publish pause/resume/halt/status to; every replica listens.
    pub exchange: String,
    /// Fanout exchange the stored control state is written through (operators and the
    /// poller's trip), feeding `state_queue`.
    pub state_exchange: String,
    /// Stream holding the control state's history: every replica folds it at start and after
    /// every reconnect, before it consumes anything, and follows it while running.
    pub state_queue: String,
    /// Durable queue collecting control events (`event.#`): who changed what, when, why.
    pub events_queue: String,
    /// Broker users allowed to pull the levers (checked against the AMQP user_id).
    pub operators: Vec<String>,
    /// Automatic trips (Emergency-INT-E01), per command type.
    #[serde(default)]
    pub trips: Vec<TripRule>,
    /// What an empty state stream means. `untrusted` (the default): replicas hold paused until
    /// an operator's first lever writes the first entry (`command-poller resume` on a new
    /// deployment), so a stream someone deleted and declared again never reads as RUNNING.
    /// `running`: a new system runs (local development, config/local.toml).
    #[serde(default)]
    pub empty_stream: EmptyStream,
    /// People a loosening lever needs (lifting a halt, releasing a quarantined agent, recording
    /// a cut service reconnected), the proposer the first; the others second it with
    /// `command-poller second`. 1: one operator, at once. Default 2.
    #[serde(default = "two")]
    pub loosening_approvals: usize,
    /// How long a loosening proposal waits for its seconds (key `loosening_expiry_secs`).
    #[serde(
        rename = "loosening_expiry_secs",
        default = "an_hour",
        deserialize_with = "crate::clock::de::secs"
    )]
    pub loosening_expiry: std::time::Duration,
}

fn two() -> usize {
    2
}

fn an_hour() -> std::time::Duration {
    std::time::Duration::from_secs(3600)
}

impl ControlSettings {
    /// The fold's rules for loosening levers.
    pub fn rules(&self) -> super::loosening::Rules {
        super::loosening::Rules {
            loosening_approvals: self.loosening_approvals.max(1),
        }
    }
}

/// What an empty control state stream means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmptyStream {
    #[default]
    Untrusted,
    Running,
}
