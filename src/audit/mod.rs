//! Audit: what the runbook's investigators work from.
//!
//! In: what the pipeline and the control plane decided. Out: one [`AuditRecord`] per command
//! (all its events together) and one per control change, published to the audit exchange and
//! confirmed before the command is acked; [`chain`] appends them to a hash-chained JSON-lines
//! file that can be verified and queried.

pub mod chain;
pub mod sink;

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
        handling: String,
        declared_severity: String,
        effective_severity: String,
        severity_mismatch: bool,
        rationale: String,
        /// SHA-256 of the policy file that decided.
        policy_sha256: String,
    },
    JudgeVerdict {
        at: String,
        judge: String,
        verdict: String,
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
        status: String,
        routing_key: String,
        rationale: String,
    },
    AlertSent {
        at: String,
        team: String,
        priority: String,
    },
    ControlChange {
        at: String,
        kind: String,
        actor: String,
        request_id: String,
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
    pub action_id: Option<String>,
    pub agent: Option<String>,
    pub instance: String,
    pub at: String,
    pub events: Vec<AuditEvent>,
}

pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
