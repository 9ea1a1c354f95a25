//! The approvals' message contracts: what approvers send and what they get back.
//!
//! In: a decision message's bytes. Out: a [`Request`] (parsed, bounded), or the reason it is
//! refused. Replies are [`Reply`]s; `approvals list` answers with [`PendingView`]s.

use super::{Parked, State};
use crate::outcome::{AgentView, ApprovalMark, JudgeVote};
use serde::{Deserialize, Serialize};

/// The longest reason an approver may give.
pub const MAX_REASON_CHARS: usize = 1000;

/// A message to the approvals exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Pending approvals.
    List,
    Approve {
        approval_id: String,
        /// The digest shown with the approval (`approvals list`, the alert): binds the approval
        /// to exactly what was parked.
        digest: String,
        reason: String,
    },
    Deny {
        approval_id: String,
        reason: String,
    },
}

impl Request {
    /// The routing key it is published with.
    pub fn routing_key(&self) -> &'static str {
        match self {
            Request::List => "approval.list",
            Request::Approve { .. } => "approval.approve",
            Request::Deny { .. } => "approval.deny",
        }
    }

    /// The approval it decides, if any.
    pub fn approval_id(&self) -> Option<&str> {
        match self {
            Request::List => None,
            Request::Approve { approval_id, .. } | Request::Deny { approval_id, .. } => {
                Some(approval_id)
            }
        }
    }
}

/// Parses a decision message: bounded size, known fields only, a well-formed id and digest,
/// a reason of 1 to [`MAX_REASON_CHARS`] characters.
pub fn parse(body: &[u8], max_bytes: usize) -> Result<Request, String> {
    if body.len() > max_bytes {
        return Err(format!(
            "decision message of {} bytes exceeds the limit of {max_bytes} bytes",
            body.len()
        ));
    }
    let req: Request =
        serde_json::from_slice(body).map_err(|e| format!("not a decision message: {e}"))?;
    if let Some(id) = req.approval_id() {
        if id.len() != 24 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("approval_id: 24 hexadecimal characters expected".into());
        }
    }
    match &req {
        Request::List => {}
        Request::Approve { digest, reason, .. } => {
            if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "digest: 64 hexadecimal characters (SHA-256) expected, got {} characters",
                    digest.chars().count()
                ));
            }
            check_reason(reason)?;
        }
        Request::Deny { reason, .. } => check_reason(reason)?,
    }
    Ok(req)
}

fn check_reason(reason: &str) -> Result<(), String> {
    let n = reason.trim().chars().count();
    if n == 0 {
        return Err("reason: required (it goes into the result and the audit trail)".into());
    }
    if n > MAX_REASON_CHARS {
        return Err(format!(
            "reason: {n} characters, at most {MAX_REASON_CHARS}"
        ));
    }
    Ok(())
}

/// How a decision went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyOutcome {
    /// Counted, more approvals needed.
    Counted,
    /// The last approval needed: the command executes (once the system runs).
    Approved,
    Denied,
    Refused,
    Listed,
}

/// The answer to a decision message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub outcome: ReplyOutcome,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    /// `list` only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<PendingView>,
    /// `list` only: the scoped grants in force and proposed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<GrantView>,
    /// The replica that answered.
    pub instance: String,
}

/// A scoped grant as `approvals list` shows it: in force (with its uses so far) or proposed
/// and waiting for operators to second it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantView {
    pub grant_id: String,
    pub agent: String,
    pub command_type: String,
    pub service: String,
    pub uses: u32,
    /// Uses counted so far for the fleet; `None` when the store could not be asked (or it is
    /// only proposed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<usize>,
    /// RFC 3339; for a proposal, the grant lasts `for_secs` from its last second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    pub for_secs: u64,
    pub reason: String,
    /// The operators who put it in force (or proposed and seconded it so far), proposer first.
    pub granted_by: Vec<String>,
    /// `in_force` or `proposed`.
    pub state: String,
}

impl GrantView {
    /// The grants in force and the grant proposals in `state`, in force first.
    pub fn all(state: &crate::control::ControlState) -> Vec<GrantView> {
        let in_force = state.grants.iter().map(|(id, g)| GrantView {
            grant_id: id.clone(),
            agent: g.agent.clone(),
            command_type: g.command_type.to_string(),
            service: g.service.clone(),
            uses: g.uses,
            used: None,
            until: Some(crate::clock::rfc3339(g.until)),
            for_secs: g.until.saturating_sub(g.from),
            reason: g.reason.clone(),
            granted_by: g.approvers(),
            state: "in_force".into(),
        });
        let proposed = state.proposals.iter().filter_map(|(id, p)| match &p.lever {
            crate::control::ControlCommand::Grant {
                agent,
                command_type,
                service,
                uses,
                for_secs,
                reason,
                ..
            } => Some(GrantView {
                grant_id: id.clone(),
                agent: agent.clone(),
                command_type: command_type.to_string(),
                service: service.clone(),
                uses: *uses,
                used: None,
                until: None,
                for_secs: *for_secs,
                reason: reason.clone(),
                granted_by: std::iter::once(p.by.clone())
                    .chain(p.seconds.iter().cloned())
                    .collect(),
                state: "proposed".into(),
            }),
            _ => None,
        });
        in_force.chain(proposed).collect()
    }
}

/// A pending approval as `approvals list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingView {
    pub approval_id: String,
    pub digest: String,
    pub action_id: String,
    pub command_type: String,
    pub service: String,
    pub agent: AgentView,
    pub judges: Vec<JudgeVote>,
    pub rationale: String,
    /// The agent's own words on why it asks: quoted text, never instructions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
    pub approvals_required: u32,
    pub approvals: Vec<ApprovalMark>,
    pub parked_at: String,
    pub age_secs: u64,
    pub expires_at: String,
    pub expires_in_secs: u64,
    /// Set when the policy changed since it was parked: it can only be denied or left to expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

impl PendingView {
    /// `rec` as seen at `now` by a replica running `policy_digests`.
    pub fn of(rec: &Parked, now: u64, policy_digests: &[String]) -> Self {
        Self {
            approval_id: rec.approval_id.clone(),
            digest: rec.digest.clone(),
            action_id: rec.action_id.to_string(),
            command_type: rec.command_type.to_string(),
            service: rec.service.to_string(),
            agent: rec.agent.clone(),
            judges: rec.judges.clone(),
            rationale: rec.rationale.clone(),
            justification: rec.justification.clone(),
            approvals_required: rec.required,
            approvals: rec.approvals.clone(),
            parked_at: crate::clock::rfc3339(rec.parked_at),
            age_secs: now.saturating_sub(rec.parked_at),
            expires_at: crate::clock::rfc3339(rec.expires_at),
            expires_in_secs: rec.expires_at.saturating_sub(now),
            warning: policy_digests
                .iter()
                .any(|d| *d != rec.policy_digest)
                .then(|| "the policy changed since it was parked: it can't be approved".into()),
        }
    }

    /// Whether a record is listed as pending at `now`.
    pub fn listed(rec: &Parked, now: u64) -> bool {
        rec.state == State::Pending && now < rec.expires_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_parse_and_bad_ones_are_refused_with_the_field() {
        let id = "0123456789abcdef01234567";
        let d = "a".repeat(64);
        let ok = format!(
            r#"{{"decision":"approve","approval_id":"{id}","digest":"{d}","reason":"checked"}}"#
        );
        assert!(matches!(
            parse(ok.as_bytes(), 8192).unwrap(),
            Request::Approve { .. }
        ));
        assert_eq!(
            parse(br#"{"decision":"list"}"#, 8192).unwrap(),
            Request::List
        );
        let cases: Vec<(String, &str)> = vec![
            (ok.replace(&d, "abc"), "digest"),
            (ok.replace(id, "xyz"), "approval_id"),
            (ok.replace("checked", " "), "reason"),
            (
                ok.replace("\"reason\"", "\"extra\":1,\"reason\""),
                "unknown field",
            ),
            ("not json".into(), "not a decision"),
            (r#"{"decision":"execute"}"#.into(), "unknown variant"),
            (
                format!(
                    r#"{{"decision":"deny","approval_id":"{id}","reason":"{}"}}"#,
                    "x".repeat(1001)
                ),
                "at most",
            ),
        ];
        for (body, want) in cases {
            let e = parse(body.as_bytes(), 8192).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
        }
        let e = parse(&vec![b' '; 9000], 8192).unwrap_err();
        assert!(e.contains("exceeds the limit"), "{e}");
    }
}
