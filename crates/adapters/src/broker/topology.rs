//! Declares every exchange, queue and binding the poller uses. Idempotent: re-declaring with
//! the same arguments is a no-op, so every replica does it at every (re)connect.

use super::names::routing;
use super::settings::{Replication, TopologySettings};
use super::BrokerError;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};
use poller_core::control::ControlSettings;

/// The names in use, from settings.
pub type Topology = TopologySettings;

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

use crate::broker::names::text;

/// Declares the topology on `ch`.
pub async fn declare(ch: &Channel, t: &Topology) -> Result<(), BrokerError> {
    for ex in [
        &t.commands_exchange,
        &t.results_exchange,
        &t.alerts_exchange,
    ] {
        ch.exchange_declare(
            ex.as_str().into(),
            ExchangeKind::Topic,
            durable_exchange(),
            FieldTable::default(),
        )
        .await?;
    }
    ch.exchange_declare(
        t.dead_letter_exchange.as_str().into(),
        ExchangeKind::Fanout,
        durable_exchange(),
        FieldTable::default(),
    )
    .await?;

    let rep = &t.replication;
    bound_queue(ch, &t.dead_letter_queue, &t.dead_letter_exchange, "", rep).await?;

    // Quorum queue with a delivery limit, so a command that keeps failing ends in the dead
    // letter queue instead of cycling forever; at-least-once dead-lettering so the broker
    // doesn't drop it on the way (that strategy requires reject-publish overflow).
    let mut args = quorum_arguments(rep);
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(t.delivery_limit as i32),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        text(&t.dead_letter_exchange),
    );
    args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    // Bounded, so reject-publish really refuses: a flood is nacked at the publisher instead of
    // growing until the broker's memory alarm blocks every publisher (the operator's halt too).
    args.insert("x-overflow".into(), text("reject-publish"));
    args.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(i64::from(t.max_length)),
    );
    args.insert(
        "x-max-length-bytes".into(),
        AMQPValue::LongLongInt(i64::try_from(t.max_length_bytes).unwrap_or(i64::MAX)),
    );
    ch.queue_declare(t.commands_queue.as_str().into(), durable_queue(), args)
        .await?;
    ch.queue_bind(
        t.commands_queue.as_str().into(),
        t.commands_exchange.as_str().into(),
        t.commands_binding.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    if !t.results_queue.is_empty() {
        bound_queue(
            ch,
            &t.results_queue,
            &t.results_exchange,
            routing::RESULT_BINDING,
            rep,
        )
        .await?;
    }
    for team in &t.alert_teams {
        let queue = format!("{}.{team}", t.alerts_exchange);
        bound_queue(ch, &queue, &t.alerts_exchange, &format!("{team}.*"), rep).await?;
    }
    Ok(())
}

/// A quorum queue's arguments: its type and how it spreads over a cluster.
pub(crate) fn quorum_arguments(rep: &Replication) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert(
        "x-quorum-initial-group-size".into(),
        AMQPValue::LongInt(i32::from(rep.initial_group_size)),
    );
    args.insert(
        "x-queue-leader-locator".into(),
        text(rep.leader_locator.as_str()),
    );
    args
}

/// A durable quorum queue bound to `exchange` with `key`.
async fn bound_queue(
    ch: &Channel,
    queue: &str,
    exchange: &str,
    key: &str,
    rep: &Replication,
) -> Result<(), BrokerError> {
    bound(ch, queue, quorum_arguments(rep), exchange, key).await
}

/// A durable queue with `args` (a stream's, say) bound to `exchange` with `key`.
async fn bound(
    ch: &Channel,
    queue: &str,
    args: FieldTable,
    exchange: &str,
    key: &str,
) -> Result<(), BrokerError> {
    ch.queue_declare(queue.into(), durable_queue(), args)
        .await?;
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// A stream's arguments: retention by age and/or size, whole segments of `segment_bytes`,
/// replicated as `rep` says.
fn stream_arguments(
    max_age: Option<&str>,
    max_bytes: Option<i64>,
    segment_bytes: i64,
    rep: &Replication,
) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("stream"));
    args.insert(
        "x-initial-cluster-size".into(),
        AMQPValue::LongInt(i32::from(rep.initial_group_size)),
    );
    args.insert(
        "x-queue-leader-locator".into(),
        text(rep.leader_locator.as_str()),
    );
    if let Some(age) = max_age {
        args.insert("x-max-age".into(), text(age));
    }
    if let Some(bytes) = max_bytes {
        args.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(bytes));
    }
    args.insert(
        "x-stream-max-segment-size-bytes".into(),
        AMQPValue::LongLongInt(segment_bytes),
    );
    args
}

/// Declares the audit exchange and the stream the audit sink reads, on channels of their own. A
/// user that may not configure the stream (least privilege: the poller may publish audit
/// records, never delete them; `deploy/rabbitmq/definitions.json` creates it) checks instead
/// that both exist.
pub async fn declare_audit(
    conn: &lapin::Connection,
    a: &poller_core::audit::AuditSettings,
    rep: &Replication,
) -> Result<(), BrokerError> {
    let ch = conn.create_channel().await?;
    match declare_audit_on(&ch, a, rep).await {
        Ok(()) => {
            let _ = ch.close(200, "declared".into()).await;
            Ok(())
        }
        Err(e) if e.is_access_refused() => {
            expect_exist(conn, &[a.exchange.as_str()], &[a.queue.as_str()]).await
        }
        Err(e) => Err(e),
    }
}

/// Checks, configuring nothing (passive declares need no permission), that these exchanges and
/// queues exist: for users that may not declare what they use.
pub async fn expect_exist(
    conn: &lapin::Connection,
    exchanges: &[&str],
    queues: &[&str],
) -> Result<(), BrokerError> {
    let ch = conn.create_channel().await?;
    for e in exchanges {
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        // A passive declare doesn't check the kind.
        ch.exchange_declare(
            (*e).into(),
            ExchangeKind::Topic,
            passive,
            FieldTable::default(),
        )
        .await?;
    }
    for q in queues {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        ch.queue_declare((*q).into(), passive, FieldTable::default())
            .await?;
    }
    let _ = ch.close(200, "checked".into()).await;
    Ok(())
}

async fn declare_audit_on(
    ch: &Channel,
    a: &poller_core::audit::AuditSettings,
    rep: &Replication,
) -> Result<(), BrokerError> {
    ch.exchange_declare(
        a.exchange.as_str().into(),
        ExchangeKind::Topic,
        durable_exchange(),
        FieldTable::default(),
    )
    .await?;
    // A stream: the sink reads it without taking records off it (it resumes from its own
    // offset), and a stream can't be purged, so whoever may read it can't erase it.
    bound(
        ch,
        &a.queue,
        audit_stream_arguments(rep),
        &a.exchange,
        routing::AUDIT_BINDING,
    )
    .await
}

/// How long the audit stream keeps records (the sink copies them into the chain file well
/// before), and its segment size: retention drops whole segments.
pub(crate) const AUDIT_MAX_AGE: &str = "90D";
pub(crate) const AUDIT_SEGMENT_BYTES: i64 = 16_000_000;

/// The audit stream's arguments (the same in `deploy/rabbitmq/definitions.json`).
pub(crate) fn audit_stream_arguments(rep: &Replication) -> FieldTable {
    stream_arguments(Some(AUDIT_MAX_AGE), None, AUDIT_SEGMENT_BYTES, rep)
}

/// Declares the approvals' topology: the exchange approvers publish decisions to (topic,
/// `approval.<decision>`) and the quorum queue the replicas share, bound `approval.#`. A decision
/// that keeps failing is dead-lettered after `delivery_limit` deliveries, never cycled forever.
pub async fn declare_approvals(
    ch: &Channel,
    a: &poller_core::approval::ApprovalSettings,
    dead_letter_exchange: &str,
    delivery_limit: u32,
    rep: &Replication,
) -> Result<(), BrokerError> {
    ch.exchange_declare(
        a.exchange.as_str().into(),
        ExchangeKind::Topic,
        durable_exchange(),
        FieldTable::default(),
    )
    .await?;
    let mut args = quorum_arguments(rep);
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(delivery_limit as i32),
    );
    args.insert("x-dead-letter-exchange".into(), text(dead_letter_exchange));
    bound(ch, &a.queue, args, &a.exchange, routing::APPROVAL_BINDING).await
}

/// Declares the control topology: the control exchange (topic, levers and attempts), the state
/// exchange (fanout) and the state stream it feeds, and the events queue (`event.#`).
pub async fn declare_control(
    ch: &Channel,
    c: &ControlSettings,
    rep: &Replication,
) -> Result<(), BrokerError> {
    declare_levers(ch, c, rep).await?;
    declare_state(ch, c, rep).await
}

/// The control exchange and the events queue.
async fn declare_levers(
    ch: &Channel,
    c: &ControlSettings,
    rep: &Replication,
) -> Result<(), BrokerError> {
    ch.exchange_declare(
        c.exchange.as_str().into(),
        ExchangeKind::Topic,
        durable_exchange(),
        FieldTable::default(),
    )
    .await?;
    bound_queue(
        ch,
        &c.events_queue,
        &c.exchange,
        routing::EVENT_BINDING,
        rep,
    )
    .await
}

/// The state exchange and the state stream it feeds.
async fn declare_state(
    ch: &Channel,
    c: &ControlSettings,
    rep: &Replication,
) -> Result<(), BrokerError> {
    ch.exchange_declare(
        c.state_exchange.as_str().into(),
        ExchangeKind::Fanout,
        durable_exchange(),
        FieldTable::default(),
    )
    .await?;
    bound(
        ch,
        &c.state_queue,
        control_state_stream_arguments(rep),
        &c.state_exchange,
        "",
    )
    .await
}

/// The control topology as a replica declares it, on channels of its own: the levers'
/// exchange and events queue, then the state exchange and stream. A user that may not
/// configure the state stream (least privilege: `deploy/rabbitmq/definitions.json` creates it,
/// so the poller's credentials can't delete it and bring a replica up on an empty stream
/// during a halt) checks instead that both exist.
pub async fn declare_replica_control(
    conn: &lapin::Connection,
    c: &ControlSettings,
    rep: &Replication,
) -> Result<(), BrokerError> {
    let ch = conn.create_channel().await?;
    declare_levers(&ch, c, rep).await?;
    let _ = ch.close(200, "declared".into()).await;
    let ch = conn.create_channel().await?;
    match declare_state(&ch, c, rep).await {
        Ok(()) => {
            let _ = ch.close(200, "declared".into()).await;
            Ok(())
        }
        Err(e) if e.is_access_refused() => {
            expect_exist(
                conn,
                &[c.state_exchange.as_str()],
                &[c.state_queue.as_str()],
            )
            .await
        }
        Err(e) => Err(e),
    }
}

/// A replica's own control queue (exclusive, gone with its connection), bound to levers and
/// attempts; returns its name.
pub async fn declare_replica_queue(
    ch: &Channel,
    c: &ControlSettings,
) -> Result<ShortString, BrokerError> {
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    for key in [routing::CONTROL_BINDING, routing::ATTEMPT_BINDING] {
        ch.queue_bind(
            q.name().clone(),
            c.exchange.as_str().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(q.name().clone())
}

/// Retention of the control state stream: whole segments of this size are dropped once the
/// stream exceeds [`CONTROL_STATE_MAX_BYTES`]. An entry is a few hundred bytes.
pub(crate) const CONTROL_STATE_SEGMENT_BYTES: i64 = 1_000_000;
pub(crate) const CONTROL_STATE_MAX_BYTES: i64 = 20_000_000;

/// The control state stream's arguments (the same in `deploy/rabbitmq/definitions.json`).
pub(crate) fn control_state_stream_arguments(rep: &Replication) -> FieldTable {
    stream_arguments(
        None,
        Some(CONTROL_STATE_MAX_BYTES),
        CONTROL_STATE_SEGMENT_BYTES,
        rep,
    )
}
