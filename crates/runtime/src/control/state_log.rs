//! The stored control state: a log of changes in a RabbitMQ stream, each entry carrying the
//! whole state after it, folded from the latest entry a reader can anchor.
//!
//! In: entries (an [`Entry`]: one [`Change`], the offset of the last entry its writer had read,
//! and the whole state after the change), published through the state exchange with the
//! writer's broker-checked `user_id`. Out: the state every replica and operator agrees on
//! ([`Folded`]), and what replicas enforce when it can't be trusted ([`Folded::effective`]).
//!
//! Why a stream: reading it takes nothing off it, so no reader (a replica starting, an operator,
//! someone holding messages unacked on purpose) can make the state look empty to another.
//!
//! **A read appends nothing.** A reader subscribes from the stream's last chunk and makes one
//! round trip on the same channel: the broker sends what it has before it answers, so what
//! arrived by then is everything stored (an empty stream sends nothing). It repeats the round
//! trip until one brings nothing new.
//!
//! The fold itself is the core's ([`poller_core::control::fold`], re-exported here): this reads
//! the stream and writes to it.
//!
//! **A fold starts from a snapshot.** Every entry carries the whole state after it, so the
//! fold starts at the latest *anchored* entry: written by an operator, and naming (`after`)
//! the entry just before it, so its writer had read everything before it. From there each
//! later entry is applied as a change, with compare-and-set: a mode change decided on the
//! current sequence applies; one decided on an older sequence lost a race and applies only if
//! it is stricter (a halt always wins; a pause never overwrites a halt; a resume never
//! overwrites what it didn't see). The poller's own user may only pause a running system and
//! quarantine. When the last chunk holds no anchor, the reader reads again from the earliest
//! entry it names, then from the stream's first entry. Old entries dropped by retention cost
//! nothing: only the latest snapshot matters. A stream whose remaining entries hold no anchor
//! is untrusted, never "a new system".
//!
//! **An untrusted entry never loosens anything.** An entry that can't be read, or written by a
//! user who is neither an operator nor the poller, makes the state [`Folded::Untrusted`]: the
//! fleet keeps the last trusted state made stricter (at least PAUSED; a halt and every
//! quarantine kept) until an operator decides on that stricter state.
//!
//! [`StateReader`] reads; [`write`] appends.

pub use poller_core::control::fold::*;

use crate::broker::names::{message_type, text};
use crate::broker::{BrokerError, Outgoing, Publisher};
use futures::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;
use poller_core::control::ControlSettings;
use poller_core::control::ControlState;
use std::time::Duration;

/// How long a read (every pass of it) may take before it counts as unreadable.
pub const READ_DEADLINE: Duration = Duration::from_secs(10);
/// How long a reader waits for a stream's first delivery before it takes the stream for empty
/// (the broker starts sending only once the stream's writer answers it).
pub const EMPTY_GRACE: Duration = Duration::from_secs(1);
/// Deliveries a reader takes per round trip; a round that fills it reads on.
const PREFETCH: u16 = 500;
/// Passes a read makes looking for an anchor (the last chunk, the earliest entry it names, the
/// stream's first entry) before it gives up on the stored state as untrusted.
const MAX_PASSES: usize = 4;
/// Entries one pass may read. Only an attack writes that many changes: untrusted beyond it.
const MAX_RECORDS: usize = 20_000;

/// The `x-stream-offset` a pass starting at `from` subscribes with.
fn stream_offset(from: ReadFrom) -> AMQPValue {
    match from {
        ReadFrom::Last => text("last"),
        ReadFrom::First => text("first"),
        ReadFrom::Offset(o) => AMQPValue::LongLongInt(o as i64),
    }
}

/// Appends one entry (persistent, confirmed) as `user`, who must be the publishing
/// connection's user. `after` is the offset of the last entry the writer read
/// ([`StateReader::position`]), `state` the whole state after `change`.
pub async fn write(
    publisher: &Publisher,
    c: &ControlSettings,
    after: Option<u64>,
    change: Change,
    state: &ControlState,
    user: &str,
) -> Result<(), BrokerError> {
    publisher
        .publish(&render(c, after, change, state, user))
        .await
}

/// The message of one entry.
pub fn render(
    c: &ControlSettings,
    after: Option<u64>,
    change: Change,
    state: &ControlState,
    user: &str,
) -> Outgoing {
    let entry = Entry {
        after,
        change,
        state: state.clone(),
    };
    Outgoing {
        exchange: c.state_exchange.clone(),
        routing_key: String::new(),
        body: serde_json::to_vec(&entry).expect("serializes"),
        message_type: message_type::CONTROL_STATE,
        user_id: Some(user.to_owned()),
        ..Default::default()
    }
}

/// Tells who wrote an entry from its `user_id`.
pub type Classify = Box<dyn Fn(Option<&str>) -> Writer + Send + Sync>;

/// A reader of the state stream: the fold at open, then (for replicas) every entry that
/// follows, as it arrives.
pub struct StateReader {
    channel: Channel,
    queue: String,
    consumer: lapin::Consumer,
    classify: Classify,
    current: Folded,
    /// The offset of the last entry read.
    position: Option<u64>,
    /// What an empty stream folds to.
    empty: poller_core::control::EmptyStream,
    /// The stream sent nothing within the grace: an entry that then arrives and isn't the
    /// stream's first means it wasn't empty, and the stream is read again.
    assumed_empty: bool,
    /// That re-read is due (set before it starts, cleared when it is done).
    reread: bool,
    /// The state [`StateReader::changed`] returned last (or the one read at open).
    reported: Folded,
    /// How many people a loosening lever needs (`control.loosening_approvals`).
    rules: poller_core::control::loosening::Rules,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the state stream did not answer within {0:?}")]
    Deadline(Duration),
    #[error("the state stream consumer ended")]
    Ended,
    #[error("the state stream holds more than {MAX_RECORDS} entries since its last snapshot")]
    TooLong,
}

impl From<lapin::Error> for ReadError {
    fn from(e: lapin::Error) -> Self {
        ReadError::Broker(e.into())
    }
}

/// The offset a stream delivery carries.
fn offset_of(d: &lapin::message::Delivery) -> Option<u64> {
    let headers = d.properties.headers().as_ref()?;
    match headers.inner().get("x-stream-offset")? {
        AMQPValue::LongLongInt(o) => u64::try_from(*o).ok(),
        AMQPValue::LongUInt(o) => Some(u64::from(*o)),
        AMQPValue::LongInt(o) => u64::try_from(*o).ok(),
        AMQPValue::Timestamp(o) => Some(*o),
        _ => None,
    }
}

impl StateReader {
    /// Reads the stored state on `ch` (used for this reader alone) without writing anything:
    /// the last chunk, then earlier entries until an anchor is found. A stream that sends
    /// nothing within [`EMPTY_GRACE`] is empty, and folds as `control.empty_stream` says.
    pub async fn open(
        ch: &Channel,
        c: &ControlSettings,
        classify: impl Fn(Option<&str>) -> Writer + Send + Sync + 'static,
    ) -> Result<Self, ReadError> {
        let mut reader = Self {
            channel: ch.clone(),
            queue: c.state_queue.clone(),
            consumer: Self::subscribe(ch, &c.state_queue, Self::start(c.rules())).await?,
            classify: Box::new(classify),
            current: Folded::Empty,
            position: None,
            empty: c.empty_stream,
            assumed_empty: false,
            reread: false,
            reported: Folded::Empty,
            rules: c.rules(),
        };
        reader.read(true).await?;
        reader.reported = reader.current.clone();
        Ok(reader)
    }

    /// Where a read starts: the last chunk, and earlier entries only until an anchor is found;
    /// with two people to loosen, the stream's first entry kept, so every anchor but the oldest
    /// is checked against what came before it (a lone operator's loosening snapshot written as
    /// the latest entry is then caught by a reader that starts fresh, not only by the replicas
    /// following the stream). The cost then grows with the entries kept (a lever is rare).
    fn start(rules: poller_core::control::loosening::Rules) -> ReadFrom {
        if rules.two_people() {
            ReadFrom::First
        } else {
            ReadFrom::Last
        }
    }

    /// The passes of a read; the consumer is already subscribed where [`Self::start`] says.
    async fn read(&mut self, first_may_be_empty: bool) -> Result<(), ReadError> {
        let mut from = Self::start(self.rules);
        for pass in 0..MAX_PASSES {
            if pass > 0 {
                self.resubscribe(from).await?;
            }
            let grace = if pass == 0 && first_may_be_empty {
                EMPTY_GRACE
            } else {
                READ_DEADLINE
            };
            let records = self.drain(grace).await?;
            self.position = records.last().map(|r| r.offset);
            if records.is_empty() {
                self.current = empty(self.empty);
                self.assumed_empty = true;
                return Ok(());
            }
            self.assumed_empty = false;
            if let Some(folded) = fold_records_by(&records, from, self.rules) {
                self.current = folded;
                return Ok(());
            }
            match walk_back(&records, from) {
                Some(earlier) if pass + 1 < MAX_PASSES => from = earlier,
                _ => {
                    self.current = Folded::Untrusted {
                        last: best_guess(&records),
                        why: "no snapshot to start from: the stream's remaining entries hold no entry an operator anchored (written by another version, or its start dropped)".into(),
                    };
                    return Ok(());
                }
            }
        }
        unreachable!("the last pass returns")
    }

    async fn subscribe(
        ch: &Channel,
        queue: &str,
        from: ReadFrom,
    ) -> Result<lapin::Consumer, ReadError> {
        ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
        let mut args = FieldTable::default();
        args.insert("x-stream-offset".into(), stream_offset(from));
        Ok(ch
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await?)
    }

    /// Cancels the current consumer and reads again from `from`.
    async fn resubscribe(&mut self, from: ReadFrom) -> Result<(), ReadError> {
        self.channel
            .basic_cancel(self.consumer.tag().as_str().into(), Default::default())
            .await?;
        self.consumer = Self::subscribe(&self.channel, &self.queue, from).await?;
        Ok(())
    }

    /// Everything the stream holds from this consumer's start. The broker reads a stream for a
    /// new consumer only once its writer answers, so the first delivery is waited for (up to
    /// `first`: nothing by then is an empty stream); from then on it sends what it has before
    /// it answers a round trip on the channel, so round trips repeat until one brings nothing.
    async fn drain(&mut self, first: Duration) -> Result<Vec<Record>, ReadError> {
        let mut records = Vec::new();
        match tokio::time::timeout(first, self.consumer.next()).await {
            Err(_) => return Ok(records),
            Ok(None) => return Err(ReadError::Ended),
            Ok(Some(d)) => {
                let d = d?;
                records.push(self.record(&d));
                let _ = d.acker.ack(BasicAckOptions::default()).await;
            }
        }
        let read = async {
            loop {
                self.channel
                    .basic_qos(PREFETCH, BasicQosOptions::default())
                    .await?;
                let before = records.len();
                while let Some(next) = self.consumer.next().now_or_never() {
                    let d = next.ok_or(ReadError::Ended)??;
                    records.push(self.record(&d));
                    let _ = d.acker.ack(BasicAckOptions::default()).await;
                    if records.len() > MAX_RECORDS {
                        return Err(ReadError::TooLong);
                    }
                }
                if records.len() == before {
                    return Ok(());
                }
            }
        };
        tokio::time::timeout(READ_DEADLINE, read)
            .await
            .map_err(|_| ReadError::Deadline(READ_DEADLINE))??;
        Ok(records)
    }

    fn record(&self, d: &lapin::message::Delivery) -> Record {
        Record {
            // A delivery without an offset can't be placed: it anchors nothing.
            offset: offset_of(d).unwrap_or(u64::MAX),
            writer: (self.classify)(d.properties.user_id().as_ref().map(|u| u.as_str())),
            body: d.data.clone(),
            user: d.properties.user_id().as_ref().map(|u| u.to_string()),
        }
    }

    /// The state folded so far.
    pub fn state(&self) -> &Folded {
        &self.current
    }

    /// The offset of the last entry read: a writer's `after`.
    pub fn position(&self) -> Option<u64> {
        self.position
    }

    /// Waits for the next entry and folds it in; returns the state when it changed since it was
    /// last returned (or read at open).
    ///
    /// Cancel-safe: a replica waits on this in a `select!` beside its levers, and a lever that
    /// wins the race drops the wait. An entry taken off the consumer is folded before anything
    /// else is awaited, and a change not yet returned is returned by the next call.
    pub async fn changed(&mut self) -> Result<Folded, ReadError> {
        loop {
            if self.reread {
                // Not the stream's first entry: it was not empty, only slow. Read it properly
                // (again, if a dropped wait left this half done).
                self.resubscribe(Self::start(self.rules)).await?;
                self.read(false).await?;
                self.reread = false;
            }
            if self.current != self.reported {
                self.reported = self.current.clone();
                return Ok(self.current.clone());
            }
            let d = match self.consumer.next().await {
                Some(d) => d?,
                None => return Err(ReadError::Ended),
            };
            let r = self.record(&d);
            self.position = Some(r.offset);
            if std::mem::take(&mut self.assumed_empty)
                && parse(&r.body).map_or(true, |e| e.after.is_some())
            {
                tracing::warn!(
                    "the control state stream sent its entries after the grace; reading it again"
                );
                self.reread = true;
            } else {
                let who = Who {
                    user: r.user.as_deref(),
                    rules: self.rules,
                };
                self.current = step_by(self.current.clone(), &r.body, r.writer, who);
            }
            let _ = d.acker.ack(BasicAckOptions::default()).await;
        }
    }

    /// Stops reading (the channel stays open).
    pub async fn close(self) {
        let _ = self
            .channel
            .basic_cancel(self.consumer.tag().as_str().into(), Default::default())
            .await;
    }
}
