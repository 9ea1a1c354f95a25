//! The broker's config sections: `[amqp]` (the nodes and how to reach them) and `[topology]`
//! (the names and shape of the exchanges and queues the poller declares).

use serde::Deserialize;
use std::time::Duration;

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    /// `amqp://user:password@host:port/vhost`: one broker node. Holds a password: never
    /// logged. Ignored when `urls` is set.
    #[serde(default)]
    pub url: String,
    /// The nodes of a cluster, tried in order (`POLLER__AMQP__URLS` takes them comma-separated).
    /// Every URL must name the same user. When set, `url` is ignored.
    #[serde(default)]
    pub urls: Vec<String>,
    /// Connection name shown in the broker's management tools.
    pub connection_name: String,
    /// Reconnect backoff bounds (`reconnect_min_ms`, `reconnect_max_ms`).
    #[serde(
        rename = "reconnect_min_ms",
        deserialize_with = "poller_core::clock::de::millis"
    )]
    pub reconnect_min: Duration,
    #[serde(
        rename = "reconnect_max_ms",
        deserialize_with = "poller_core::clock::de::millis"
    )]
    pub reconnect_max: Duration,
}

impl std::fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("url", &redact_url(&self.url))
            .field(
                "urls",
                &self.urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>(),
            )
            .field("connection_name", &self.connection_name)
            .finish_non_exhaustive()
    }
}

impl AmqpSettings {
    /// The broker nodes: `urls` when set, else `url`.
    pub fn endpoints(&self) -> Result<crate::broker::Endpoints, crate::broker::EndpointsError> {
        if self.urls.is_empty() {
            crate::broker::Endpoints::new([&self.url])
        } else {
            crate::broker::Endpoints::new(&self.urls)
        }
    }

    /// The endpoints of settings that were checked when they were loaded.
    pub fn checked_endpoints(&self) -> crate::broker::Endpoints {
        self.endpoints()
            .unwrap_or_else(|e| panic!("amqp settings were checked at load: {e}"))
    }
}

/// The user a broker URL connects as (percent-decoded; `guest` when it names none).
pub fn broker_user(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .map(|u| {
            percent_encoding::percent_decode_str(u.username())
                .decode_utf8_lossy()
                .into_owned()
        })
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "guest".into())
}

/// `amqp://user:***@host/vhost`: safe to log.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable url>".into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologySettings {
    /// Topic exchange agents publish commands to.
    pub commands_exchange: String,
    /// Durable quorum queue the poller consumes.
    pub commands_queue: String,
    /// Binding of the commands queue to the commands exchange.
    pub commands_binding: String,
    /// Fanout exchange dead letters go through (undecodable commands, delivery limit exceeded).
    pub dead_letter_exchange: String,
    /// Durable quorum queue holding dead letters for humans.
    pub dead_letter_queue: String,
    /// Deliveries of one command before the broker dead-letters it (x-delivery-limit).
    pub delivery_limit: u32,
    /// Most commands the queue holds (x-max-length); past it the broker refuses (nacks) the
    /// publish, so one agent's flood can't fill the broker's memory and block every publisher.
    pub max_length: u32,
    /// Most bytes of command bodies the queue holds (x-max-length-bytes), refused likewise.
    pub max_length_bytes: u64,
    /// Topic exchange for results, routing key `result.<status>`.
    pub results_exchange: String,
    /// Topic exchange for alerts, routing key `<team>.<priority>`.
    pub alerts_exchange: String,
    /// Durable queue bound to the results exchange with `result.#`, so results always have a
    /// home (publishes are mandatory: an unroutable result is a failure). Empty: declare none.
    pub results_queue: String,
    /// Teams whose alert queue `<alerts_exchange>.<team>` (bound `<team>.*`) the poller declares.
    pub alert_teams: Vec<String>,
    /// How the quorum queues and streams spread over a cluster (`[topology.replication]`).
    pub replication: Replication,
}

/// How each quorum queue and stream is spread over a RabbitMQ cluster when it is first declared.
/// Redeclaring an existing queue with other values is refused by the broker (an existing
/// queue keeps its members; grow it with `rabbitmq-queues grow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replication {
    /// Members of each quorum queue and stream (`x-quorum-initial-group-size`,
    /// `x-initial-cluster-size`); a cluster with fewer nodes gets one on each. Odd: a quorum
    /// queue of 3 survives the loss of 1 node, of 5 the loss of 2.
    pub initial_group_size: u8,
    /// Where each queue's leader goes (`x-queue-leader-locator`).
    pub leader_locator: LeaderLocator,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaderLocator {
    /// Spread over the nodes, so no node leads every queue.
    Balanced,
    /// The node the declaring client is connected to.
    ClientLocal,
}

impl LeaderLocator {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Balanced => "balanced",
            Self::ClientLocal => "client-local",
        }
    }
}
