//! Publishing again what the broker nacks: a quorum queue nacks what it can't take now (no
//! leader while a cluster elects one, full under reject-publish). In: a message and its first
//! try's answer. Out: the answer of the last try, within a budget, every copy with one
//! message_id.

use super::{BrokerError, Outgoing, Publish};
use std::time::Duration;

/// How long a message the broker nacks is published again on the same session (a command's
/// result and alerts) before its command is requeued. A quorum queue nacks what it can't take
/// now (no leader while a cluster elects one, full under reject-publish); a requeue would spend
/// one of the command's deliveries on each nack, and a few seconds of them dead-lettered
/// commands that had run.
pub const NACK_RETRY_BUDGET: Duration = Duration::from_secs(30);
/// The first pause between tries after a nack; doubled each time, up to [`NACK_RETRY_MAX`].
const NACK_RETRY_FIRST: Duration = Duration::from_millis(100);
const NACK_RETRY_MAX: Duration = Duration::from_secs(2);

/// Publishes `msg`, publishing it again while the broker nacks it, within `budget`. The copies
/// share one message_id. Anything but a nack ends it at once.
pub async fn with_nack_retries(
    publisher: &dyn Publish,
    msg: &Outgoing,
    budget: Duration,
) -> Result<(), BrokerError> {
    let msg = with_id(msg);
    let first = publisher.publish(&msg).await;
    after_nacks(publisher, &msg, first, budget).await
}

/// `msg` with its message_id chosen, before its first try: a nack from one queue the message was
/// routed to doesn't undo its delivery to the others, so every copy carries the same id.
pub fn with_id(msg: &Outgoing) -> std::borrow::Cow<'_, Outgoing> {
    match msg.message_id {
        Some(_) => std::borrow::Cow::Borrowed(msg),
        None => std::borrow::Cow::Owned(Outgoing {
            message_id: Some(uuid::Uuid::new_v4().to_string()),
            ..msg.clone()
        }),
    }
}

/// After the first try of `msg` (sent with its id chosen, [`with_id`]) ended with `first`: a
/// nack publishes it again, with growing pauses, while the broker keeps nacking and `budget`
/// (from now) allows. Anything but a nack ends it at once.
pub async fn after_nacks(
    publisher: &dyn Publish,
    msg: &Outgoing,
    first: Result<(), BrokerError>,
    budget: Duration,
) -> Result<(), BrokerError> {
    match first {
        Err(BrokerError::Nacked { .. }) => {}
        other => return other,
    }
    let deadline = tokio::time::Instant::now() + budget;
    let mut pause = NACK_RETRY_FIRST;
    let mut tries = 1u32;
    loop {
        if tokio::time::Instant::now() + pause > deadline {
            tracing::warn!(tries, exchange = %msg.exchange, routing_key = %msg.routing_key, "the broker kept nacking the publish; giving up on this session");
            return Err(BrokerError::Nacked {
                exchange: msg.exchange.clone(),
                routing_key: msg.routing_key.clone(),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(NACK_RETRY_MAX);
        tries += 1;
        match publisher.publish(msg).await {
            Err(BrokerError::Nacked { .. }) => {
                tracing::info!(tries, routing_key = %msg.routing_key, "publish nacked by the broker; trying again");
            }
            other => return other,
        }
    }
}
