//! The approvals desk: where decisions arrive. Every replica consumes the shared approvals
//! queue, so each decision is handled once, by whichever replica takes it.
//!
//! In: a decision message (its bytes, the broker-checked `user_id`, where to reply). Out: the
//! parked record changed by compare-and-set (or nothing, with the reason), and what to publish:
//! the reply, the event, the audit record, security's alert for abuse. [`Desk::handle`] does the
//! store I/O and decides with [`rules::decide`]; [`Desk::listen`] consumes and publishes.

mod decide;

use super::render::{self, ApprovalEvent};
use crate::bridge::signing::Secret;
use crate::broker::names::routing;
use crate::broker::{BrokerError, Publish};
use crate::control::replica::Names;
use crate::store::ResultStore;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use poller_core::approval::rules::{self, Choice, Verdict};
use poller_core::approval::wire::{self, PendingView, Reply, ReplyOutcome, Request};
use poller_core::approval::ApprovalSettings;
use poller_core::approval::{Parked, State};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::Notify;

/// A decision message as the desk needs it.
#[derive(Debug, Clone, Default)]
pub struct Inbound {
    pub body: Vec<u8>,
    /// The broker-checked publishing user.
    pub user_id: Option<String>,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    /// The broker delivered it before (a replica died, or lost its connection, before acking).
    pub redelivered: bool,
}

/// What handling a decision came to: everything to publish.
#[derive(Debug, Clone)]
pub struct Handled {
    pub reply: Reply,
    pub event: ApprovalEvent,
    /// Security is alerted.
    pub abuse: bool,
    /// The record decided on, if one was found.
    pub record: Option<Parked>,
    /// A redelivered decision that was already stored: its messages go out again, but it is
    /// not counted again.
    pub repeat: bool,
}

pub struct Desk {
    pub settings: ApprovalSettings,
    pub names: Names,
    pub store: Arc<dyn ResultStore>,
    pub store_key: Secret,
    /// The policy this replica runs (a reload swaps it).
    pub policy: std::sync::Arc<crate::policy::shared::SharedPolicy>,
    /// The policy file, read again at each approval: an approval is refused when it changed.
    pub policy_file: PathBuf,
    /// Its metrics are counted here.
    pub state: Arc<crate::settle::state::PollerState>,
    /// Where the grants' uses are counted (shown by `list`).
    pub grant_uses: Arc<dyn crate::store::RateWindows>,
    /// Wakes this replica's sweeper when a decision ends a wait.
    pub wake: Arc<Notify>,
    pub audit_exchange: String,
    /// Decisions counted per approver this minute.
    pub budget: DecisionBudget,
}

/// Decision messages per approver in the current minute.
#[derive(Debug, Default)]
pub struct DecisionBudget(std::sync::Mutex<std::collections::HashMap<String, (u64, u32)>>);

/// What the budget says of one more decision message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    Within,
    /// The first over the cap this minute: refused and alerted.
    JustOver,
    /// Refused, already alerted this minute.
    Over,
}

impl DecisionBudget {
    /// Counts one message from `by` at `now` (unix seconds) against `cap` per minute.
    pub fn take(&self, by: &str, now: u64, cap: u32) -> Budget {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let minute = now / 60;
        // Forget other minutes: the map holds at most the senders of this one.
        m.retain(|_, (w, _)| *w == minute);
        let (_, n) = m.entry(by.to_owned()).or_insert((minute, 0));
        *n = n.saturating_add(1);
        match (*n).cmp(&cap.saturating_add(1)) {
            std::cmp::Ordering::Less => Budget::Within,
            std::cmp::Ordering::Equal => Budget::JustOver,
            std::cmp::Ordering::Greater => Budget::Over,
        }
    }
}

/// Compare-and-set attempts before a decision is refused as contended.
const SWAP_TRIES: usize = 5;

impl Desk {
    /// The digests of the policy in force: the one running and the file as it is now.
    fn policy_digests(&self) -> Vec<String> {
        let file = match crate::policy::Policy::load(&self.policy_file) {
            Ok(p) => p.digest().to_owned(),
            Err(e) => format!("unreadable ({e})"),
        };
        vec![self.policy.digest(), file]
    }

    fn answer(
        &self,
        outcome: ReplyOutcome,
        message: String,
        event: ApprovalEvent,
        abuse: bool,
        record: Option<Parked>,
    ) -> Handled {
        Handled {
            reply: Reply {
                outcome,
                message,
                approval_id: event.approval_id.clone(),
                pending: Vec::new(),
                grants: Vec::new(),
                instance: self.names.instance.clone(),
            },
            event,
            abuse,
            record,
            repeat: false,
        }
    }

    fn is_approver(&self, user: Option<&str>) -> bool {
        user.is_some_and(|u| self.settings.approvers.iter().any(|a| a == u))
    }

    async fn list(&self, mut event: ApprovalEvent, now: u64) -> Handled {
        let records = match self.store.open_records().await {
            Ok(r) => r,
            Err(e) => {
                let why = format!("the store is unavailable ({e}); try again");
                event.refusal = Some(why.clone());
                return self.answer(ReplyOutcome::Refused, why, event, false, None);
            }
        };
        let digests = self.policy_digests();
        let mut pending: Vec<PendingView> = records
            .iter()
            .filter_map(|s| Parked::unseal(&self.store_key, s).ok())
            .filter(|r| PendingView::listed(r, now))
            .map(|r| PendingView::of(&r, now, &digests))
            .collect();
        pending.sort_by_key(|p| p.expires_in_secs);
        event.outcome = "listed".into();
        let mut h = self.answer(
            ReplyOutcome::Listed,
            format!("{} pending", pending.len()),
            event,
            false,
            None,
        );
        h.reply.pending = pending;
        h.reply.grants = self.grants().await;
        h
    }

    /// The grants in force (with their uses so far) and proposed, as the gate enforces them.
    async fn grants(&self) -> Vec<wire::GrantView> {
        use poller_core::control::grant;
        let state = self.state.gate.state();
        let mut views = wire::GrantView::all(&state);
        for v in views.iter_mut().filter(|v| v.state == "in_force") {
            let Some(g) = state.grants.get(&v.grant_id) else {
                continue;
            };
            let window = std::time::Duration::from_secs(g.window_secs());
            v.used = self
                .grant_uses
                .count(&grant::count_key(&v.grant_id), window)
                .await
                .ok();
        }
        views
    }

    /// Consumes the approvals queue until it ends or `stop` is cancelled; each decision is
    /// handled, its messages published, and only then acked.
    pub async fn listen(
        self: Arc<Self>,
        ch: lapin::Channel,
        publisher: crate::broker::Publisher,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<(), BrokerError> {
        ch.basic_qos(8, BasicQosOptions::default()).await?;
        let mut consumer = ch
            .basic_consume(
                self.settings.queue.as_str().into(),
                format!("{}-approvals", self.names.instance).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        loop {
            let delivery = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                d = consumer.next() => d,
            };
            let Some(delivery) = delivery else {
                return Err(BrokerError::Lost(
                    "the broker cancelled the approvals consumer".into(),
                ));
            };
            let delivery = delivery?;
            let p = &delivery.properties;
            let msg = Inbound {
                body: delivery.data.clone(),
                user_id: p.user_id().as_ref().map(|u| u.to_string()),
                reply_to: p.reply_to().as_ref().map(|u| u.to_string()),
                correlation_id: p.correlation_id().as_ref().map(|u| u.to_string()),
                redelivered: delivery.redelivered,
            };
            let handled = self.handle(&msg).await;
            self.publish(&publisher, &msg, &handled).await?;
            delivery.acker.ack(BasicAckOptions::default()).await?;
        }
    }

    /// Publishes what a decision came to: the reply, then (for decisions, not listings) the
    /// event, security's alert for abuse, and the audit record.
    pub async fn publish(
        &self,
        publisher: &dyn Publish,
        msg: &Inbound,
        h: &Handled,
    ) -> Result<(), BrokerError> {
        if !h.repeat {
            self.state.metrics.approval_decision(&h.event.outcome);
        }
        if let Some(to) = msg
            .reply_to
            .as_deref()
            .filter(|r| crate::broker::names::is_direct_reply_to(r))
        {
            let reply = render::reply(to, msg.correlation_id.as_deref(), &h.reply);
            if let Err(e) = publisher.publish(&reply).await {
                if e.is_connection() {
                    return Err(e);
                }
                tracing::warn!(error = %e, "approval reply not delivered");
            }
        }
        if h.reply.outcome == ReplyOutcome::Listed {
            return Ok(());
        }
        // The decision is made (and stored) whatever happens here: a message the broker refuses
        // is logged, not retried through a redelivery that would answer "already decided".
        let event = render::event(&h.event, &self.names);
        match publisher.publish(&event).await {
            Err(e) if e.is_connection() => return Err(e),
            Err(e) => tracing::error!(error = %e, "approval event not published"),
            Ok(()) => {}
        }
        if h.abuse {
            let alert = render::abuse_alert(&h.event, h.record.as_ref(), &self.names);
            match publisher.publish(&alert).await {
                Err(e) if e.is_connection() => return Err(e),
                Err(e) => {
                    tracing::error!(error = %e, alert = %String::from_utf8_lossy(&alert.body), "security alert not published; here it is")
                }
                Ok(()) => {}
            }
        }
        crate::audit::publish_record(
            publisher,
            &self.audit_exchange,
            routing::AUDIT_APPROVAL,
            &self.names.dead_letter_exchange,
            &render::audit(&h.event, h.record.as_ref(), &self.names),
            &self.names.poller_user,
        )
        .await?;
        Ok(())
    }
}

fn wire_name(o: ReplyOutcome) -> String {
    crate::outcome::wire_name(&o)
}

#[cfg(test)]
mod tests;
