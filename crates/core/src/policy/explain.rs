//! `policy test`: what the policy would do with one command, with no side effect.
//!
//! In: the policy, a validated command, its agent (taken as broker-verified) and how many
//! earlier attempts of its type it made lately, and the panel's shape.
//! Out: an [`Explanation`]: the handling, the effective severity and any mismatch, the
//! rationale, the judges that would be asked and under which decision rule, and the alerts each
//! possible outcome would send. Pure; rendered as text or JSON.

use super::{Facts, Handling, Policy, Shadow};
use crate::intake::{Command, Severity};
use crate::outcome::DecisionRule;
use crate::outcome::{with_defaults, Priority, Status};
use serde::Serialize;

/// The alerts one possible outcome would send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutcomeAlerts {
    pub status: Status,
    /// `<team>.<priority>` routing keys.
    pub alerts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub command_type: String,
    pub service: String,
    pub handling: Handling,
    pub declared_severity: Severity,
    pub effective_severity: Severity,
    pub severity_mismatch: bool,
    pub rationale: String,
    /// The rule that decided: the type's own, an override or an escalation.
    pub rule: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The agent's groups in this policy.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub agent_groups: Vec<String>,
    /// What each matching shadow rule would have decided (recorded, not enforced).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shadows: Vec<Shadow>,
    /// For JUDGE: the panel's judges, its quorum and the type's decision rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judges: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision_rule: Option<DecisionRule>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quorum: Option<usize>,
    /// Every outcome this handling can end in, with its alerts.
    pub outcomes: Vec<OutcomeAlerts>,
    pub policy_sha256: String,
}

/// The outcomes a command can end in under `handling` (REJECTED and the operator's levers
/// aside).
fn possible(handling: Handling) -> &'static [Status] {
    match handling {
        Handling::Block => &[Status::Blocked],
        Handling::Execute => &[Status::Success, Status::Failed, Status::UnknownOutcome],
        Handling::Judge => &[
            Status::Success,
            Status::Failed,
            Status::UnknownOutcome,
            Status::NeedsApproval,
            Status::Denied,
            Status::Expired,
        ],
    }
}

/// The agent of a `policy test`: its id (taken as verified by the broker) and its earlier
/// attempts of the command's type within any window.
#[derive(Debug, Clone, Default)]
pub struct TestAgent {
    pub id: Option<String>,
    pub earlier_attempts: usize,
}

pub fn explain(
    policy: &Policy,
    cmd: &Command,
    agent: &TestAgent,
    judges: &[String],
    quorum: usize,
) -> Explanation {
    let earlier = agent.earlier_attempts;
    let d = policy.decide(
        cmd,
        &Facts {
            agent: agent.id.as_deref(),
            verified: true,
            earlier_attempts: &|_| earlier,
        },
    );
    let judged = d.handling == Handling::Judge;
    let outcomes = possible(d.handling)
        .iter()
        .map(|&status| OutcomeAlerts {
            status,
            alerts: with_defaults(policy.routes(Some(cmd.command_type), status), status)
                .into_iter()
                .map(|(team, p)| {
                    let p = match p {
                        Priority::High => "high",
                        Priority::Normal => "normal",
                    };
                    format!("{}.{p}", team.as_str())
                })
                .collect(),
        })
        .collect();
    Explanation {
        command_type: cmd.command_type.to_string(),
        service: cmd.service.to_string(),
        handling: d.handling,
        declared_severity: d.declared_severity,
        effective_severity: d.effective_severity,
        severity_mismatch: d.severity_mismatch,
        rationale: d.rationale,
        rule: d.rule,
        agent: agent.id.clone(),
        agent_groups: agent
            .id
            .as_deref()
            .map(|a| policy.groups_of(a).into_iter().map(str::to_owned).collect())
            .unwrap_or_default(),
        shadows: d.shadows,
        judges: judged.then(|| judges.to_vec()),
        decision_rule: judged.then_some(d.decision_rule),
        quorum: judged.then_some(quorum),
        outcomes,
        policy_sha256: policy.digest().to_owned(),
    }
}

impl Explanation {
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let handling = crate::outcome::wire_name(&self.handling);
        let _ = writeln!(out, "command:   {} {}", self.command_type, self.service);
        let _ = writeln!(out, "handling:  {handling}");
        let _ = writeln!(
            out,
            "severity:  declared {}, effective {}{}",
            self.declared_severity,
            self.effective_severity,
            if self.severity_mismatch {
                " (MISMATCH: declared below the type's floor)"
            } else {
                ""
            }
        );
        let _ = writeln!(out, "rationale: {}", self.rationale);
        let _ = writeln!(out, "rule:      {}", self.rule);
        if let Some(a) = &self.agent {
            let groups = if self.agent_groups.is_empty() {
                "no group".to_owned()
            } else {
                format!("groups {}", self.agent_groups.join(", "))
            };
            let _ = writeln!(out, "agent:     {a} ({groups})");
        }
        for s in &self.shadows {
            let _ = writeln!(
                out,
                "shadow:    {} would have {}: {}",
                s.rule,
                s.would_have.as_str(),
                s.rationale
            );
        }
        if let (Some(judges), Some(rule), Some(q)) = (&self.judges, self.decision_rule, self.quorum)
        {
            let _ = writeln!(
                out,
                "judges:    {} (rule {rule}, quorum {q})",
                judges.join(", ")
            );
        }
        for o in &self.outcomes {
            let alerts = if o.alerts.is_empty() {
                "no alert".to_owned()
            } else {
                o.alerts.join(", ")
            };
            let _ = writeln!(out, "if {:<16} {alerts}", o.status.as_str());
        }
        let _ = writeln!(out, "policy:    sha256:{}", self.policy_sha256);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::{decode, DecodeLimits};

    fn cmd(t: &str, service: &str, sev: &str) -> Command {
        let json = format!(
            r#"{{"action_id":"t-1","command_type":"{t}","params":{{"service":"{service}"}},"severity":"{sev}"}}"#
        );
        decode(json.as_bytes(), None, DecodeLimits::default()).unwrap()
    }

    #[test]
    fn the_runbook_commands_explained() {
        let policy = Policy::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/policy.toml"),
        )
        .unwrap();
        let judges = vec![
            "security".to_owned(),
            "compliance".into(),
            "business".into(),
        ];
        let e = explain(
            &policy,
            &cmd("CHECK_INTEGRATION_STATUS", "mailchimp", "LOW"),
            &TestAgent::default(),
            &judges,
            2,
        );
        assert_eq!(e.handling, Handling::Execute);
        assert!(e.judges.is_none());
        let failed = e
            .outcomes
            .iter()
            .find(|o| o.status == Status::Failed)
            .unwrap();
        assert_eq!(failed.alerts, ["ops.normal"]);

        let e = explain(
            &policy,
            &cmd("REFRESH_TOKEN", "google", "MEDIUM"),
            &TestAgent::default(),
            &judges,
            2,
        );
        assert_eq!(e.handling, Handling::Judge);
        assert_eq!(e.decision_rule, Some(DecisionRule::Majority));
        assert_eq!(e.judges.as_deref(), Some(judges.as_slice()));
        let parked = e
            .outcomes
            .iter()
            .find(|o| o.status == Status::NeedsApproval)
            .unwrap();
        assert_eq!(parked.alerts, ["ops.normal"]);
        // What the poller sends whatever the policy routes (none of these is routed here):
        // `policy test` says so, not "no alert".
        for (status, alert) in [
            (Status::UnknownOutcome, "ops.high"),
            (Status::Denied, "ops.normal"),
            (Status::Expired, "ops.normal"),
        ] {
            let o = e.outcomes.iter().find(|o| o.status == status).unwrap();
            assert_eq!(o.alerts, [alert], "{status:?}");
        }

        let e = explain(
            &policy,
            &cmd("CONNECT_INTEGRATION", "salesforce", "LOW"),
            &TestAgent::default(),
            &judges,
            2,
        );
        assert_eq!(e.handling, Handling::Block);
        assert!(e.severity_mismatch);
        assert_eq!(e.effective_severity, Severity::High);
        assert_eq!(e.outcomes.len(), 1);
        assert_eq!(e.outcomes[0].alerts, ["security.high", "engineering.high"]);
        let text = e.text();
        assert!(text.contains("handling:  BLOCK"), "{text}");
        assert!(text.contains("MISMATCH"), "{text}");
    }

    #[test]
    fn the_agent_decides_overrides_and_history_conditions() {
        let base = include_str!("../../../../config/policy.toml");
        let (head, tail) = base.split_at(base.find("\n[commands.").unwrap() + 1);
        let policy = Policy::parse(&format!(
            "{head}[agent_groups]\ntrusted = [\"agent-ops\"]\n\n{tail}\n[[commands.REFRESH_TOKEN.overrides]]\nagent_groups = [\"trusted\"]\naction = \"ALLOW\"\nfloor_severity = \"LOW\"\nrationale = \"Ops refreshes tokens unjudged.\"\n\n[[commands.REFRESH_TOKEN.overrides]]\nservices = [\"meta\"]\naction = \"BLOCK\"\nrationale = \"Meta refreshes would be blocked.\"\nmode = \"shadow\"\n\n[[commands.CHECK_INTEGRATION_STATUS.escalations]]\nattempts_over = 5\nwithin_secs = 300\naction = \"BLOCK\"\nrationale = \"Too many checks.\"\n"
        ))
        .unwrap();
        let judges = vec!["security".to_owned()];
        let ops = TestAgent {
            id: Some("agent-ops".into()),
            earlier_attempts: 0,
        };
        let e = explain(
            &policy,
            &cmd("REFRESH_TOKEN", "google", "LOW"),
            &ops,
            &judges,
            1,
        );
        assert_eq!(e.handling, Handling::Execute);
        assert_eq!(e.rule, "REFRESH_TOKEN.overrides[0]");
        assert_eq!(e.agent_groups, ["trusted"]);
        assert!(e.text().contains("agent:     agent-ops (groups trusted)"));
        let e = explain(
            &policy,
            &cmd("REFRESH_TOKEN", "google", "LOW"),
            &TestAgent::default(),
            &judges,
            1,
        );
        assert_eq!(
            (e.handling, e.rule.as_str()),
            (Handling::Judge, "REFRESH_TOKEN")
        );
        let e = explain(
            &policy,
            &cmd("REFRESH_TOKEN", "meta", "MEDIUM"),
            &TestAgent::default(),
            &judges,
            1,
        );
        assert_eq!(e.handling, Handling::Judge);
        assert_eq!(e.shadows[0].would_have, Handling::Block);
        assert!(
            e.text()
                .contains("shadow:    REFRESH_TOKEN.overrides[1] would have BLOCK"),
            "{}",
            e.text()
        );
        let busy = TestAgent {
            id: Some("agent-x".into()),
            earlier_attempts: 5,
        };
        let e = explain(
            &policy,
            &cmd("CHECK_INTEGRATION_STATUS", "google", "LOW"),
            &busy,
            &judges,
            1,
        );
        assert_eq!(e.handling, Handling::Block);
        assert_eq!(e.rule, "CHECK_INTEGRATION_STATUS.escalations[0]");
    }
}
