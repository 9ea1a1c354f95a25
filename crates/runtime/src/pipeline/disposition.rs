//! What the pipeline decided for one delivery, for the shell to carry out.
//!
//! In: built by [`super::Pipeline::process`]. Out: read by the worker's settlement (one
//! `match`: requeue, or store, publish and ack) and by the metrics (one `match`), so a new
//! variant can't be forgotten in either. Holds the idempotency claim where one was taken.

use crate::intake::ReplyTarget;
use crate::outcome::{Alert, ResultMessage};
use crate::store::ClaimGuard;
use poller_core::audit::AuditEvent;
use poller_core::control::trip::UnapprovedAttempt;

/// The five ways a delivery ends.
#[derive(Debug)]
pub enum Disposition {
    /// Back to the queue unprocessed: paused or halted before the judges or the bridge, a
    /// duplicate still in flight, or the store unavailable. The claim, if one was taken, is
    /// released first.
    Defer {
        why: String,
        claim: Option<ClaimGuard>,
        audit: Vec<AuditEvent>,
    },
    /// Undecodable or oversized: the raw message (or its digest) to the dead-letter queue,
    /// with a REJECTED result when an action_id could be read from it.
    DeadLetter {
        letter: DeadLetter,
        result: Option<ResultMessage>,
        reply: ReplyTarget,
        /// Security's alert when an agent sent an operator lever as a command.
        alerts: Vec<crate::outcome::Alert>,
        audit: Vec<AuditEvent>,
    },
    /// A new final result: stored under the claim (when one was taken: a command refused
    /// before its identity was settled has none) before it is published.
    Conclude {
        outcome: Concluded,
        claim: Option<ClaimGuard>,
    },
    /// A stored result published again (marked as a replay). `claim`: held when it was never
    /// confirmed published, to mark it published once it is; `None` for a confirmed one.
    Replay {
        outcome: Concluded,
        claim: Option<ClaimGuard>,
    },
    /// A lookup answered from the store (`get_action`): to the asker's reply target only, never
    /// on the results exchange; nothing claimed, stored, judged or executed.
    Answer {
        result: ResultMessage,
        reply: ReplyTarget,
        audit: Vec<AuditEvent>,
    },
}

/// A final result and what goes with it.
#[derive(Debug, Clone)]
pub struct Concluded {
    pub result: ResultMessage,
    pub reply: ReplyTarget,
    pub alerts: Vec<Alert>,
    /// What happened, for the audit record (the shell adds what it publishes).
    pub audit: Vec<AuditEvent>,
    /// An unapproved attempt (NEEDS_APPROVAL or BLOCKED), typed, for the trip to count.
    pub unapproved: Option<UnapprovedAttempt>,
    /// The digest of the command, stored with the result.
    pub command_digest: Option<String>,
}

/// Why a raw message goes to the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub field: String,
    pub reason: String,
    pub body: DeadLetterBody,
}

/// What the dead letter carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterBody {
    /// The original payload (within the size limit), for a human to inspect.
    Original,
    /// Over the size limit: never copied or re-published; its digest and size instead.
    Withheld { sha256: String, bytes: usize },
}

/// What a disposition publishes, borrowed: the input of the pure renderer.
#[derive(Debug, Clone, Copy)]
pub struct Publication<'a> {
    pub dead_letter: Option<&'a DeadLetter>,
    pub result: Option<&'a ResultMessage>,
    pub reply: &'a ReplyTarget,
    pub alerts: &'a [Alert],
    pub audit: &'a [AuditEvent],
    /// Whether the result goes to the results exchange (false: to the reply target only).
    pub to_results: bool,
}

impl Disposition {
    /// The claim this delivery holds, taken out for the shell to finish.
    pub fn take_claim(&mut self) -> Option<ClaimGuard> {
        match self {
            Disposition::Defer { claim, .. }
            | Disposition::Conclude { claim, .. }
            | Disposition::Replay { claim, .. } => claim.take(),
            Disposition::DeadLetter { .. } | Disposition::Answer { .. } => None,
        }
    }

    /// What to publish; `None` for a deferred command.
    pub fn publication(&self) -> Option<Publication<'_>> {
        match self {
            Disposition::Defer { .. } => None,
            Disposition::DeadLetter {
                letter,
                result,
                reply,
                alerts,
                audit,
            } => Some(Publication {
                dead_letter: Some(letter),
                result: result.as_ref(),
                reply,
                alerts,
                audit,
                to_results: true,
            }),
            Disposition::Answer {
                result,
                reply,
                audit,
            } => Some(Publication {
                dead_letter: None,
                result: Some(result),
                reply,
                alerts: &[],
                audit,
                to_results: false,
            }),
            Disposition::Conclude { outcome, .. } | Disposition::Replay { outcome, .. } => {
                Some(outcome.publication())
            }
        }
    }

    /// The final result, if any.
    pub fn result(&self) -> Option<&ResultMessage> {
        self.publication().and_then(|p| p.result)
    }
}

impl Concluded {
    pub fn publication(&self) -> Publication<'_> {
        Publication {
            dead_letter: None,
            result: Some(&self.result),
            reply: &self.reply,
            alerts: &self.alerts,
            audit: &self.audit,
            to_results: true,
        }
    }
}
