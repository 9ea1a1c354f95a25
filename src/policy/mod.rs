//! Policy: the second pipeline stage, pure.
//!
//! In: a validated [`Command`]. Out: a [`Decision`]: execute, judge or block, with the
//! effective severity and the rationale. The rules come from `config/policy.toml`; an invalid
//! file stops the poller at start with an error naming the key.

pub mod explain;

use crate::intake::{Command, CommandType, Severity};
use crate::judging::DecisionRule;
use crate::outcome::{Priority, Status, Team};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

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
}

fn one() -> u32 {
    1
}

fn fifteen_minutes() -> std::time::Duration {
    std::time::Duration::from_secs(900)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    /// An ALLOW command whose effective severity is at or above this goes to the judges.
    judge_allowed_at: Severity,
    commands: BTreeMap<CommandType, Rule>,
}

/// How the pipeline handles a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Handling {
    /// Straight to the bridge.
    Execute,
    /// To the judge panel, then the bridge if approved.
    Judge,
    /// Never executed.
    Block,
}

/// The policy's verdict on one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub handling: Handling,
    pub declared_severity: Severity,
    pub effective_severity: Severity,
    /// The agent declared less than the type's floor; recorded in the result.
    pub severity_mismatch: bool,
    pub rationale: String,
    /// How the panel decides, for a judged command.
    pub decision_rule: DecisionRule,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("policy file {path}: {message}")]
    Invalid { path: String, message: String },
}

/// The loaded policy. Holds exactly one rule per command type.
#[derive(Debug, Clone)]
pub struct Policy {
    judge_allowed_at: Severity,
    rules: BTreeMap<CommandType, Rule>,
    /// SHA-256 of the file's bytes, so a record can name the policy that decided.
    digest: String,
}

impl Policy {
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|message| PolicyError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses policy TOML. Errors name the offending key.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| e.to_string())?;
        for t in CommandType::ALL {
            if !file.commands.contains_key(&t) {
                return Err(format!(
                    "commands.{t}: missing; every command type needs a rule"
                ));
            }
        }
        for (t, rule) in &file.commands {
            if rule.rationale.trim().is_empty() {
                return Err(format!("commands.{t}.rationale: must not be empty"));
            }
            if rule.approvals_required == 0 {
                return Err(format!(
                    "commands.{t}.approvals_required: must be at least 1"
                ));
            }
            if rule.approval_ttl.is_zero() {
                return Err(format!(
                    "commands.{t}.approval_ttl_secs: must be at least 1"
                ));
            }
            for (i, route) in rule.alerts.iter().enumerate() {
                if route.teams.is_empty() {
                    return Err(format!("commands.{t}.alerts[{i}].teams: must not be empty"));
                }
            }
        }
        Ok(Self {
            judge_allowed_at: file.judge_allowed_at,
            rules: file.commands,
            digest: hex::encode(Sha256::digest(text.as_bytes())),
        })
    }

    pub fn rule(&self, t: CommandType) -> &Rule {
        // `parse` guarantees a rule for every type.
        &self.rules[&t]
    }

    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Decides how to handle `cmd`. The declared severity can raise handling, never lower it.
    pub fn decide(&self, cmd: &Command) -> Decision {
        let rule = self.rule(cmd.command_type);
        let effective = cmd.severity.max(rule.floor_severity);
        let handling = match rule.action {
            PolicyAction::Block => Handling::Block,
            PolicyAction::Judge => Handling::Judge,
            PolicyAction::Allow if effective >= self.judge_allowed_at => Handling::Judge,
            PolicyAction::Allow => Handling::Execute,
        };
        let rationale = if rule.action == PolicyAction::Allow && handling == Handling::Judge {
            format!(
                "{} Escalated to the judges: declared severity {} is at or above {}.",
                rule.rationale, cmd.severity, self.judge_allowed_at
            )
        } else {
            rule.rationale.clone()
        };
        Decision {
            handling,
            declared_severity: cmd.severity,
            effective_severity: effective,
            severity_mismatch: cmd.severity < rule.floor_severity,
            rationale,
            decision_rule: rule.decision_rule,
        }
    }

    /// The alert routes of `t` that fire for `status`.
    /// Who hears of a `t` command ending `status`: one `(team, priority)` per team of every
    /// matching route.
    pub fn routes(&self, t: Option<CommandType>, status: Status) -> Vec<(Team, Priority)> {
        let Some(t) = t else {
            return Vec::new();
        };
        self.alerts_for(t, status)
            .flat_map(|route| {
                route
                    .teams
                    .iter()
                    .map(move |team| (team.clone(), route.priority))
            })
            .collect()
    }

    pub fn alerts_for(&self, t: CommandType, status: Status) -> impl Iterator<Item = &AlertRoute> {
        self.rule(t).alerts.iter().filter(move |r| r.on == status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::{ActionId, Service};

    fn default_policy() -> Policy {
        Policy::parse(include_str!("../../config/policy.toml")).unwrap()
    }

    fn cmd(t: CommandType, s: Severity) -> Command {
        Command {
            action_id: ActionId::parse("a").unwrap(),
            command_type: t,
            service: Service::parse("google").unwrap(),
            severity: s,
            claimed_agent: None,
        }
    }

    #[test]
    fn defaults_reproduce_the_runbook() {
        let p = default_policy();
        let d = p.decide(&cmd(CommandType::CheckIntegrationStatus, Severity::Low));
        assert_eq!(d.handling, Handling::Execute);
        let d = p.decide(&cmd(CommandType::RefreshToken, Severity::Medium));
        assert_eq!(d.handling, Handling::Judge);
        let d = p.decide(&cmd(CommandType::ConnectIntegration, Severity::High));
        assert_eq!(d.handling, Handling::Block);
        assert_eq!(
            d.rationale,
            "Action blocked by policy: New integrations require manual security and permissions review."
        );
        let routes: Vec<_> = p
            .alerts_for(CommandType::ConnectIntegration, Status::Blocked)
            .collect();
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].priority, Priority::High);
        let teams: Vec<&str> = routes[0].teams.iter().map(|t| t.as_str()).collect();
        assert_eq!(teams, ["security", "engineering"]);
    }

    #[test]
    fn severity_raises_never_lowers() {
        let p = default_policy();
        let d = p.decide(&cmd(CommandType::ConnectIntegration, Severity::Low));
        assert_eq!(d.handling, Handling::Block);
        assert!(d.severity_mismatch);
        assert_eq!(d.effective_severity, Severity::High);
        let d = p.decide(&cmd(CommandType::RefreshToken, Severity::Low));
        assert_eq!(d.handling, Handling::Judge);
        assert_eq!(d.effective_severity, Severity::Medium);
        assert!(d.severity_mismatch);
        let d = p.decide(&cmd(CommandType::CheckIntegrationStatus, Severity::High));
        assert_eq!(d.handling, Handling::Judge);
        assert!(!d.severity_mismatch);
        assert_eq!(d.effective_severity, Severity::High);
    }

    #[test]
    fn invalid_files_name_the_key() {
        let good = include_str!("../../config/policy.toml");
        let e =
            Policy::parse(&good.replace("action = \"BLOCK\"", "action = \"MAYBE\"")).unwrap_err();
        assert!(e.contains("action"), "{e}");
        let e =
            Policy::parse(&good.replace("floor_severity = \"HIGH\"", "floor_severty = \"HIGH\""))
                .unwrap_err();
        assert!(e.contains("floor_severty"), "{e}");
        let e =
            Policy::parse(&good.replace("[commands.REFRESH_TOKEN]", "[commands.REFRESH_TOKENS]"))
                .unwrap_err();
        // toml 1.x meets the alerts of REFRESH_TOKEN (now without its rule) first: either way
        // the error points at the table in question.
        assert!(e.contains("REFRESH_TOKEN"), "{e}");
        let only_two = good.replace("[commands.REFRESH_TOKEN]", "[ignored]");
        assert!(Policy::parse(&only_two).is_err());
    }
}
