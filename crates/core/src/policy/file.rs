//! The policy file's format (`config/policy.toml`): a rule per command type, its overrides for
//! services and agent groups, its escalations on an agent's history, and where alerts go.
//! Parsed by serde with unknown keys refused; checked whole by [`super::Policy::parse`].

use crate::intake::{CommandType, Severity};
use crate::outcome::DecisionRule;
use crate::outcome::{Priority, Status, Team};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What the policy says to do with a command type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PolicyAction {
    Allow,
    Judge,
    Block,
}

/// Which teams hear about an outcome, and how loudly.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRoute {
    /// The result status that triggers this route.
    pub on: Status,
    pub teams: Vec<Team>,
    pub priority: Priority,
}

/// One command type's rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub action: PolicyAction,
    /// The lowest severity this type is handled at, whatever the agent declares.
    pub floor_severity: Severity,
    /// Said in the result (and alerts) when this rule decides the outcome.
    pub rationale: String,
    #[serde(default)]
    pub alerts: Vec<AlertRoute>,
    /// How the judges' votes decide a judged command of this type: `majority` (the default),
    /// `unanimous` or `veto` (any deny denies). `command-poller judges eval` measures each.
    #[serde(default)]
    pub decision_rule: DecisionRule,
    /// Distinct approvers whose approval executes a NEEDS_APPROVAL command of this type
    /// (M of the configured N). At least 1.
    #[serde(default = "one")]
    pub approvals_required: u32,
    /// How long a NEEDS_APPROVAL command waits for its approvers (`approval_ttl_secs`); then it
    /// ends EXPIRED, never executed.
    #[serde(
        rename = "approval_ttl_secs",
        default = "fifteen_minutes",
        deserialize_with = "crate::clock::de::secs",
        serialize_with = "crate::clock::ser::secs"
    )]
    pub approval_ttl: std::time::Duration,
    /// Overrides within this type for some services or agent groups, tried in order: the
    /// first matching enforced one decides instead of the rule above.
    #[serde(default)]
    pub overrides: Vec<Override>,
    /// History-aware conditions: more than `attempts_over` attempts of this type by this agent
    /// within `within_secs` raise the handling to `action` (never lower it).
    #[serde(default)]
    pub escalations: Vec<Escalation>,
}

/// Whether a rule enforces or only records what it would have done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleMode {
    #[default]
    Enforce,
    /// Decides nothing: the decision it would have made is recorded in the audit and counted
    /// (`command_poller_policy_shadow_total`), so a rule can meet live traffic before it
    /// enforces.
    Shadow,
}

/// An override within a command type. Every condition given must match; at least one is.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    /// Matches commands for any of these services.
    #[serde(default)]
    pub services: Vec<String>,
    /// Matches agents in any of these groups (defined in `[agent_groups]`). An agent the
    /// broker did not vouch for is in no group.
    #[serde(default)]
    pub agent_groups: Vec<String>,
    /// The handling instead of the rule's.
    #[serde(default)]
    pub action: Option<PolicyAction>,
    /// The floor instead of the rule's.
    #[serde(default)]
    pub floor_severity: Option<Severity>,
    pub rationale: String,
    #[serde(default)]
    pub mode: RuleMode,
}

/// A history-aware condition: this attempt and the agent's earlier attempts of this type within
/// the window, more than `attempts_over` of them, raise the handling.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Escalation {
    pub attempts_over: u32,
    #[serde(
        rename = "within_secs",
        deserialize_with = "crate::clock::de::secs",
        serialize_with = "crate::clock::ser::secs"
    )]
    pub within: std::time::Duration,
    /// JUDGE or BLOCK: what the handling is raised to.
    pub action: PolicyAction,
    pub rationale: String,
    #[serde(default)]
    pub mode: RuleMode,
}

fn one() -> u32 {
    1
}

fn fifteen_minutes() -> std::time::Duration {
    std::time::Duration::from_secs(900)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicyFile {
    /// An ALLOW command whose effective severity is at or above this goes to the judges.
    pub judge_allowed_at: Severity,
    /// Named sets of agent ids, for overrides.
    #[serde(default)]
    pub agent_groups: BTreeMap<String, Vec<String>>,
    pub commands: BTreeMap<CommandType, Rule>,
}
