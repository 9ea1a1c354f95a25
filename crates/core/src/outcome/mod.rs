//! Outcome: the last pure stage.
//!
//! In: what the earlier stages decided (rejection, policy decision, panel report, bridge
//! answer). Out: the [`ResultMessage`] published for every command and the [`Alert`]s the
//! policy routes to teams. Building them does no I/O; `crate::poller` publishes them.

mod alert;
mod result;

pub use alert::{alerts_for, lever_attempt, with_defaults, Alert, ApprovalNotice};
pub use result::{
    AgentView, ApprovalMark, ApprovalTicket, BridgeSummary, GrantUse, ResultMessage, SeverityView,
};

use serde::{Deserialize, Serialize};
use std::fmt;

/// A command's final status (the runbook's statuses plus REJECTED for invalid input).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Success,
    NeedsApproval,
    Blocked,
    Failed,
    Rejected,
    /// The bridge ran the action but its answer was lost (and it remembered none): whether it
    /// succeeded is unknown. Never retried automatically; a human checks the service.
    UnknownOutcome,
    /// A NEEDS_APPROVAL command an approver denied: never executed.
    Denied,
    /// A NEEDS_APPROVAL command nobody decided in time: never executed.
    Expired,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Success => "SUCCESS",
            Status::NeedsApproval => "NEEDS_APPROVAL",
            Status::Blocked => "BLOCKED",
            Status::Failed => "FAILED",
            Status::Rejected => "REJECTED",
            Status::UnknownOutcome => "UNKNOWN_OUTCOME",
            Status::Denied => "DENIED",
            Status::Expired => "EXPIRED",
        }
    }

    /// `result.<status in lower case>`.
    pub fn routing_key(self) -> String {
        format!("result.{}", self.as_str().to_ascii_lowercase())
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Alert priority; the second word of the alert routing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    Normal,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
        }
    }
}

/// A team that receives alerts: a lowercase word, the first word of the alert routing key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Team(String);

impl Team {
    pub fn parse(s: &str) -> Result<Self, String> {
        if !s.is_empty()
            && s.len() <= 32
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "team {s:?}: must be 1 to 32 characters of [a-z0-9_-] (it becomes a routing key word)"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Team {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Team::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// How one judge voted, as reported in results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Vote {
    Approve,
    Deny,
    /// A hard rule failed: not approved, whatever the other judges say.
    Veto,
    /// Errored, timed out or gave no clear verdict: counts as not approving.
    Unavailable,
    /// Not waited for: the panel's outcome was already settled.
    Skipped,
}

/// One judge's line in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JudgeVote {
    pub name: String,
    pub verdict: Vote,
    pub reason: String,
    pub ms: u64,
    /// For `unavailable`: what went wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// For `veto`: the hard rule that vetoed (`max_per_agent`, `require_verified_agent`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

/// How the votes decide, per command type (`decision_rule` in `config/policy.toml`). Under
/// every rule a hard-rule veto denies, a vetoing judge that can't answer fails closed, and an
/// unavailable judge never approves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionRule {
    /// A strict majority of the whole panel approves, and at least `quorum` judges answered.
    #[default]
    Majority,
    /// Every judge of the panel approves.
    Unanimous,
    /// Any deny denies; approval needs `quorum` approvals and waits for every judge (or its
    /// deadline), so the slowest judge's deny still counts.
    Veto,
}

impl DecisionRule {
    pub const ALL: [DecisionRule; 3] = [
        DecisionRule::Majority,
        DecisionRule::Unanimous,
        DecisionRule::Veto,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DecisionRule::Majority => "majority",
            DecisionRule::Unanimous => "unanimous",
            DecisionRule::Veto => "veto",
        }
    }

    /// Approvals needed on a panel of `size` with `quorum`.
    pub fn approvals_needed(self, size: usize, quorum: usize) -> usize {
        match self {
            DecisionRule::Majority => size / 2 + 1,
            DecisionRule::Unanimous => size,
            DecisionRule::Veto => quorum.clamp(1, size.max(1)),
        }
    }
}

impl std::str::FromStr for DecisionRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown decision rule {s:?}: majority, unanimous or veto"))
    }
}

impl std::fmt::Display for DecisionRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the panel decided: the rule it applied and the count, in results and the audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PanelSummary {
    pub rule: DecisionRule,
    pub quorum: usize,
    pub size: usize,
    pub approvals: usize,
    /// Denies and hard-rule vetoes.
    pub denials: usize,
    pub unavailable: usize,
    pub approved: bool,
}

/// A unit enum's name as serde writes it (results, alerts, the audit): its one spelling, for
/// labels and logs too.
pub fn wire_name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}
