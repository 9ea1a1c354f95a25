//! Audit's shell: publishing the core's records ([`poller_core::audit`], re-exported here)
//! confirmed before the command is acked; [`chain`] appends them to a hash-chained JSON-lines
//! file that can be verified and queried; [`sink`] is the consumer that does so.

pub mod chain;
pub mod incident;
pub mod sink;

use poller_core::audit::{AuditOutcome, AuditRecord};

/// Publishes an audit record without letting a refusal hold back what it records: results and
/// alerts are already out when this runs, and the command is acked whatever the audit exchange
/// says. A refused record is tried once more, then dead-lettered on its own; only a lost
/// connection is an error (the session restarts and the command is redelivered).
pub async fn publish_record(
    publisher: &dyn crate::broker::Publish,
    exchange: &str,
    routing_key: &str,
    dead_letter_exchange: &str,
    record: &AuditRecord,
    user: &str,
) -> Result<AuditOutcome, crate::broker::BrokerError> {
    let msg = record_message(exchange, routing_key, record, user);
    let first = publisher.publish(&msg).await;
    settle_record(publisher, msg, first, dead_letter_exchange).await
}

/// The message that carries `record` to the audit exchange.
pub fn record_message(
    exchange: &str,
    routing_key: &str,
    record: &AuditRecord,
    user: &str,
) -> crate::broker::Outgoing {
    crate::broker::Outgoing {
        exchange: exchange.to_owned(),
        routing_key: routing_key.to_owned(),
        body: serde_json::to_vec(record).expect("audit record serializes"),
        correlation_id: record.action_id.as_ref().map(ToString::to_string),
        message_type: crate::broker::names::message_type::AUDIT,
        // Broker-checked: the sink accepts records from the poller's user only.
        user_id: Some(user.to_owned()),
        ..Default::default()
    }
}

/// What became of the audit record `msg` after its first publish ended with `first`: delivered;
/// or, refused, tried once more and then dead-lettered on its own (or only logged when even
/// that is refused). Only a lost connection is an error.
pub async fn settle_record(
    publisher: &dyn crate::broker::Publish,
    msg: crate::broker::Outgoing,
    first: Result<(), crate::broker::BrokerError>,
    dead_letter_exchange: &str,
) -> Result<AuditOutcome, crate::broker::BrokerError> {
    use crate::broker::Outgoing;
    let last = match first {
        Ok(()) => return Ok(AuditOutcome::Delivered),
        Err(e) if e.is_connection() => return Err(e),
        Err(_) => {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            match publisher.publish(&msg).await {
                Ok(()) => return Ok(AuditOutcome::Delivered),
                Err(e) if e.is_connection() => return Err(e),
                Err(e) => e,
            }
        }
    };
    let exchange = &msg.exchange;
    tracing::error!(error = %last, "audit record refused twice; dead-lettering it on its own");
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        crate::broker::names::header::REASON.into(),
        crate::broker::names::text(&format!("audit record not accepted by {exchange}: {last}")),
    );
    let dead = Outgoing {
        exchange: dead_letter_exchange.to_owned(),
        headers: Some(headers),
        ..msg
    };
    match publisher.publish(&dead).await {
        Ok(()) => Ok(AuditOutcome::DeadLettered),
        Err(e) if e.is_connection() => Err(e),
        Err(e) => {
            tracing::error!(error = %e, record = %String::from_utf8_lossy(&dead.body), "audit record could not be dead-lettered either; here it is");
            Ok(AuditOutcome::Logged)
        }
    }
}
