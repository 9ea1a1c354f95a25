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
        command: Option<crate::policy::replay::DecidedCommand>,
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

/// Publishes an audit record without letting a refusal hold back what it records: results and
/// alerts are already out when this runs, and the command is acked whatever the audit exchange
/// says. A refused record is tried once more, then dead-lettered on its own; only a lost
/// connection is an error (the session restarts and the command is redelivered).
pub async fn publish_record(
    publisher: &dyn crate::broker::Publish,
    exchange: &str,
    routing_key: &str,
    dead_letter_exchange: &str,
    record: &AuditRecord,
    user: &str,
) -> Result<AuditOutcome, crate::broker::BrokerError> {
    use crate::broker::Outgoing;
    let body = serde_json::to_vec(record).expect("audit record serializes");
    let msg = Outgoing {
        exchange: exchange.to_owned(),
        routing_key: routing_key.to_owned(),
        body: body.clone(),
        correlation_id: record.action_id.as_ref().map(ToString::to_string),
        message_type: crate::broker::names::message_type::AUDIT,
        // Broker-checked: the sink accepts records from the poller's user only.
        user_id: Some(user.to_owned()),
        ..Default::default()
    };
    let mut tries = 0;
    let last = loop {
        tries += 1;
        match publisher.publish(&msg).await {
            Ok(()) => return Ok(AuditOutcome::Delivered),
            Err(e) if e.is_connection() => return Err(e),
            Err(e) if tries >= 2 => break e,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    };
    tracing::error!(error = %last, "audit record refused twice; dead-lettering it on its own");
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        crate::broker::names::header::REASON.into(),
        crate::broker::names::text(&format!("audit record not accepted by {exchange}: {last}")),
    );
    let dead = Outgoing {
        exchange: dead_letter_exchange.to_owned(),
        routing_key: routing_key.to_owned(),
        headers: Some(headers),
        ..msg
    };
    match publisher.publish(&dead).await {
        Ok(()) => Ok(AuditOutcome::DeadLettered),
        Err(e) if e.is_connection() => Err(e),
        Err(e) => {
            tracing::error!(error = %e, record = %String::from_utf8_lossy(&body), "audit record could not be dead-lettered either; here it is");
            Ok(AuditOutcome::Logged)
        }
    }
}

pub use crate::clock::now_rfc3339 as now;
