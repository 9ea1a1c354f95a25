//! The approvals desk: where decisions arrive. Every replica consumes the shared approvals
//! queue, so each decision is handled once, by whichever replica takes it.
//!
//! In: a decision message (its bytes, the broker-checked `user_id`, where to reply). Out: the
//! parked record changed by compare-and-set (or nothing, with the reason), and what to publish:
//! the reply, the event, the audit record, security's alert for abuse. [`Desk::handle`] does the
//! store I/O and decides with [`rules::decide`]; [`Desk::listen`] consumes and publishes.

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
                instance: self.names.instance.clone(),
            },
            event,
            abuse,
            record,
        }
    }

    /// Handles one decision message: parse, check, decide, compare-and-set. Never fails: every
    /// problem is a refusal with its reason.
    pub async fn handle(&self, msg: &Inbound) -> Handled {
        let now = crate::clock::unix_now();
        let mut event = ApprovalEvent {
            outcome: "refused".into(),
            approval_id: None,
            action_id: None,
            agent: None,
            by: msg.user_id.clone().unwrap_or_else(|| "(no user_id)".into()),
            decision: "unreadable".into(),
            digest: None,
            reason: String::new(),
            refusal: None,
            instance: self.names.instance.clone(),
            at: crate::clock::rfc3339(now),
        };
        let refuse = |mut event: ApprovalEvent, why: String, abuse: bool, rec: Option<Parked>| {
            tracing::warn!(by = %event.by, approval_id = ?event.approval_id, why = %why, abuse, "approval decision refused");
            event.refusal = Some(why.clone());
            self.answer(ReplyOutcome::Refused, why, event, abuse, rec)
        };
        // Answers go to direct reply-to only: any other `reply_to` would make this replica
        // publish, as the poller's user, into a queue of the decider's choosing.
        if let Some(rt) = msg.reply_to.as_deref() {
            if !crate::broker::names::is_direct_reply_to(rt) {
                return refuse(
                    event,
                    format!("answers go to direct reply-to (amq.rabbitmq.reply-to) only; this decision asked for {rt:?}"),
                    true,
                    None,
                );
            }
        }
        match self
            .budget
            .take(&event.by, now, self.settings.max_decisions_per_minute)
        {
            Budget::Within => {}
            over => {
                return refuse(
                    event,
                    format!(
                        "more than {} decision messages this minute from this user",
                        self.settings.max_decisions_per_minute
                    ),
                    over == Budget::JustOver,
                    None,
                )
            }
        }
        let req = match wire::parse(&msg.body, self.settings.max_decision_bytes) {
            Ok(r) => r,
            Err(why) => {
                // From someone who is not an approver, even a malformed message is abuse.
                let abuse = !self.is_approver(msg.user_id.as_deref());
                return refuse(event, why, abuse, None);
            }
        };
        event.decision = match &req {
            Request::List => "list",
            Request::Approve { .. } => "approve",
            Request::Deny { .. } => "deny",
        }
        .into();
        event.approval_id = req.approval_id().map(str::to_owned);
        match &req {
            Request::Approve { digest, reason, .. } => {
                event.reason = reason.clone();
                event.digest = Some(digest.clone());
            }
            Request::Deny { reason, .. } => event.reason = reason.clone(),
            Request::List => {}
        }
        let Some(by) = msg.user_id.clone() else {
            return refuse(
                event,
                "the message has no user_id: decisions must carry the broker-checked user_id"
                    .into(),
                true,
                None,
            );
        };
        if !self.is_approver(Some(&by)) {
            return refuse(
                event,
                format!(
                    "{by} is not an approver (approval.approvers): only listed approvers decide"
                ),
                true,
                None,
            );
        }
        let (id, choice, reason) = match req {
            Request::List => return self.list(event, now).await,
            Request::Approve {
                approval_id,
                digest,
                reason,
            } => (approval_id, Choice::Approve { digest }, reason),
            Request::Deny {
                approval_id,
                reason,
            } => (approval_id, Choice::Deny, reason),
        };
        for _ in 0..SWAP_TRIES {
            let stored = match self.store.record(&id).await {
                Ok(Some(s)) => s,
                Ok(None) => {
                    return refuse(
                        event,
                        format!("unknown approval id {id} (or past its retention)"),
                        false,
                        None,
                    )
                }
                Err(e) => {
                    return refuse(
                        event,
                        format!("the store is unavailable ({e}); nothing changed, try again"),
                        false,
                        None,
                    )
                }
            };
            let rec = match Parked::unseal(&self.store_key, &stored) {
                Ok(r) => r,
                Err(e) => {
                    return refuse(
                        event,
                        format!("the parked record of {id} failed its integrity check ({e}): refused, nothing changed"),
                        true,
                        None,
                    )
                }
            };
            event.action_id = Some(rec.action_id.to_string());
            event.agent = Some(rec.agent.id.to_string());
            let ctx = rules::Context {
                approvers: &self.settings.approvers,
                now,
                policy_digests: &self.policy_digests(),
            };
            let (next, verdict) = match rules::decide(&rec, &by, &choice, reason.trim(), &ctx) {
                Ok(d) => d,
                Err(r) => {
                    // A redelivery of a decision already stored (the replica that stored it died
                    // before acking): answered as it was, and its event and audit record go out
                    // now, instead of "already decided".
                    if let Some(outcome) = msg
                        .redelivered
                        .then(|| already_decided(&rec, &by, &choice, reason.trim()))
                        .flatten()
                    {
                        event.outcome = wire_name(outcome);
                        tracing::info!(by = %by, approval_id = %id, "a redelivered decision that was already stored: answered as decided");
                        return self.answer(
                            outcome,
                            "this decision was already recorded (a redelivery): answered as decided".into(),
                            event,
                            false,
                            Some(rec),
                        );
                    }
                    return refuse(event, r.reason, r.abuse, Some(rec));
                }
            };
            match self
                .store
                .swap(&id, &stored, &next.seal(&self.store_key), true)
                .await
            {
                Ok(true) => {}
                // Changed in between (another decision, a sweep): decide again on what is there.
                Ok(false) => continue,
                Err(e) => {
                    return refuse(
                        event,
                        format!("the store is unavailable ({e}); nothing changed, try again"),
                        false,
                        Some(rec),
                    )
                }
            }
            let (outcome, message) = match verdict {
                Verdict::Counted { have, need } => (
                    ReplyOutcome::Counted,
                    format!("approval counted: {have} of {need}; more approvers are needed"),
                ),
                Verdict::Approved => (
                    ReplyOutcome::Approved,
                    format!(
                        "approved ({} of {}): it executes once, as soon as the system is running",
                        next.approvals.len(),
                        next.required
                    ),
                ),
                Verdict::Denied => (
                    ReplyOutcome::Denied,
                    "denied: it will never be executed; the agent gets a DENIED result".into(),
                ),
            };
            event.outcome = wire_name(outcome);
            if next.state != State::Pending {
                self.state
                    .metrics
                    .approval_decided(now.saturating_sub(next.parked_at));
                self.wake.notify_one();
            }
            tracing::info!(by = %by, approval_id = %id, outcome = %event.outcome, "approval decision");
            return self.answer(outcome, message, event, false, Some(next));
        }
        refuse(
            event,
            "the approval changed too often while deciding; try again".into(),
            false,
            None,
        )
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
        h
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
        self.state.metrics.approval_decision(&h.event.outcome);
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

/// How `by`'s `choice` with `reason` went, if the record holds exactly that decision already.
fn already_decided(rec: &Parked, by: &str, choice: &Choice, reason: &str) -> Option<ReplyOutcome> {
    match choice {
        Choice::Approve { digest } => {
            let mine = rec
                .approvals
                .iter()
                .any(|a| a.by == by && a.reason == reason && *digest == rec.digest);
            mine.then_some(if rec.state == State::Pending {
                ReplyOutcome::Counted
            } else {
                ReplyOutcome::Approved
            })
        }
        Choice::Deny => rec
            .denial
            .as_ref()
            .filter(|d| d.by == by && d.reason == reason)
            .map(|_| ReplyOutcome::Denied),
    }
}

fn wire_name(o: ReplyOutcome) -> String {
    crate::outcome::wire_name(&o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use poller_core::approval::test_util::parked;

    fn desk(store: Arc<dyn ResultStore>) -> Desk {
        let root = crate::testing::repo_root();
        let mut s = crate::settings::Settings::load_isolated(&root.join("config"), "local")
            .expect("config loads");
        s.policy.file = root.join(&s.policy.file);
        let policy = crate::policy::Policy::load(&s.policy.file).expect("policy loads");
        Desk {
            settings: ApprovalSettings {
                approvers: vec!["alice".into(), "bob".into()],
                ..s.approval.clone()
            },
            names: Names {
                control_exchange: "ctl".into(),
                alerts_exchange: "alerts".into(),
                audit_exchange: "audit".into(),
                dead_letter_exchange: "dlx".into(),
                instance: "i-1".into(),
                poller_user: "poller".into(),
                replication: crate::testing::REPLICATION,
            },
            store,
            store_key: Secret::new("k"),
            policy: Arc::new(crate::policy::shared::SharedPolicy::fixed(Arc::new(policy))),
            policy_file: s.policy.file.clone(),
            state: Arc::new(crate::settle::state::PollerState::default()),
            wake: Arc::new(Notify::new()),
            audit_exchange: "audit".into(),
            budget: Default::default(),
        }
    }

    fn decision(by: &str, body: serde_json::Value, redelivered: bool) -> Inbound {
        Inbound {
            body: body.to_string().into_bytes(),
            user_id: Some(by.into()),
            reply_to: None,
            correlation_id: None,
            redelivered,
        }
    }

    #[tokio::test]
    async fn a_decision_asking_for_an_answer_anywhere_but_direct_reply_to_is_refused_as_abuse() {
        let store: Arc<dyn ResultStore> = Arc::new(crate::testing::MemStore::default());
        let d = desk(store);
        for target in [
            "mcp.control.state.log",
            "mcp.commands",
            "reply.agent-marketing.x",
        ] {
            let mut msg = decision("alice", serde_json::json!({"decision": "list"}), false);
            msg.reply_to = Some(target.into());
            let h = d.handle(&msg).await;
            assert_eq!(h.reply.outcome, ReplyOutcome::Refused, "{target}");
            assert!(h.abuse, "{target}: security is alerted");
            assert!(
                h.reply.message.contains("direct reply-to"),
                "{}",
                h.reply.message
            );
            // And nothing is published to it.
            let log = crate::testing::Log::default();
            let sink = crate::testing::RecordingPublisher::new(log.clone());
            d.publish(&sink, &msg, &h).await.unwrap();
            let sent = log.lock().unwrap().clone();
            assert!(
                sent.iter().all(|line| !line.contains(target)),
                "{target}: {sent:?}"
            );
            assert!(sent.iter().any(|l| l.contains("security.high")), "{sent:?}");
        }
        let mut msg = decision("alice", serde_json::json!({"decision": "list"}), false);
        msg.reply_to = Some("amq.rabbitmq.reply-to.g1h2AA.abc".into());
        assert_eq!(d.handle(&msg).await.reply.outcome, ReplyOutcome::Listed);
    }

    #[tokio::test]
    async fn decisions_per_approver_are_capped_and_alerted_once_a_minute() {
        let store: Arc<dyn ResultStore> = Arc::new(crate::testing::MemStore::default());
        let mut d = desk(store);
        d.settings.max_decisions_per_minute = 5;
        let list = || decision("alice", serde_json::json!({"decision": "list"}), false);
        let mut outcomes = Vec::new();
        for _ in 0..8 {
            let h = d.handle(&list()).await;
            outcomes.push((h.reply.outcome, h.abuse));
        }
        assert!(outcomes[..5]
            .iter()
            .all(|o| *o == (ReplyOutcome::Listed, false)));
        assert_eq!(outcomes[5], (ReplyOutcome::Refused, true), "the first over");
        assert!(outcomes[6..]
            .iter()
            .all(|o| *o == (ReplyOutcome::Refused, false)));
        // Another approver is not held back by alice.
        let h = d
            .handle(&decision(
                "bob",
                serde_json::json!({"decision": "list"}),
                false,
            ))
            .await;
        assert_eq!(h.reply.outcome, ReplyOutcome::Listed);
        // A new minute, a new budget.
        assert_eq!(d.budget.take("alice", 60 * 1_000_000, 5), Budget::Within);
    }

    #[tokio::test]
    async fn a_redelivered_decision_already_stored_is_answered_as_decided_not_refused() {
        let store: Arc<dyn ResultStore> = Arc::new(crate::testing::MemStore::default());
        let d = desk(store.clone());
        let mut rec = parked();
        rec.required = 1;
        rec.policy_digest = d.policy.digest();
        rec.digest = poller_core::approval::digest(&rec.command_digest, &rec.policy_digest);
        rec.expires_at = crate::clock::unix_now() + 600;
        store
            .park(
                &rec.approval_id,
                &rec.seal(&d.store_key),
                std::time::Duration::from_secs(600),
            )
            .await
            .unwrap();
        let approve = serde_json::json!({
            "decision": "approve", "approval_id": rec.approval_id, "digest": rec.digest, "reason": "ok"
        });
        let first = d.handle(&decision("alice", approve.clone(), false)).await;
        assert_eq!(
            first.reply.outcome,
            ReplyOutcome::Approved,
            "{:?}",
            first.reply
        );
        // The replica died before acking: the broker redelivers the same decision.
        let again = d.handle(&decision("alice", approve.clone(), true)).await;
        assert_eq!(
            again.reply.outcome,
            ReplyOutcome::Approved,
            "{:?}",
            again.reply
        );
        assert_eq!(again.event.outcome, "approved");
        // Not a redelivery, or another approver, or another reason: refused as before.
        let fresh = d.handle(&decision("alice", approve.clone(), false)).await;
        assert_eq!(fresh.reply.outcome, ReplyOutcome::Refused);
        let bob = d.handle(&decision("bob", approve, true)).await;
        assert_eq!(bob.reply.outcome, ReplyOutcome::Refused);
        let stored = Parked::unseal(
            &d.store_key,
            &store.record(&rec.approval_id).await.unwrap().unwrap(),
        )
        .unwrap();
        assert_eq!(stored.approvals.len(), 1, "counted once");
    }
}
