//! Confirmed publishing. Every message is mandatory and persistent, and each has its own confirm:
//! `Ack(None)` is the only success. [`Publish::send`] sends one and hands back the wait for its
//! confirm, so a command's messages go out together and their confirms are awaited after.
//! Each batch of messages in flight has a channel to itself ([`Publisher`]), taken as a
//! [`Lease`] and handed back when its confirms are in.

use super::confirm::{copy, settle, waiting, Sent};
use super::BrokerError;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

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

/// The most channels a shared publisher keeps open, so the most batches it has in flight at
/// once; more wait for one to be handed back. The client looks at every channel of a
/// connection for each frame it writes, so each channel costs CPU on every publish.
pub(crate) const MAX_CHANNELS: usize = 32;

/// How long a publish waits for the broker's confirm. Longer than a cluster takes to notice a
/// lost node and elect new leaders (RabbitMQ's default net_ticktime is 60 s, noticed within
/// 45 to 75 s), but bounded: each reconnect costs every unacked command one delivery.
pub const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

/// Confirm-mode channels, each carrying one batch at a time (a command's result, reply, alerts
/// and audit record). AMQP's `basic.return` names no delivery tag and the broker acks several
/// messages with one frame; the client hands a return to whichever pending confirm of that
/// frame it settles first, so on a channel shared by messages waited for apart, a returned
/// message reads as another's. A channel of its own makes every return on it the batch's, and
/// once all the batch's confirms are in, every return has arrived (each precedes its own
/// message's ack): matched by `message_id`, each is its own message's.
#[derive(Clone)]
pub struct Publisher {
    pool: Arc<Pool>,
}

struct Pool {
    /// The channel opened first: the one a direct reply-to consumer shares, so the one a
    /// message with `reply_to` goes out on.
    first: Channel,
    idle: Mutex<Vec<Channel>>,
    returned: Notify,
    /// Where more channels come from when all are busy; `None`: one channel, taken in turn.
    conn: Option<Arc<Connection>>,
    /// Channels ever opened (the first included).
    opened: AtomicUsize,
    /// Channels open now, idle or leased: at most [`MAX_CHANNELS`].
    live: AtomicUsize,
    /// The first channel was taken out of use ([`Lease`]'s drop).
    first_lost: AtomicBool,
    /// How long a confirm may take ([`CONFIRM_TIMEOUT`]).
    confirm_timeout: Duration,
}

impl Publisher {
    /// One confirm-mode channel, its messages published one at a time: for a tool that sends
    /// one request and reads its reply on [`Publisher::channel`].
    pub async fn open(conn: &Connection) -> Result<Self, BrokerError> {
        let channel = confirm_channel(conn).await?;
        Ok(Self::with(channel, None))
    }

    /// Confirm-mode channels on `conn` (a connection of its own, so broker flow control on
    /// publishing can't hold back the consumer's acks), opened as messages in flight at once
    /// need them and kept for the next.
    pub async fn open_shared(conn: Arc<Connection>) -> Result<Self, BrokerError> {
        let channel = confirm_channel(&conn).await?;
        Ok(Self::with(channel, Some(conn)))
    }

    fn with(channel: Channel, conn: Option<Arc<Connection>>) -> Self {
        Self {
            pool: Arc::new(Pool {
                first: channel.clone(),
                idle: Mutex::new(vec![channel]),
                returned: Notify::new(),
                conn,
                opened: AtomicUsize::new(1),
                live: AtomicUsize::new(1),
                first_lost: AtomicBool::new(false),
                confirm_timeout: CONFIRM_TIMEOUT,
            }),
        }
    }

    /// The first channel: direct replies to what this publisher sends with `reply_to` are
    /// consumed on it.
    pub fn channel(&self) -> &Channel {
        &self.pool.first
    }

    /// This publisher, its confirms waited for `deadline` instead of [`CONFIRM_TIMEOUT`]
    /// (before its first send).
    pub fn with_confirm_timeout(mut self, deadline: Duration) -> Self {
        if let Some(pool) = Arc::get_mut(&mut self.pool) {
            pool.confirm_timeout = deadline;
        }
        self
    }

    /// How many channels this publisher has opened (one whose confirm timed out is replaced).
    pub fn channels_opened(&self) -> usize {
        self.pool.opened.load(Ordering::Relaxed)
    }

    /// Publishes `msg` and waits for its confirm.
    pub async fn publish(&self, msg: &Outgoing) -> Result<(), BrokerError> {
        self.send(msg).await?.await
    }

    /// Sends `msg` without waiting for its confirm: the returned [`Confirm`] is that wait, so
    /// several messages can be sent before any of their confirms is awaited. The message has
    /// its channel to itself until then.
    pub async fn send(&self, msg: &Outgoing) -> Result<Confirm, BrokerError> {
        self.send_all(&[msg])
            .await
            .pop()
            .expect("one confirm per message")
    }

    /// Sends `msgs` together on a channel of their own, one [`Confirm`] each, in order. Their
    /// confirms are waited for together: once all are in, every message the broker returned
    /// has come back (a return precedes its message's ack) on one of them, and each is matched
    /// to its message by `message_id`. A batch whose confirms don't all come by the deadline
    /// is a timeout for every message of it: which were returned is not known.
    pub async fn send_all(&self, msgs: &[&Outgoing]) -> Vec<Result<Confirm, BrokerError>> {
        let lease = match self.lease(msgs.iter().any(|m| m.reply_to.is_some())).await {
            Ok(lease) => lease,
            Err(e) => return msgs.iter().map(|_| Err(copy(&e))).collect(),
        };
        let mut out = Vec::with_capacity(msgs.len());
        let mut sent = Vec::with_capacity(msgs.len());
        let mut broken = None;
        for msg in msgs {
            if let Some(e) = &broken {
                out.push(Err(copy(e)));
                continue;
            }
            let message_id = msg
                .message_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let published = lease
                .channel()
                .basic_publish(
                    msg.exchange.as_str().into(),
                    msg.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: !msg.best_effort,
                        ..Default::default()
                    },
                    &msg.body,
                    properties(msg, &message_id),
                )
                .await;
            match published {
                Ok(confirm) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let to = (msg.exchange.clone(), msg.routing_key.clone());
                    sent.push(Sent {
                        message_id,
                        to,
                        confirm,
                        answer: tx,
                    });
                    out.push(Ok(waiting(rx)));
                }
                Err(e) => {
                    let e = BrokerError::from(e);
                    out.push(Err(copy(&e)));
                    broken = Some(e);
                }
            }
        }
        // Waited for here, not by the caller: the channel is free for the next batch as soon
        // as the broker has answered this one, whenever (or whether) the caller looks.
        let deadline = self.pool.confirm_timeout;
        let whole = broken.is_none();
        tokio::spawn(settle(sent, deadline, lease, whole));
        out
    }

    /// A channel with nothing in flight: the first for `reply_to`, else any idle one, else a
    /// new one (a shared publisher), else the next handed back.
    async fn lease(&self, first: bool) -> Result<Lease, BrokerError> {
        let pool = &self.pool;
        loop {
            let handed_back = pool.returned.notified();
            if let Some(channel) = pool.take_idle(first) {
                return Ok(Lease::new(pool, channel));
            }
            let only_first = first || pool.conn.is_none();
            let first_gone = pool.first_lost.load(Ordering::SeqCst)
                || (pool.conn.is_some() && !pool.first.status().connected());
            if only_first && first_gone {
                return Err(BrokerError::Lost(
                    "the publishing channel was taken out of use: a publish on it failed or its confirm timed out".into(),
                ));
            }
            if let (Some(conn), false) = (&pool.conn, first) {
                let room = pool
                    .live
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                        (n < MAX_CHANNELS).then_some(n + 1)
                    })
                    .is_ok();
                if room {
                    let channel = match confirm_channel(conn).await {
                        Ok(c) => c,
                        Err(e) => {
                            pool.live.fetch_sub(1, Ordering::SeqCst);
                            return Err(e);
                        }
                    };
                    let n = pool.opened.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::debug!(channels = n, "opened another publishing channel");
                    return Ok(Lease::new(pool, channel));
                }
            }
            handed_back.await;
        }
    }
}

impl Pool {
    fn take_idle(&self, first: bool) -> Option<Channel> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let at = match first {
                true => idle.iter().position(|c| c.id() == self.first.id())?,
                false => idle.len().checked_sub(1)?,
            };
            let channel = idle.swap_remove(at);
            // A closed channel (the broker closes one on a publish to a missing exchange)
            // goes, but for a publisher of one channel: a publish on it then fails, as it
            // should.
            if self.conn.is_none() || channel.status().connected() {
                return Some(channel);
            }
            self.live.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn hand_back(&self, channel: Channel) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(channel);
        self.returned.notify_waiters();
    }
}

/// A channel taken for one message. [`Lease::finish`] once its confirm is in hands it back; a
/// lease dropped before that (the publish failed, or its confirm timed out) takes the channel
/// out of use, since a late confirm or return on it would be read as the next message's. A
/// publisher of one channel can't do without it: a later send fails.
pub(super) struct Lease {
    pool: Arc<Pool>,
    channel: Option<Channel>,
    finished: bool,
}

impl Lease {
    fn new(pool: &Arc<Pool>, channel: Channel) -> Self {
        Self {
            pool: pool.clone(),
            channel: Some(channel),
            finished: false,
        }
    }

    fn channel(&self) -> &Channel {
        self.channel.as_ref().expect("held until dropped")
    }

    pub(super) fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(channel) = self.channel.take() else {
            return;
        };
        if self.finished {
            self.pool.hand_back(channel);
            return;
        }
        if channel.id() == self.pool.first.id() {
            self.pool.first_lost.store(true, Ordering::SeqCst);
        }
        self.pool.live.fetch_sub(1, Ordering::SeqCst);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = channel
                    .close(200, "a confirm that did not come".into())
                    .await;
            });
        }
        // Whoever waits for this channel must not wait forever.
        self.pool.returned.notify_waiters();
    }
}

async fn confirm_channel(conn: &Connection) -> Result<Channel, BrokerError> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

fn properties(msg: &Outgoing, message_id: &str) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message_id.into())
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
    props
}
/// The broker's confirm of a message sent with [`Publish::send`]: `Ok` when it took it
/// (routed, and stored where it was routed).
pub type Confirm = futures::future::BoxFuture<'static, Result<(), BrokerError>>;

/// The boundary for publishing: the confirmed [`Publisher`], or a test double that records.
pub trait Publish: Send + Sync {
    /// Sends `msg`; the [`Confirm`] is the wait for the broker's confirm. An `Err` here: it
    /// could not be sent (the channel or connection is gone).
    fn send<'a>(
        &'a self,
        msg: &'a Outgoing,
    ) -> futures::future::BoxFuture<'a, Result<Confirm, BrokerError>>;

    /// Sends `msgs` together, one [`Confirm`] each, in order.
    fn send_all<'a>(
        &'a self,
        msgs: &'a [&'a Outgoing],
    ) -> futures::future::BoxFuture<'a, Vec<Result<Confirm, BrokerError>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(msgs.len());
            for msg in msgs {
                out.push(self.send(msg).await);
            }
            out
        })
    }

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

    fn send_all<'a>(
        &'a self,
        msgs: &'a [&'a Outgoing],
    ) -> futures::future::BoxFuture<'a, Vec<Result<Confirm, BrokerError>>> {
        Box::pin(Publisher::send_all(self, msgs))
    }
}
