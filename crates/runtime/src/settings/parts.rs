//! The components the command line and the tools build from the whole settings: each takes
//! its own sections here, so the component itself never sees the rest.

use super::Settings;
use crate::audit::sink::SinkConfig;
use crate::broker::Endpoints;
use crate::control::operator::Operator;
use std::time::Duration;

impl SinkConfig {
    /// The audit sink of the system `s` describes.
    pub fn from_settings(s: &Settings) -> Self {
        Self {
            amqp: s.amqp.clone(),
            endpoints: s.amqp.checked_endpoints(),
            audit: s.audit.clone(),
            alerts_exchange: s.topology.alerts_exchange.clone(),
            dead_letter_exchange: s.topology.dead_letter_exchange.clone(),
            chain_key: s.secrets.audit_chain_key.clone(),
        }
    }
}

impl<'a> Operator<'a> {
    /// An operator for the system `settings` describe, connecting to `endpoints`.
    pub fn new(settings: &'a Settings, endpoints: &Endpoints, wait: Duration) -> Self {
        Self {
            control: &settings.control,
            commands_queue: &settings.topology.commands_queue,
            poller_user: settings.poller_user(),
            replication: settings.topology.replication,
            endpoints: endpoints.clone(),
            wait,
            cut_wait: settings.bridge.retry_budget
                + 2 * settings.bridge.request_timeout
                + Duration::from_secs(10),
        }
    }
}
