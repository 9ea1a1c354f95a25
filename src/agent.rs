//! The agent's side, for people and scripts: publish a command exactly as an agent would
//! (`user_id` set to the broker user, routed by command type, direct reply-to) and wait for its
//! result.
//!
//! In: a command file's bytes and the broker URL. Out: the result message, or a timeout.

use crate::outcome::ResultMessage;
use futures::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::BasicProperties;
use lapin::Confirmation;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker did not accept the command: {0}")]
    NotAccepted(String),
    #[error("no result within {0:?}")]
    Timeout(Duration),
    #[error("the reply was not a result message: {0}")]
    BadReply(String),
}

/// What to send and how.
pub struct SendOptions<'a> {
    /// The agent's broker nodes: their user becomes the command's `user_id`.
    pub endpoints: &'a crate::broker::Endpoints,
    pub exchange: &'a str,
    /// Wait this long for the result; None: publish and return.
    pub wait: Option<Duration>,
    /// Publish without the user_id property (to see the poller refuse it).
    pub omit_user_id: bool,
}

/// The routing key agents use: `command.<command_type in lower case>` (only a convenience: the
/// poller decides on the payload).
pub fn routing_key_for(payload: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| {
            v.get("command_type")?
                .as_str()
                .map(|s| s.to_ascii_lowercase())
        })
        .filter(|s| s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(|s| format!("command.{s}"))
        .unwrap_or_else(|| "command.unknown".into())
}

pub async fn send(
    payload: &[u8],
    opts: SendOptions<'_>,
) -> Result<Option<ResultMessage>, SendError> {
    let user = opts.endpoints.user();
    let (conn, _) = crate::broker::connect(opts.endpoints, "command-poller-send")
        .await
        .map_err(|e| match e {
            crate::broker::BrokerError::Amqp(e) => SendError::Broker(e),
            other => SendError::NotAccepted(other.to_string()),
        })?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    // Direct reply-to: consume the pseudo-queue (no-ack) before publishing on the same channel.
    let mut replies =
        match opts.wait {
            Some(_) => Some(crate::broker::consume_direct_replies(&ch).await.map_err(
                |e| match e {
                    crate::broker::BrokerError::Amqp(e) => SendError::Broker(e),
                    other => SendError::NotAccepted(other.to_string()),
                },
            )?),
            None => None,
        };
    let action_id = serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v.get("action_id")?.as_str().map(str::to_owned));
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    if !opts.omit_user_id {
        props = props.with_user_id(user.as_str().into());
    }
    if let Some(a) = &action_id {
        props = props.with_correlation_id(a.as_str().into());
    }
    if replies.is_some() {
        props = props.with_reply_to(crate::broker::names::DIRECT_REPLY_TO.into());
    }
    let confirm = ch
        .basic_publish(
            opts.exchange.into(),
            routing_key_for(payload).as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            payload,
            props,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) => {}
        Confirmation::Ack(Some(_)) => {
            return Err(SendError::NotAccepted(format!(
                "unroutable: is the poller's topology declared on exchange {:?}?",
                opts.exchange
            )))
        }
        Confirmation::Nack(_) => {
            return Err(SendError::NotAccepted(
                "refused by the broker (nack): the commands queue is full (topology.max_length or max_length_bytes reached); retry later with backoff"
                    .into(),
            ))
        }
        Confirmation::NotRequested => {
            return Err(SendError::NotAccepted("publisher confirms were not enabled".into()))
        }
    }
    let result = match (opts.wait, replies.as_mut()) {
        (Some(wait), Some(replies)) => {
            let next = tokio::time::timeout(wait, replies.next())
                .await
                .map_err(|_| SendError::Timeout(wait))?;
            match next {
                Some(Ok(d)) => Some(
                    serde_json::from_slice::<ResultMessage>(&d.data)
                        .map_err(|e| SendError::BadReply(e.to_string()))?,
                ),
                Some(Err(e)) => return Err(e.into()),
                None => return Err(SendError::BadReply("reply consumer closed".into())),
            }
        }
        _ => None,
    };
    let _ = conn.close(200, "done".into()).await;
    Ok(result)
}
