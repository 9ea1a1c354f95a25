//! What a tool answers for a poller result, pure.
//!
//! In: the [`ResultMessage`] the poller published. Out: a [`ToolAnswer`]: the result JSON as
//! structured content, a short text for the model, and whether it is a tool error (REJECTED: the
//! command was refused, naming the field).

use crate::outcome::{ResultMessage, Status};

#[derive(Debug, Clone, PartialEq)]
pub struct ToolAnswer {
    pub is_error: bool,
    pub text: String,
    pub structured: serde_json::Value,
}

pub fn answer(r: &ResultMessage) -> ToolAnswer {
    let id = r.action_id.as_ref().map_or("?", |a| a.as_str());
    let text = match r.status {
        Status::Success => format!("SUCCESS (action {id}): {}", r.rationale),
        Status::NeedsApproval => match &r.approval {
            Some(t) => format!(
                "NEEDS_APPROVAL (action {id}): nothing was executed. A human must approve it ({} approval(s), approval id {}) before {}; otherwise it ends EXPIRED. Call get_action with action_id {id} to follow it to its final status. Why: {}",
                t.approvals_required, t.approval_id, t.expires_at, r.rationale
            ),
            None => format!(
                "NEEDS_APPROVAL (action {id}): nothing was executed; a human must approve it. {}",
                r.rationale
            ),
        },
        Status::Blocked => format!(
            "BLOCKED (action {id}): {} Humans were alerted; the request is recorded, not executed.",
            r.rationale
        ),
        Status::Rejected => format!(
            "REJECTED (action {id}){}: {}",
            r.error_field
                .as_deref()
                .map(|f| format!(", field {f}"))
                .unwrap_or_default(),
            r.rationale
        ),
        Status::Failed => format!(
            "FAILED (action {id}): {} The action did not complete; it may be retried under a new action_id.",
            r.rationale
        ),
        Status::UnknownOutcome => format!(
            "UNKNOWN_OUTCOME (action {id}): {} Do not retry; humans were alerted to check.",
            r.rationale
        ),
        Status::Denied => format!("DENIED (action {id}): {}", r.rationale),
        Status::Expired => format!("EXPIRED (action {id}): {}", r.rationale),
    };
    ToolAnswer {
        is_error: r.status == Status::Rejected,
        text: if r.replay {
            format!("{text} (the stored outcome)")
        } else {
            text
        },
        structured: serde_json::to_value(r).expect("a result serializes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::ApprovalTicket;

    fn result(status: Status) -> ResultMessage {
        serde_json::from_value(serde_json::json!({
            "action_id": "a-1", "command_type": "REFRESH_TOKEN", "service": "google",
            "agent": {"id": "agent-7", "verified": true}, "status": status,
            "rationale": "why", "received_at": "t", "completed_at": "t", "poller_instance": "p"
        }))
        .unwrap()
    }

    #[test]
    fn each_status_says_what_happened_and_only_a_rejection_is_a_tool_error() {
        let mut r = result(Status::NeedsApproval);
        r.approval = Some(ApprovalTicket {
            approval_id: "0".repeat(24),
            digest: "d".repeat(64),
            approvals_required: 2,
            expires_at: "2026-11-27T20:00:00Z".into(),
        });
        let a = answer(&r);
        assert!(!a.is_error);
        assert!(a.text.contains("2 approval(s)") && a.text.contains("2026-11-27T20:00:00Z"));
        assert!(a.text.contains("get_action"));
        assert_eq!(a.structured["approval"]["approvals_required"], 2);
        let a = answer(&result(Status::Blocked));
        assert!(a.text.contains("Humans were alerted") && !a.is_error);
        let mut r = result(Status::Rejected);
        r.error_field = Some("params.service".into());
        let a = answer(&r);
        assert!(
            a.is_error && a.text.contains("field params.service"),
            "{}",
            a.text
        );
        for s in [
            Status::Success,
            Status::Failed,
            Status::UnknownOutcome,
            Status::Denied,
            Status::Expired,
        ] {
            assert!(!answer(&result(s)).is_error);
            assert!(answer(&result(s)).text.starts_with(s.as_str()));
        }
    }
}
