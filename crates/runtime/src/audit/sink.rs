//! `command-poller audit sink`: reads the audit stream and appends each record to the
//! hash-chained file, with its stream offset, so a restarted sink resumes after the last record
//! it holds. The stream keeps records whether or not the sink runs (it can't be purged, and the
//! sink's user may not delete it).

use super::chain::{ChainError, ChainWriter};
use crate::broker::{self, BrokerError};

use crate::bridge::signing::Secret;
use crate::broker::settings::AmqpSettings;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use poller_core::audit::AuditSettings;
use std::path::Path;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the audit chain key: {0}")]
    WeakKey(String),
}

/// What the sink needs: its sections of the settings, two names, and the chain key.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub amqp: AmqpSettings,
    /// The broker nodes (from `amqp`).
    pub endpoints: broker::Endpoints,
    pub audit: AuditSettings,
    /// Where a refused record's security alert goes.
    pub alerts_exchange: String,
    /// Where a refused record goes.
    pub dead_letter_exchange: String,
    /// `audit.chain_key_env`'s value, when set.
    pub chain_key: Option<Secret>,
}

/// Runs until `stop` is cancelled, reconnecting (with backoff, forever) when the broker
/// connection ends or fails, like the poller. Returns the records appended. Only a chain that
/// can't be written or doesn't verify stops it with an error.
pub async fn run(
    settings: &SinkConfig,
    file: &Path,
    stop: CancellationToken,
) -> Result<u64, SinkError> {
    let key = settings.chain_key.clone();
    if let Some(k) = &key {
        k.check_strong(&settings.audit.chain_key_env)
            .map_err(SinkError::WeakKey)?;
    }
    if key.is_none() {
        tracing::warn!(
            variable = %settings.audit.chain_key_env,
            "no audit chain key: the chain's links are plain SHA-256, so whoever can rewrite the file can recompute them"
        );
    }
    let mut writer = ChainWriter::open_keyed(file, key)?;
    tracing::info!(file = %file.display(), seq = writer.head().seq, "audit sink: chain verified, appending");
    let a = &settings.amqp;
    let backoff = || {
        ExponentialBuilder::default()
            .with_min_delay(a.reconnect_min)
            .with_max_delay(a.reconnect_max)
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut delays = backoff();
    let mut appended = 0u64;
    while !stop.is_cancelled() {
        let before = appended;
        let ended = session(settings, &mut writer, &stop, &mut appended).await;
        if stop.is_cancelled() {
            break;
        }
        match ended {
            Err(SinkError::Chain(e)) => return Err(SinkError::Chain(e)),
            Err(e) => tracing::warn!(error = %e, "audit sink: broker session ended; reconnecting"),
            Ok(()) => tracing::warn!("audit sink: the broker ended the consumer; reconnecting"),
        }
        if appended > before {
            delays = backoff();
        }
        let delay = delays.next().unwrap_or(a.reconnect_max);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    Ok(appended)
}

/// One connected session: reads the stream after the chain's last offset and appends.
async fn session(
    settings: &SinkConfig,
    writer: &mut ChainWriter,
    stop: &CancellationToken,
    appended: &mut u64,
) -> Result<(), SinkError> {
    let (conn, node) = broker::connect(
        &settings.endpoints,
        &format!("{}-audit-sink", settings.amqp.connection_name),
    )
    .await?;
    tracing::info!(node = %node.shown, "audit sink: connected to the broker");
    let result = consume(settings, &conn, writer, stop, appended).await;
    broker::close(&conn, "audit sink session end").await;
    if result.is_err() {
        settings.endpoints.lost(&node);
    }
    result
}

async fn consume(
    settings: &SinkConfig,
    conn: &lapin::Connection,
    writer: &mut ChainWriter,
    stop: &CancellationToken,
    appended: &mut u64,
) -> Result<(), SinkError> {
    let ch = conn.create_channel().await?;
    // Passive: the sink's user may only read the audit stream (the poller declares it), so it
    // can't delete it; a stream can't be purged at all.
    ch.queue_declare(
        settings.audit.queue.as_str().into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.basic_qos(64, BasicQosOptions::default()).await?;
    // Reading a stream takes nothing off it: resume after the last record the chain holds.
    let after = writer.head().offset;
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        match after {
            Some(o) => AMQPValue::LongLongInt(i64::try_from(o + 1).unwrap_or(i64::MAX)),
            None => crate::broker::names::text("first"),
        },
    );
    let mut consumer = ch
        .basic_consume(
            settings.audit.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await?;
    loop {
        let d = tokio::select! {
            _ = stop.cancelled() => break,
            d = consumer.next() => match d {
                Some(d) => d?,
                None => break,
            }
        };
        let offset = stream_offset(&d);
        let publisher = d.properties.user_id().as_ref().map(|u| u.to_string());
        if !publisher
            .as_deref()
            .is_some_and(|u| settings.audit.publishers.iter().any(|p| p == u))
        {
            // Not the poller's: never part of the chain. It stays in the stream as evidence;
            // a copy goes to the dead-letter queue with the reason, for a human.
            let why = format!(
                "audit record published by {}, not by an audit publisher ({}); refused",
                publisher.as_deref().unwrap_or("(no user_id)"),
                settings.audit.publishers.join(", ")
            );
            tracing::error!(offset = ?offset, "{why}");
            refuse(conn, settings, &d.data, &why).await;
            d.acker.ack(BasicAckOptions::default()).await?;
            continue;
        }
        // A consumer attached at an offset may be handed earlier records of the same chunk.
        if let (Some(o), Some(last)) = (offset, after) {
            if o <= last {
                d.acker.ack(BasicAckOptions::default()).await?;
                continue;
            }
        }
        // Anything that isn't JSON is still kept, as evidence, in a JSON wrapper.
        let text = match std::str::from_utf8(&d.data)
            .ok()
            .filter(|t| serde_json::from_str::<serde_json::Value>(t).is_ok())
        {
            Some(t) => t.to_owned(),
            None => serde_json::json!({"kind": "unreadable", "bytes_hex": hex::encode(&d.data)})
                .to_string(),
        };
        writer.append_at(&text, offset)?;
        *appended += 1;
        d.acker.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}

/// Dead-letters a refused record with the reason and alerts security (the sink's user may
/// publish there and nowhere else); logged when even that is refused.
async fn refuse(conn: &lapin::Connection, settings: &SinkConfig, body: &[u8], why: &str) {
    let sent = async {
        let p = broker::Publisher::open(conn).await?;
        let alert = crate::outcome::Alert {
            alert_id: uuid::Uuid::new_v4().to_string(),
            team: "security".into(),
            priority: crate::outcome::Priority::High,
            action_id: None,
            command_type: None,
            service: None,
            agent: None,
            status: None,
            summary: format!("The audit sink refused a record: {why}"),
            rationale: why.to_owned(),
            action_required: "Someone published to the audit exchange who is not the poller: find who holds those broker credentials and why; the record is in the dead-letter queue and still in the audit stream.".into(),
            poller_instance: "audit-sink".into(),
            at: poller_core::audit::now(),
            approval: None,
        };
        p.publish(&broker::Outgoing {
            exchange: settings.alerts_exchange.clone(),
            routing_key: alert.routing_key(),
            body: serde_json::to_vec(&alert).expect("alert serializes"),
            message_type: crate::broker::names::message_type::ALERT,
            // The sink's own user: never mistaken for the poller's alerts.
            user_id: Some(settings.endpoints.user()),
            ..Default::default()
        })
        .await?;
        let mut headers = FieldTable::default();
        headers.insert(
            crate::broker::names::header::REASON.into(),
            crate::broker::names::text(why),
        );
        p.publish(&broker::Outgoing {
            exchange: settings.dead_letter_exchange.clone(),
            routing_key: crate::broker::names::routing::AUDIT_REFUSED.into(),
            body: body.to_vec(),
            message_type: crate::broker::names::message_type::AUDIT_REFUSED,
            headers: Some(headers),
            ..Default::default()
        })
        .await
    }
    .await;
    if let Err(e) = sent {
        tracing::error!(error = %e, "could not dead-letter the refused audit record; it stays in the audit stream");
    }
}

/// The record's position in the audit stream (the broker's `x-stream-offset` header).
fn stream_offset(d: &lapin::message::Delivery) -> Option<u64> {
    let headers = d.properties.headers().as_ref()?;
    match headers.inner().get("x-stream-offset")? {
        AMQPValue::LongLongInt(o) => u64::try_from(*o).ok(),
        AMQPValue::LongInt(o) => u64::try_from(*o).ok(),
        AMQPValue::LongUInt(o) => Some(u64::from(*o)),
        _ => None,
    }
}
