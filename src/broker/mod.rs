//! Broker: the RabbitMQ boundary.
//!
//! In: settings. Out: connections, the declared topology, and a [`Publisher`] whose every
//! publish is mandatory, persistent and confirmed (an unroutable or nacked message is an
//! error, never a silent success).

mod publisher;
mod topology;

pub use publisher::{Outgoing, Publisher};
pub use topology::{declare, declare_audit, Topology};

use lapin::{Connection, ConnectionProperties};

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
}

impl BrokerError {
    /// Connection-level trouble (reconnect), as opposed to a message-level refusal.
    pub fn is_connection(&self) -> bool {
        matches!(self, BrokerError::Amqp(_))
    }
}

/// Opens a connection named `name` (shown in the broker's connection list).
pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Ok(Connection::connect(url, props).await?)
}
