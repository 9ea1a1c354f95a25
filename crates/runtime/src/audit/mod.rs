//! Audit's shell: publishing the core's records ([`poller_core::audit`], re-exported here)
//! confirmed before the command is acked; [`chain`] appends them to a hash-chained JSON-lines
//! file that can be verified and queried; [`sink`] is the consumer that does so.

pub mod chain;
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
    use crate::broker::Outgoing;
    let body = serde_json::to_vec(record).expect("audit record serializes");
    let msg = Outgoing {
        exchange: exchange.to_owned(),
        routing_key: routing_key.to_owned(),
        body: body.clone(),
        correlation_id: record.action_id.as_ref().map(ToString::to_string),
        message_type: crate::broker::names::message_type::AUDIT,
        // Broker-checked: the sink accepts records from the poller's user only.
        user_id: Some(user.to_owned()),
        ..Default::default()
    };
    let mut tries = 0;
    let last = loop {
        tries += 1;
        match publisher.publish(&msg).await {
            Ok(()) => return Ok(AuditOutcome::Delivered),
            Err(e) if e.is_connection() => return Err(e),
            Err(e) if tries >= 2 => break e,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    };
    tracing::error!(error = %last, "audit record refused twice; dead-lettering it on its own");
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        crate::broker::names::header::REASON.into(),
        crate::broker::names::text(&format!("audit record not accepted by {exchange}: {last}")),
    );
    let dead = Outgoing {
        exchange: dead_letter_exchange.to_owned(),
        routing_key: routing_key.to_owned(),
        headers: Some(headers),
        ..msg
    };
    match publisher.publish(&dead).await {
        Ok(()) => Ok(AuditOutcome::DeadLettered),
        Err(e) if e.is_connection() => Err(e),
        Err(e) => {
            tracing::error!(error = %e, record = %String::from_utf8_lossy(&body), "audit record could not be dead-lettered either; here it is");
            Ok(AuditOutcome::Logged)
        }
    }
}
