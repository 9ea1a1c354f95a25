//! The approvers' side: `approvals list`, `approve`, `deny` from any machine that reaches the
//! broker, as the approver's own broker user (the `user_id` the replicas check).
//!
//! In: the approver's broker URL and a [`Request`]. Out: the replica's [`Reply`] (over direct
//! reply-to), or why none came.

use crate::broker::{self, BrokerError, Outgoing, Publisher};
use futures::StreamExt;
use poller_core::approval::wire::{Reply, Request};
use poller_core::approval::ApprovalSettings;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ApproverError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("no poller answered within {0:?}: is any replica running?")]
    NoAnswer(Duration),
    #[error("the approvals exchange {0} has no queue bound: no replica has declared it yet")]
    NoQueue(String),
}

pub struct Approver<'a> {
    pub settings: &'a ApprovalSettings,
    /// The approver's broker nodes (their user must be in `approval.approvers`).
    pub endpoints: broker::Endpoints,
    /// How long to wait for the answer.
    pub wait: Duration,
}

impl Approver<'_> {
    /// Sends `req` and returns the answer.
    pub async fn send(&self, req: &Request) -> Result<Reply, ApproverError> {
        let user = self.endpoints.user();
        let (conn, _) = broker::connect(&self.endpoints, "command-poller-approver").await?;
        let result = self.send_on(&conn, &user, req).await;
        broker::close(&conn, "done").await;
        result
    }

    /// Sends `req` on an open connection of the approver `user` (the console keeps one per
    /// session); the connection stays open.
    pub async fn send_on(
        &self,
        conn: &lapin::Connection,
        user: &str,
        req: &Request,
    ) -> Result<Reply, ApproverError> {
        let publisher = Publisher::open(conn).await?;
        let answer = self.ask(&publisher, user, req).await;
        // The connection may be a console session's, kept open.
        let _ = publisher.channel().close(200, "done".into()).await;
        answer
    }

    async fn ask(
        &self,
        publisher: &Publisher,
        user: &str,
        req: &Request,
    ) -> Result<Reply, ApproverError> {
        // Direct reply-to: consume the pseudo-queue before publishing on the same channel.
        let mut replies = broker::consume_direct_replies(publisher.channel()).await?;
        let correlation = uuid::Uuid::new_v4().to_string();
        let sent = publisher
            .publish(&Outgoing {
                exchange: self.settings.exchange.clone(),
                routing_key: req.routing_key().into(),
                body: serde_json::to_vec(req).expect("a request serializes"),
                correlation_id: Some(correlation.clone()),
                message_type: crate::broker::names::message_type::APPROVAL_DECISION,
                user_id: Some(user.to_owned()),
                reply_to: Some(crate::broker::names::DIRECT_REPLY_TO.into()),
                ..Default::default()
            })
            .await;
        match sent {
            Ok(()) => {}
            Err(BrokerError::Unroutable { .. }) => {
                return Err(ApproverError::NoQueue(self.settings.exchange.clone()))
            }
            Err(e) => return Err(e.into()),
        }
        let deadline = Instant::now() + self.wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, replies.next()).await {
                Ok(Some(Ok(d))) => {
                    let ours = d
                        .properties
                        .correlation_id()
                        .as_ref()
                        .is_some_and(|c| c.as_str() == correlation);
                    if let (true, Ok(r)) = (ours, serde_json::from_slice::<Reply>(&d.data)) {
                        return Ok(r);
                    }
                }
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(None) | Err(_) => return Err(ApproverError::NoAnswer(self.wait)),
            }
        }
    }
}
