//! Confirmed publishing. Every message is mandatory and persistent, and each has its own confirm:
//! `Ack(None)` is the only success. [`Publish::send`] sends one and hands back the wait for its
//! confirm, so a command's messages go out together and their confirms are awaited after.

use super::BrokerError;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection};
use std::time::Duration;

/// One message to publish.
#[derive(Debug, Clone, Default)]
pub struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub correlation_id: Option<String>,
    pub message_type: &'static str,
    pub headers: Option<FieldTable>,
    /// Must equal the connection's user (the broker checks it).
    pub user_id: Option<String>,
    /// Not `mandatory`: for direct reply-to, which RabbitMQ returns as unroutable even when it
    /// delivered it (so a return would be a false failure); everything else is mandatory.
    pub best_effort: bool,
    pub reply_to: Option<String>,
    /// The message_id to send; a fresh one when `None`. A message published again after a nack
    /// keeps its first id, so consumers that got the first copy (the nack came from another
    /// queue it was routed to) see a repeat, not a second message.
    pub message_id: Option<String>,
}

/// How long a publish waits for the broker's confirm. Longer than a cluster takes to notice a
/// lost node and elect new leaders (RabbitMQ's default net_ticktime is 60 s, noticed within
/// 45 to 75 s), but bounded: each reconnect costs every unacked command one delivery.
pub(crate) const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

/// A confirm-mode channel on its own connection, so broker flow control on publishing can't
/// hold back the consumer's acks.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    pub async fn open(conn: &Connection) -> Result<Self, BrokerError> {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes `msg` and waits for its confirm.
    pub async fn publish(&self, msg: &Outgoing) -> Result<(), BrokerError> {
        self.send(msg).await?.await
    }

    /// Sends `msg` without waiting for its confirm: the returned [`Confirm`] is that wait, so
    /// several messages can be sent before any of their confirms is awaited.
    pub async fn send(&self, msg: &Outgoing) -> Result<Confirm, BrokerError> {
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(
                msg.message_id
                    .clone()
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
                    .into(),
            )
            .with_type(msg.message_type.into())
            .with_timestamp(time::OffsetDateTime::now_utc().unix_timestamp() as u64);
        if let Some(c) = &msg.correlation_id {
            props = props.with_correlation_id(c.as_str().into());
        }
        if let Some(h) = &msg.headers {
            props = props.with_headers(h.clone());
        }
        if let Some(u) = &msg.user_id {
            props = props.with_user_id(u.as_str().into());
        }
        if let Some(r) = &msg.reply_to {
            props = props.with_reply_to(r.as_str().into());
        }
        let confirm = self
            .channel
            .basic_publish(
                msg.exchange.as_str().into(),
                msg.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: !msg.best_effort,
                    ..Default::default()
                },
                &msg.body,
                props,
            )
            .await?;
        let (exchange, routing_key) = (msg.exchange.clone(), msg.routing_key.clone());
        Ok(Box::pin(async move {
            // A confirm that never comes (a cluster whose queue leader is cut off, before the
            // election) would hold this command, and its delivery, forever: past the deadline
            // the session counts as lost, and the outcome goes out on the next one (another
            // node).
            let confirm = match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
                Ok(c) => c?,
                Err(_) => {
                    return Err(BrokerError::Timeout(
                        "waiting for the broker's publish confirm",
                        CONFIRM_TIMEOUT,
                    ))
                }
            };
            match confirm {
                Confirmation::Ack(None) => Ok(()),
                Confirmation::Ack(Some(_)) => Err(BrokerError::Unroutable {
                    exchange,
                    routing_key,
                }),
                Confirmation::Nack(_) => Err(BrokerError::Nacked {
                    exchange,
                    routing_key,
                }),
                Confirmation::NotRequested => Err(BrokerError::ConfirmsOff),
            }
        }))
    }
}

/// The broker's confirm of a message sent with [`Publish::send`]: `Ok` when it took it
/// (routed, and stored where it was routed).
pub type Confirm = futures::future::BoxFuture<'static, Result<(), BrokerError>>;

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

/// The boundary for publishing: the confirmed [`Publisher`], or a test double that records.
pub trait Publish: Send + Sync {
    /// Sends `msg`; the [`Confirm`] is the wait for the broker's confirm. An `Err` here: it
    /// could not be sent (the channel or connection is gone).
    fn send<'a>(
        &'a self,
        msg: &'a Outgoing,
    ) -> futures::future::BoxFuture<'a, Result<Confirm, BrokerError>>;

    /// Sends `msg` and waits for its confirm.
    fn publish<'a>(
        &'a self,
        msg: &'a Outgoing,
    ) -> futures::future::BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move { self.send(msg).await?.await })
    }
}

impl Publish for Publisher {
    fn send<'a>(
        &'a self,
        msg: &'a Outgoing,
    ) -> futures::future::BoxFuture<'a, Result<Confirm, BrokerError>> {
        Box::pin(Publisher::send(self, msg))
    }
}
