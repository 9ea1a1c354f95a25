//! The result message: one per command, on `mcp.results` (and the agent's reply queue).

use super::{JudgeVote, Status};
use crate::intake::{ActionId, Agent, AgentId, CommandType, Service, Severity};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentView {
    pub id: AgentId,
    pub verified: bool,
}

impl From<&Agent> for AgentView {
    fn from(a: &Agent) -> Self {
        Self {
            id: a.id.clone(),
            verified: a.verified,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeverityView {
    pub declared: Severity,
    pub effective: Severity,
    /// The agent declared less than the policy's floor for this type.
    pub mismatch: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeSummary {
    /// POSTs made (retries included).
    pub attempts: u32,
    pub ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// An earlier attempt (a replica that crashed or lost its claim) had already sent this
    /// action to the bridge: this call was a re-POST, kept from acting twice only by the
    /// bridge's dedup (see the README's "What the bridge remembers").
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub repost: bool,
    /// This attempt sent nothing: an earlier attempt (a replica that crashed before storing
    /// its result) ran the action, and the bridge's remembered answer was asked for with a
    /// lookup, which never acts. The judges and panel of the attempt that ran it were lost with
    /// it; the rationale says what this attempt would have concluded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub looked_up: bool,
}

/// The body of a result message. Optional fields are absent when the command never got that
/// far (a REJECTED payload has no command type, a BLOCKED one no judges).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultMessage {
    pub action_id: Option<ActionId>,
    pub command_type: Option<CommandType>,
    pub service: Option<Service>,
    pub agent: Option<AgentView>,
    pub status: Status,
    pub rationale: String,
    /// The bridge's JSON answer, on SUCCESS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_result: Option<serde_json::Value>,
    #[serde(default)]
    pub judges: Vec<JudgeVote>,
    /// For a judged command: the decision rule and the count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panel: Option<super::PanelSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub severity: Option<SeverityView>,
    /// For REJECTED: the field at fault (`payload`, `action_id`, `user_id`, `reply_to`...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bridge: Option<BridgeSummary>,
    /// RFC 3339.
    pub received_at: String,
    pub completed_at: String,
    pub poller_instance: String,
    /// True when this delivery judged and executed nothing: the action had already concluded,
    /// and this is its stored result, republished (for a duplicate command, or after a crash
    /// between concluding and confirming publication, when it may already have gone out).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replay: bool,
    /// NEEDS_APPROVAL only: the parked approval the humans decide on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalTicket>,
    /// A final result decided by humans: who approved (or denied), when and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<ApprovalMark>,
    /// A command the judges did not approve, let through by a scoped grant instead of a
    /// human's approval: which grant, which of its uses, who granted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<GrantUse>,
}

/// What a result and its audit record say about the grant that let a command through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantUse {
    pub grant_id: String,
    /// This command's use, counted for the fleet (1 for the first), of `uses`.
    #[serde(rename = "use")]
    pub use_no: u32,
    pub uses: u32,
    /// The operators who put it in force, its proposer first.
    pub granted_by: Vec<String>,
    pub reason: String,
    /// RFC 3339.
    pub until: String,
}

impl GrantUse {
    /// How the rationale says it.
    pub fn words(&self) -> String {
        format!(
            "Let through by grant {} (use {} of {}, granted by {} until {}: {}) instead of a human's approval.",
            self.grant_id,
            self.use_no,
            self.uses,
            self.granted_by.join(", "),
            self.until,
            self.reason
        )
    }
}

/// What a NEEDS_APPROVAL result says about its parked approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalTicket {
    pub approval_id: String,
    /// SHA-256 over the canonical command, its agent and the policy digest: approvers bind
    /// their approval to it (`approve --digest`).
    pub digest: String,
    pub approvals_required: u32,
    /// RFC 3339: after it, the command ends EXPIRED and every decision is refused.
    pub expires_at: String,
}

/// One human decision on a parked command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalMark {
    /// The approver's broker user (the broker checked it).
    pub by: String,
    /// RFC 3339.
    pub at: String,
    pub reason: String,
    /// `approve` or `deny`.
    pub decision: String,
}
