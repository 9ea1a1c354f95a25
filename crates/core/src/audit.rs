//! The audit record: what the runbook's investigators work from.
//!
//! In: what the pipeline and the control plane decided. Out: one [`AuditRecord`] per command
//! (all its events together) and one per control change, as typed values; the shell publishes
//! them and the audit sink chains them.

use crate::intake::{CommandType, Service};
use serde::{Deserialize, Serialize};

/// One thing that happened to a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AuditEvent {
    Received {
        at: String,
        /// SHA-256 of the raw payload, so the record proves what was received without holding it.
        payload_sha256: String,
        payload_bytes: usize,
        routing_key: String,
        redelivered: bool,
    },
    Rejected {
        at: String,
        field: String,
        reason: String,
    },
    PolicyDecision {
        at: String,
        handling: crate::policy::Handling,
        declared_severity: crate::intake::Severity,
        effective_severity: crate::intake::Severity,
        severity_mismatch: bool,
        rationale: String,
        /// SHA-256 of the policy file that decided.
        policy_sha256: String,
        /// The validated command fields the policy decided on (never the payload), so
        /// `policy replay` can decide it again under a candidate policy. Absent in records
        /// written before they were recorded.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        command: Option<DecidedCommand>,
        /// The rule that decided (`REFRESH_TOKEN`, `REFRESH_TOKEN.overrides[0]`, ...).
        #[serde(skip_serializing_if = "Option::is_none", default)]
        rule: Option<String>,
        /// What each matching shadow rule would have decided instead.
        #[serde(skip_serializing_if = "Vec::is_empty", default)]
        shadows: Vec<crate::policy::Shadow>,
    },
    /// The policy was reloaded (or a reload was refused) on this replica.
    PolicyReload {
        at: String,
        /// Who asked: an operator's broker user, or `SIGHUP`.
        by: String,
        before: String,
        /// The digest in force after (the same as `before` when refused).
        after: String,
        /// Why it was refused; the old policy stayed.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        refused: Option<String>,
    },
    /// How the panel decided: its rule and the count (before each judge's verdict).
    PanelDecision {
        at: String,
        #[serde(flatten)]
        summary: crate::outcome::PanelSummary,
    },
    JudgeVerdict {
        at: String,
        judge: String,
        verdict: crate::outcome::Vote,
        reason: String,
        ms: u64,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        cause: Option<String>,
    },
    BridgeCall {
        at: String,
        attempts: u32,
        ms: u64,
        outcome: String,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        error: Option<String>,
        /// The bridge answer's own status field ("success"), never its content.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        integration_status: Option<String>,
    },
    Deferred {
        at: String,
        reason: String,
    },
    /// A duplicate: the stored result was republished, nothing was judged or executed.
    Replayed {
        at: String,
        original_completed_at: String,
        original_instance: String,
    },
    DeadLettered {
        at: String,
        reason: String,
    },
    ResultPublished {
        at: String,
        status: crate::outcome::Status,
        routing_key: String,
        rationale: String,
    },
    AlertSent {
        at: String,
        team: String,
        priority: crate::outcome::Priority,
    },
    /// A NEEDS_APPROVAL command parked for approvers.
    ApprovalParked {
        at: String,
        approval_id: String,
        digest: String,
        approvals_required: u32,
        expires_at: String,
    },
    /// A human decision on a parked command, or its refusal, or the expiry.
    ApprovalDecision {
        at: String,
        approval_id: String,
        /// The approver's broker user (broker-checked); `poller` for an expiry.
        by: String,
        /// `approve`, `deny`, `expire`.
        decision: String,
        /// The digest the approver bound to (approvals only).
        #[serde(skip_serializing_if = "Option::is_none", default)]
        digest: Option<String>,
        reason: String,
        /// `counted`, `approved`, `denied`, `refused`, `expired`.
        outcome: String,
        /// Why it was refused.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        refusal: Option<String>,
    },
    /// A command the judges did not approve, let through by a scoped grant (one of its uses
    /// counted for the fleet) instead of being parked for approvers.
    GrantUsed {
        at: String,
        #[serde(flatten)]
        grant: crate::outcome::GrantUse,
    },
    ControlChange {
        at: String,
        kind: String,
        actor: String,
        request_id: String,
        /// The mode after the change, as serde spells it (`RUNNING`, `PAUSED`, `HALTED`).
        mode: String,
        reason: String,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        detail: Option<String>,
    },
}

/// One audit message: a command's events together, or one control change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// "command" or "control".
    pub kind: String,
    pub action_id: Option<crate::intake::ActionId>,
    pub agent: Option<crate::intake::AgentId>,
    pub instance: String,
    pub at: String,
    pub events: Vec<AuditEvent>,
}

/// Where an audit record ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOutcome {
    /// Confirmed on the audit exchange.
    Delivered,
    /// The audit exchange refused it twice (unroutable: its queue gone, or nacked): it went to
    /// the dead-letter exchange with the reason, for a human to replay into the chain.
    DeadLettered,
    /// Refused there too: written to the log in full at error level, the last place left.
    Logged,
}

/// The validated fields of a decided command, as the audit records them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecidedCommand {
    pub command_type: CommandType,
    pub service: Service,
    pub agent: String,
    pub agent_verified: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    /// Topic exchange audit records are published to (`audit.command`, `audit.control`).
    pub exchange: String,
    /// The stream bound `audit.#`, read by `command-poller audit sink`.
    pub queue: String,
    /// Broker users whose records the sink accepts (the poller's); a record published by anyone
    /// else (checked `user_id`) is refused: dead-lettered with the reason, not appended.
    pub publishers: Vec<String>,
    /// Environment variable holding the chain key: with it the chain's links are HMACs, so
    /// rewriting the file needs the key; `audit verify` reads the same variable. Never logged.
    pub chain_key_env: String,
}

pub use crate::clock::now_rfc3339 as now;
