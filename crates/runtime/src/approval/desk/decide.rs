//! One decision message, from the wire to its answer: who sent it and whether they may
//! ([`Desk::admit`]), then the decision on the parked record under compare-and-set
//! ([`Desk::decide_on`]).

use super::*;

/// Why a decision message is refused, and whether that is abuse (security is alerted).
struct Refusal {
    why: String,
    abuse: bool,
}

impl Refusal {
    fn new(why: String, abuse: bool) -> Self {
        Self { why, abuse }
    }
}

impl Desk {
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
        let (by, req) = match self.admit(msg, &mut event, now) {
            Ok(admitted) => admitted,
            Err(r) => return self.refuse(event, r.why, r.abuse, None),
        };
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
        let decision = Decision {
            by: &by,
            id: &id,
            choice: &choice,
            reason: reason.trim(),
            redelivered: msg.redelivered,
        };
        self.decide_on(decision, event, now).await
    }

    /// A refusal: answered, logged, and alerted as abuse when it is.
    fn refuse(
        &self,
        mut event: ApprovalEvent,
        why: String,
        abuse: bool,
        rec: Option<Parked>,
    ) -> Handled {
        tracing::warn!(by = %event.by, approval_id = ?event.approval_id, why = %why, abuse, "approval decision refused");
        event.refusal = Some(why.clone());
        self.answer(ReplyOutcome::Refused, why, event, abuse, rec)
    }

    /// The message's sender and request, when they may send it: answers to direct reply-to
    /// only, within the sender's budget, readable, from a listed approver. Fills in `event`.
    fn admit(
        &self,
        msg: &Inbound,
        event: &mut ApprovalEvent,
        now: u64,
    ) -> Result<(String, Request), Refusal> {
        // Answers go to direct reply-to only: any other `reply_to` would make this replica
        // publish, as the poller's user, into a queue of the decider's choosing.
        if let Some(rt) = msg.reply_to.as_deref() {
            if !crate::broker::names::is_direct_reply_to(rt) {
                return Err(Refusal::new(
                    format!("answers go to direct reply-to (amq.rabbitmq.reply-to) only; this decision asked for {rt:?}"),
                    true,
                ));
            }
        }
        match self
            .budget
            .take(&event.by, now, self.settings.max_decisions_per_minute)
        {
            Budget::Within => {}
            over => {
                return Err(Refusal::new(
                    format!(
                        "more than {} decision messages this minute from this user",
                        self.settings.max_decisions_per_minute
                    ),
                    over == Budget::JustOver,
                ))
            }
        }
        let req = match wire::parse(&msg.body, self.settings.max_decision_bytes) {
            Ok(r) => r,
            // From someone who is not an approver, even a malformed message is abuse.
            Err(why) => return Err(Refusal::new(why, !self.is_approver(msg.user_id.as_deref()))),
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
            return Err(Refusal::new(
                "the message has no user_id: decisions must carry the broker-checked user_id"
                    .into(),
                true,
            ));
        };
        if !self.is_approver(Some(&by)) {
            return Err(Refusal::new(
                format!(
                    "{by} is not an approver (approval.approvers): only listed approvers decide"
                ),
                true,
            ));
        }
        Ok((by, req))
    }
}

/// An approver's decision on one parked record.
struct Decision<'a> {
    by: &'a str,
    id: &'a str,
    choice: &'a Choice,
    reason: &'a str,
    redelivered: bool,
}

impl Desk {
    /// Decides on the parked record: read it, check it, `rules::decide`, then compare-and-set
    /// (deciding again on what is there when it changed in between).
    async fn decide_on(&self, d: Decision<'_>, mut event: ApprovalEvent, now: u64) -> Handled {
        let id = d.id;
        for _ in 0..SWAP_TRIES {
            let stored = match self.store.record(id).await {
                Ok(Some(s)) => s,
                Ok(None) => {
                    let why = format!("unknown approval id {id} (or past its retention)");
                    return self.refuse(event, why, false, None);
                }
                Err(e) => {
                    let why = format!("the store is unavailable ({e}); nothing changed, try again");
                    return self.refuse(event, why, false, None);
                }
            };
            let rec = match Parked::unseal(&self.store_key, &stored) {
                Ok(r) => r,
                Err(e) => {
                    let why = format!("the parked record of {id} failed its integrity check ({e}): refused, nothing changed");
                    return self.refuse(event, why, true, None);
                }
            };
            event.action_id = Some(rec.action_id.to_string());
            event.agent = Some(rec.agent.id.to_string());
            let ctx = rules::Context {
                approvers: &self.settings.approvers,
                now,
                policy_digests: &self.policy_digests(),
            };
            let (next, verdict) = match rules::decide(&rec, d.by, d.choice, d.reason, &ctx) {
                Ok(decided) => decided,
                Err(r) => return self.undecided(&d, r, rec, event),
            };
            match self
                .store
                .swap(id, &stored, &next.seal(&self.store_key), true)
                .await
            {
                Ok(true) => {}
                // Changed in between (another decision, a sweep): decide again on what is there.
                Ok(false) => continue,
                Err(e) => {
                    let why = format!("the store is unavailable ({e}); nothing changed, try again");
                    return self.refuse(event, why, false, Some(rec));
                }
            }
            let (outcome, message) = verdict_message(&verdict, &next);
            event.outcome = wire_name(outcome);
            if next.state != State::Pending {
                self.state
                    .metrics
                    .approval_decided(now.saturating_sub(next.parked_at));
                self.wake.notify_one();
            }
            tracing::info!(by = %d.by, approval_id = %id, outcome = %event.outcome, "approval decision");
            return self.answer(outcome, message, event, false, Some(next));
        }
        let why = "the approval changed too often while deciding; try again".into();
        self.refuse(event, why, false, None)
    }

    /// A decision the rules refuse. A redelivery of a decision already stored (the replica
    /// that stored it died before acking) is answered as it was, and its event and audit record
    /// go out now, instead of "already decided".
    fn undecided(
        &self,
        d: &Decision<'_>,
        r: rules::Refusal,
        rec: Parked,
        mut event: ApprovalEvent,
    ) -> Handled {
        let redelivered = d
            .redelivered
            .then(|| already_decided(&rec, d.by, d.choice, d.reason))
            .flatten();
        match redelivered {
            Some(outcome) => {
                event.outcome = wire_name(outcome);
                tracing::info!(by = %d.by, approval_id = %d.id, "a redelivered decision that was already stored: answered as decided");
                Handled {
                    repeat: true,
                    ..self.answer(
                        outcome,
                        "this decision was already recorded (a redelivery): answered as decided"
                            .into(),
                        event,
                        false,
                        Some(rec),
                    )
                }
            }
            None => self.refuse(event, r.reason, r.abuse, Some(rec)),
        }
    }
}

/// The answer to a decision that was stored.
fn verdict_message(verdict: &Verdict, next: &Parked) -> (ReplyOutcome, String) {
    match verdict {
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
