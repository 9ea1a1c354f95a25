//! The approval rules, pure and fail-closed.
//!
//! In: a [`Parked`] record, a decision (who, approve or deny, the digest they bound to, why)
//! and what the deciding replica knows (the approvers, the time, the policy digest now). Out:
//! the next record and what happened, or a [`Refusal`] with its reason (marked as abuse when
//! security must hear of it). [`sweep`] says what a replica's sweep does with a record.

use super::{Parked, State};
use crate::outcome::ApprovalMark;

/// One approver's decision, as the desk parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    Approve { digest: String },
    Deny,
}

/// What the deciding replica knows besides the record.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    /// `approval.approvers`.
    pub approvers: &'a [String],
    /// Unix seconds.
    pub now: u64,
    /// The digests of the policy in force: the one the replica runs and the file as it is now
    /// (they differ when the file changed since the replica started). A record parked under
    /// another policy can't be approved.
    pub policy_digests: &'a [String],
}

/// What a decision did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Counted; `have` of `need` approvals so far.
    Counted {
        have: usize,
        need: u32,
    },
    /// The M-th approval: the command is to be executed.
    Approved,
    Denied,
}

/// A refused decision: nothing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: String,
    /// Someone tried what they may not (a non-approver, an agent deciding its own command):
    /// security is alerted.
    pub abuse: bool,
}

fn refuse(reason: impl Into<String>) -> Refusal {
    Refusal {
        reason: reason.into(),
        abuse: false,
    }
}

fn abuse(reason: impl Into<String>) -> Refusal {
    Refusal {
        reason: reason.into(),
        abuse: true,
    }
}

/// Applies `by`'s decision to `rec`. `reason` is the approver's (already checked non-empty).
pub fn decide(
    rec: &Parked,
    by: &str,
    choice: &Choice,
    reason: &str,
    ctx: &Context<'_>,
) -> Result<(Parked, Verdict), Refusal> {
    if !ctx.approvers.iter().any(|a| a == by) {
        return Err(abuse(format!(
            "{by} is not an approver (approval.approvers): only listed approvers decide"
        )));
    }
    if by == rec.agent.id.as_str() || rec.publisher.as_deref() == Some(by) {
        return Err(abuse(format!(
            "{by} sent this command: the requester never decides its own command"
        )));
    }
    match rec.state {
        State::Pending => {}
        State::Approved => {
            return Err(refuse(
                "already approved: the approval has been consumed and the command executes once",
            ))
        }
        State::Denied => return Err(refuse("already denied: it will never be executed")),
        State::Expired => return Err(refuse("expired: it will never be executed")),
    }
    if ctx.now >= rec.expires_at {
        return Err(refuse(format!(
            "expired at {}: it will never be executed",
            crate::clock::rfc3339(rec.expires_at)
        )));
    }
    let mark = ApprovalMark {
        by: by.to_owned(),
        at: crate::clock::rfc3339(ctx.now),
        reason: reason.to_owned(),
        decision: String::new(),
    };
    let mut next = rec.clone();
    match choice {
        Choice::Deny => {
            next.state = State::Denied;
            next.denial = Some(ApprovalMark {
                decision: "deny".into(),
                ..mark
            });
            next.decided_at = Some(ctx.now);
            Ok((next, Verdict::Denied))
        }
        Choice::Approve { digest } => {
            if digest != &rec.digest {
                return Err(refuse(format!(
                    "digest mismatch: you approved {digest}, the parked command is {}; look at it again (`command-poller approvals list`) and approve what is parked",
                    rec.digest
                )));
            }
            if let Some(now) = ctx.policy_digests.iter().find(|d| **d != rec.policy_digest) {
                return Err(refuse(format!(
                    "the policy changed since this command was parked (parked under policy {}, now {}): it can't be approved as decided then; deny it, or let it expire and have the agent send it again",
                    short(&rec.policy_digest),
                    short(now)
                )));
            }
            if rec.approvals.iter().any(|a| a.by == by) {
                return Err(refuse(format!(
                    "{by} has already approved it: each approver counts once ({} of {} so far)",
                    rec.approvals.len(),
                    rec.required
                )));
            }
            next.approvals.push(ApprovalMark {
                decision: "approve".into(),
                ..mark
            });
            if next.approvals.len() >= rec.required as usize {
                next.state = State::Approved;
                next.decided_at = Some(ctx.now);
                Ok((next, Verdict::Approved))
            } else {
                let have = next.approvals.len();
                Ok((
                    next,
                    Verdict::Counted {
                        have,
                        need: rec.required,
                    },
                ))
            }
        }
    }
}

fn short(digest: &str) -> &str {
    &digest[..digest.len().min(12)]
}

/// What a sweep does with a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sweep {
    /// Closed: nothing.
    Nothing,
    /// Still pending and in time; tell the webhook (first time) or remind it.
    Notify { reminder: bool },
    /// Pending past its expiry: expire it (compare-and-set; one replica wins).
    Expire,
    /// Decided (approved, denied, expired) but its final result not yet published.
    Finalize,
}

/// What to do with `rec` at `now` (`remind_before`: seconds before expiry; `webhook`: whether
/// one is configured).
pub fn sweep(rec: &Parked, now: u64, remind_before: u64, webhook: bool) -> Sweep {
    if rec.finalized.is_some() {
        return Sweep::Nothing;
    }
    match rec.state {
        State::Pending if now >= rec.expires_at => Sweep::Expire,
        State::Pending if webhook && !rec.notified => Sweep::Notify { reminder: false },
        State::Pending if webhook && !rec.reminded && now + remind_before >= rec.expires_at => {
            Sweep::Notify { reminder: true }
        }
        State::Pending => Sweep::Nothing,
        State::Approved | State::Denied | State::Expired => Sweep::Finalize,
    }
}

/// Whether an approved record may be executed: only when the command's key holds the sealed
/// NEEDS_APPROVAL result that parked it, for the same approval and the same command digest
/// (`parked`: what the key holds, already unsealed with the store key). A record without it was
/// not parked by a poller for that command (planted with a stolen or template key, or its
/// command's result replaced): never executed. The reason is `Err`.
pub fn backed(rec: &Parked, parked: Option<&crate::store::StoredOutcome>) -> Result<(), String> {
    let Some(stored) = parked else {
        return Err(format!(
            "no NEEDS_APPROVAL result is stored under {}",
            rec.action_key
        ));
    };
    if stored.result.status != crate::outcome::Status::NeedsApproval {
        return Err(format!(
            "the result stored under {} is {}, not NEEDS_APPROVAL",
            rec.action_key, stored.result.status
        ));
    }
    let ticket = stored
        .result
        .approval
        .as_ref()
        .map(|t| t.approval_id.as_str());
    if ticket != Some(rec.approval_id.as_str()) {
        return Err(format!(
            "the NEEDS_APPROVAL result under {} names another approval ({})",
            rec.action_key,
            ticket.unwrap_or("none")
        ));
    }
    if stored.command_digest.as_deref() != Some(rec.command_digest.as_str()) {
        return Err(format!(
            "the NEEDS_APPROVAL result under {} is for another command (its digest differs)",
            rec.action_key
        ));
    }
    Ok(())
}

/// The record expired at `now`.
pub fn expire(rec: &Parked, now: u64) -> Parked {
    Parked {
        state: State::Expired,
        decided_at: Some(now),
        ..rec.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::parked;
    use super::*;

    fn ctx<'a>(approvers: &'a [String], policy: &'a [String]) -> Context<'a> {
        Context {
            approvers,
            now: 1100,
            policy_digests: policy,
        }
    }

    fn approvers() -> Vec<String> {
        vec!["alice".into(), "bob".into(), "agent-7".into()]
    }

    fn policy() -> Vec<String> {
        vec!["p".repeat(64)]
    }

    fn approve(rec: &Parked) -> Choice {
        Choice::Approve {
            digest: rec.digest.clone(),
        }
    }

    #[test]
    fn m_distinct_approvers_approve_and_the_same_one_twice_does_not_count() {
        let (a, p) = (approvers(), policy());
        let rec = parked();
        let (rec, v) = decide(&rec, "alice", &approve(&rec), "ok", &ctx(&a, &p)).unwrap();
        assert_eq!(v, Verdict::Counted { have: 1, need: 2 });
        assert_eq!(rec.state, State::Pending);
        let again = decide(&rec, "alice", &approve(&rec), "ok", &ctx(&a, &p)).unwrap_err();
        assert!(again.reason.contains("counts once"), "{again:?}");
        assert!(!again.abuse);
        let (rec, v) = decide(&rec, "bob", &approve(&rec), "fine", &ctx(&a, &p)).unwrap();
        assert_eq!(v, Verdict::Approved);
        assert_eq!(rec.state, State::Approved);
        assert_eq!(rec.approvals.len(), 2);
        assert_eq!(rec.approvals[1].by, "bob");
        // Consumed: a further approval is refused.
        let late = decide(&rec, "carol", &approve(&rec), "x", &ctx(&a, &p)).unwrap_err();
        assert!(late.abuse, "carol is not an approver");
        let late = decide(&rec, "alice", &approve(&rec), "x", &ctx(&a, &p)).unwrap_err();
        assert!(late.reason.contains("consumed"), "{late:?}");
    }

    #[test]
    fn the_requester_never_decides_its_own_command_even_when_listed() {
        let (a, p) = (approvers(), policy());
        let rec = parked();
        for choice in [approve(&rec), Choice::Deny] {
            let r = decide(&rec, "agent-7", &choice, "mine", &ctx(&a, &p)).unwrap_err();
            assert!(r.abuse && r.reason.contains("requester"), "{r:?}");
        }
        // Nor the broker user that published it under another agent name.
        let mut other = parked();
        other.publisher = Some("bob".into());
        let r = decide(&other, "bob", &approve(&other), "x", &ctx(&a, &p)).unwrap_err();
        assert!(r.abuse);
    }

    #[test]
    fn a_non_approver_is_refused_as_abuse() {
        let (a, p) = (approvers(), policy());
        let rec = parked();
        let r = decide(&rec, "mallory", &approve(&rec), "x", &ctx(&a, &p)).unwrap_err();
        assert!(r.abuse && r.reason.contains("not an approver"));
    }

    #[test]
    fn one_deny_denies_and_nothing_is_decided_after_it() {
        let (a, p) = (approvers(), policy());
        let rec = parked();
        let (rec, _) = decide(&rec, "alice", &approve(&rec), "ok", &ctx(&a, &p)).unwrap();
        let (rec, v) = decide(&rec, "bob", &Choice::Deny, "no", &ctx(&a, &p)).unwrap();
        assert_eq!(v, Verdict::Denied);
        assert_eq!(rec.state, State::Denied);
        assert_eq!(rec.denial.as_ref().unwrap().by, "bob");
        let r = decide(&rec, "alice", &approve(&rec), "x", &ctx(&a, &p)).unwrap_err();
        assert!(r.reason.contains("denied"));
    }

    #[test]
    fn a_wrong_digest_or_a_changed_policy_refuses_the_approval_but_not_a_deny() {
        let (a, p) = (approvers(), policy());
        let rec = parked();
        let wrong = Choice::Approve {
            digest: "0".repeat(64),
        };
        let r = decide(&rec, "alice", &wrong, "x", &ctx(&a, &p)).unwrap_err();
        assert!(r.reason.contains("digest mismatch") && !r.abuse, "{r:?}");
        let changed = vec!["p".repeat(64), "q".repeat(64)];
        let r = decide(&rec, "alice", &approve(&rec), "x", &ctx(&a, &changed)).unwrap_err();
        assert!(r.reason.contains("policy changed"), "{r:?}");
        assert!(decide(&rec, "alice", &Choice::Deny, "x", &ctx(&a, &changed)).is_ok());
    }

    #[test]
    fn after_expiry_every_decision_is_refused() {
        let (a, p) = (approvers(), policy());
        let rec = parked();
        let mut late = ctx(&a, &p);
        late.now = rec.expires_at;
        for choice in [approve(&rec), Choice::Deny] {
            let r = decide(&rec, "alice", &choice, "x", &late).unwrap_err();
            assert!(r.reason.contains("expired"), "{r:?}");
        }
        let expired = expire(&rec, 2000);
        let r = decide(&expired, "alice", &Choice::Deny, "x", &ctx(&a, &p)).unwrap_err();
        assert!(r.reason.contains("expired"));
    }

    /// Only the NEEDS_APPROVAL result that parked this record, for this command, backs it.
    #[test]
    fn an_approved_record_is_executed_only_over_its_own_needs_approval_result() {
        use crate::outcome::{ResultMessage, Status};
        use crate::store::StoredOutcome;
        let rec = parked();
        let mut result: ResultMessage = serde_json::from_value(serde_json::json!({
            "status": "NEEDS_APPROVAL", "rationale": "not approved by the judges",
            "received_at": "2026-11-27T00:00:00Z", "completed_at": "2026-11-27T00:00:01Z",
            "poller_instance": "p-1",
        }))
        .unwrap();
        result.approval = Some(rec.ticket());
        let own = StoredOutcome {
            published: true,
            result,
            command_digest: Some(rec.command_digest.clone()),
        };
        assert_eq!(backed(&rec, Some(&own)), Ok(()));
        assert!(backed(&rec, None)
            .unwrap_err()
            .contains("no NEEDS_APPROVAL"));
        let other_command = StoredOutcome {
            command_digest: Some("d".repeat(64)),
            ..own.clone()
        };
        assert!(backed(&rec, Some(&other_command))
            .unwrap_err()
            .contains("another command"));
        let undigested = StoredOutcome {
            command_digest: None,
            ..own.clone()
        };
        assert!(backed(&rec, Some(&undigested)).is_err());
        let mut other_ticket = own.clone();
        other_ticket.result.approval.as_mut().unwrap().approval_id = "appr-other".into();
        assert!(backed(&rec, Some(&other_ticket))
            .unwrap_err()
            .contains("another approval"));
        let mut untracked = own.clone();
        untracked.result.approval = None;
        assert!(backed(&rec, Some(&untracked)).is_err());
        let mut executed = own;
        executed.result.status = Status::Success;
        assert!(backed(&rec, Some(&executed))
            .unwrap_err()
            .contains("SUCCESS"));
    }

    #[test]
    fn a_sweep_expires_notifies_reminds_and_finalizes() {
        let mut rec = parked();
        assert_eq!(sweep(&rec, 1100, 300, false), Sweep::Nothing);
        assert_eq!(
            sweep(&rec, 1100, 300, true),
            Sweep::Notify { reminder: false }
        );
        rec.notified = true;
        assert_eq!(sweep(&rec, 1100, 300, true), Sweep::Nothing);
        assert_eq!(
            sweep(&rec, 1600, 300, true),
            Sweep::Notify { reminder: true }
        );
        rec.reminded = true;
        assert_eq!(sweep(&rec, 1600, 300, true), Sweep::Nothing);
        assert_eq!(sweep(&rec, 1900, 300, true), Sweep::Expire);
        let rec = expire(&rec, 1900);
        assert_eq!(sweep(&rec, 1900, 300, true), Sweep::Finalize);
        let done = Parked {
            finalized: Some(crate::outcome::Status::Expired),
            ..rec
        };
        assert_eq!(sweep(&done, 5000, 300, true), Sweep::Nothing);
    }
}
