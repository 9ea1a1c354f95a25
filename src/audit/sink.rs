//! `command-poller audit sink`: consumes the audit queue and appends each record to the
//! hash-chained file, acking only after the append is on disk.

use super::chain::{ChainError, ChainWriter};
use crate::broker::{self, BrokerError};
use crate::settings::Settings;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
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
}

/// Runs until `stop` is cancelled or the broker connection ends. Returns records appended.
pub async fn run(
    settings: &Settings,
    file: &Path,
    stop: CancellationToken,
) -> Result<u64, SinkError> {
    let mut writer = ChainWriter::open(file)?;
    tracing::info!(file = %file.display(), seq = writer.head().seq, "audit sink: chain verified, appending");
    let conn = broker::connect(&settings.amqp.url, "command-poller-audit-sink").await?;
    let ch = conn.create_channel().await?;
    broker::declare_audit(&ch, &settings.audit).await?;
    ch.basic_qos(64, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            settings.audit.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut appended = 0u64;
    loop {
        let d = tokio::select! {
            _ = stop.cancelled() => break,
            d = consumer.next() => match d {
                Some(d) => d?,
                None => break,
            }
        };
        // Anything that isn't JSON is still kept, as evidence, in a JSON wrapper.
        let text = match std::str::from_utf8(&d.data)
            .ok()
            .filter(|t| serde_json::from_str::<serde_json::Value>(t).is_ok())
        {
            Some(t) => t.to_owned(),
            None => serde_json::json!({"kind": "unreadable", "bytes_hex": hex::encode(&d.data)})
                .to_string(),
        };
        writer.append(&text)?;
        appended += 1;
        d.acker.ack(BasicAckOptions::default()).await?;
    }
    let _ = conn.close(200, "audit sink stopping".into()).await;
    Ok(appended)
}
