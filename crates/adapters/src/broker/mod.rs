//! Broker: the RabbitMQ boundary.
//!
//! In: settings. Out: connections, the declared topology, and a [`Publisher`] whose every
//! publish is mandatory, persistent and confirmed (an unroutable or nacked message is an
//! error, never a silent success).

mod confirm;
mod endpoints;
mod nack;
pub mod names;
mod publisher;
pub mod settings;
mod topology;

pub use endpoints::{connect, Endpoints, EndpointsError, Node};
pub use nack::{after_nacks, with_id, with_nack_retries, NACK_RETRY_BUDGET};
pub use publisher::{Confirm, Outgoing, Publish, Publisher, CONFIRM_TIMEOUT};
pub use topology::{
    declare, declare_approvals, declare_audit, declare_control, declare_replica_control,
    declare_replica_queue, expect_exist, Topology,
};

use lapin::Connection;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("publish to {exchange:?} with key {routing_key:?} was returned as unroutable")]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    #[error("publish to {exchange:?} with key {routing_key:?} was nacked by the broker")]
    Nacked {
        exchange: String,
        routing_key: String,
    },
    #[error("publisher confirms are not enabled on this channel")]
    ConfirmsOff,
    #[error("broker: {0} took longer than {1:?}")]
    Timeout(&'static str, std::time::Duration),
    /// The session is no longer usable (a consumer cancelled by the broker, say).
    #[error("broker: {0}")]
    Lost(String),
    /// No node of a cluster answered: what each said (URLs with passwords masked).
    #[error("no broker node reachable: {0}")]
    Unreachable(String),
}

impl BrokerError {
    /// The broker refused an operation for lack of permission.
    pub fn is_access_refused(&self) -> bool {
        matches!(self, BrokerError::Amqp(e) if e.to_string().contains("ACCESS_REFUSED"))
    }

    /// Connection-level trouble (reconnect), as opposed to a message-level refusal.
    pub fn is_connection(&self) -> bool {
        matches!(
            self,
            BrokerError::Amqp(_)
                | BrokerError::Timeout(..)
                | BrokerError::Lost(_)
                | BrokerError::Unreachable(_)
        )
    }
}

/// How long opening a connection (TCP, TLS, AMQP handshake) may take before it counts as
/// failed: a broker half-way through a restart can accept a socket and never answer.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// How long closing a connection may take: a dead connection never answers close-ok.
pub const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Closes `conn`, giving up after [`CLOSE_TIMEOUT`] (the broker requeues whatever it had
/// delivered either way).
pub async fn close(conn: &Connection, why: &str) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, why.into())).await;
}

pub use settings::broker_user as user_of;

/// Consumes direct reply-to on `ch` (no-ack, as RabbitMQ requires); must start before the
/// request is published on the same channel.
pub async fn consume_direct_replies(ch: &lapin::Channel) -> Result<lapin::Consumer, BrokerError> {
    Ok(ch
        .basic_consume(
            names::DIRECT_REPLY_TO.into(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_user_of_a_url_is_decoded_and_defaults_to_guest() {
        assert_eq!(
            super::user_of("amqp://ops%40corp:pw@h:5672/%2f"),
            "ops@corp"
        );
        assert_eq!(super::user_of("amqp://h:5672"), "guest");
        assert_eq!(super::user_of("not a url"), "guest");
    }
}
