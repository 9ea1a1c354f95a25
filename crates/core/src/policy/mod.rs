//! Policy: the second pipeline stage, pure.
//!
//! In: a validated [`Command`] and the [`Facts`] the pipeline knows about its agent (who, whether
//! the broker vouched for it, how many attempts of this type it made lately). Out: a
//! [`Decision`]: execute, judge or block, with the effective severity, the rationale, the rule
//! that decided and what every matching shadow rule would have done. The rules come from
//! `config/policy.toml`; an invalid file is refused with an error naming the key (at start,
//! and by a reload, which keeps the old policy).

pub mod explain;
mod file;
pub mod loosening;
pub mod shared;

pub use file::*;

use crate::intake::{Command, CommandType, Severity};
use crate::outcome::DecisionRule;
use crate::outcome::{Priority, Status, Team};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// What the pipeline knows about a command's agent when the policy decides.
pub struct Facts<'a> {
    pub agent: Option<&'a str>,
    /// The broker vouched for the agent: only then does it belong to agent groups.
    pub verified: bool,
    /// The agent's earlier attempts of this command type within a window.
    pub earlier_attempts: &'a dyn Fn(std::time::Duration) -> usize,
}

impl Facts<'static> {
    /// No agent, no history: the type's rule and its service overrides only.
    pub fn none() -> Self {
        Facts {
            agent: None,
            verified: false,
            earlier_attempts: &|_| 0,
        }
    }
}

/// The longest window and the most attempts a history condition may ask about: what the
/// pipeline's attempt history keeps (`judging::history`).
pub const MAX_ESCALATION_WINDOW: std::time::Duration = crate::history::WINDOW;
pub const MAX_ESCALATION_ATTEMPTS: u32 = crate::history::PER_KEY as u32 - 1;

/// What a shadow rule would have decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shadow {
    /// `REFRESH_TOKEN.overrides[0]`, `REFRESH_TOKEN.escalations[1]`.
    pub rule: String,
    pub would_have: Handling,
    pub rationale: String,
}

/// How the pipeline handles a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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
    /// The rule that decided: `REFRESH_TOKEN`, `REFRESH_TOKEN.overrides[0]`, or an escalation.
    pub rule: String,
    /// What each matching shadow rule would have decided instead.
    pub shadows: Vec<Shadow>,
}

impl Handling {
    pub fn as_str(self) -> &'static str {
        match self {
            Handling::Execute => "EXECUTE",
            Handling::Judge => "JUDGE",
            Handling::Block => "BLOCK",
        }
    }
}

fn handling_of(action: PolicyAction) -> Handling {
    match action {
        PolicyAction::Allow => Handling::Execute,
        PolicyAction::Judge => Handling::Judge,
        PolicyAction::Block => Handling::Block,
    }
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

/// A rule other than the type's own, by its place in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Candidate {
    Override(usize),
    Escalation(usize),
}

impl Candidate {
    fn id(self, t: CommandType) -> String {
        match self {
            Candidate::Override(i) => format!("{t}.overrides[{i}]"),
            Candidate::Escalation(i) => format!("{t}.escalations[{i}]"),
        }
    }
}

/// The loaded policy. Holds exactly one rule per command type.
#[derive(Debug, Clone)]
pub struct Policy {
    judge_allowed_at: Severity,
    agent_groups: BTreeMap<String, Vec<String>>,
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
            for (i, o) in rule.overrides.iter().enumerate() {
                let at = format!("commands.{t}.overrides[{i}]");
                if o.services.is_empty() && o.agent_groups.is_empty() {
                    return Err(format!(
                        "{at}: needs services or agent_groups (an override for everyone is the rule itself)"
                    ));
                }
                if o.action.is_none() && o.floor_severity.is_none() {
                    return Err(format!(
                        "{at}: needs action or floor_severity (it would change nothing)"
                    ));
                }
                if o.rationale.trim().is_empty() {
                    return Err(format!("{at}.rationale: must not be empty"));
                }
                for s in &o.services {
                    crate::intake::Service::parse(s)
                        .map_err(|e| format!("{at}.services: {s:?}: {e}"))?;
                }
                for g in &o.agent_groups {
                    if !file.agent_groups.contains_key(g) {
                        return Err(format!(
                            "{at}.agent_groups: {g:?} is not defined in [agent_groups]"
                        ));
                    }
                }
            }
            for (i, e) in rule.escalations.iter().enumerate() {
                let at = format!("commands.{t}.escalations[{i}]");
                if e.action == PolicyAction::Allow {
                    return Err(format!(
                        "{at}.action: must be JUDGE or BLOCK (an escalation only raises the handling)"
                    ));
                }
                if e.within.is_zero() || e.within > MAX_ESCALATION_WINDOW {
                    return Err(format!(
                        "{at}.within_secs: must be between 1 and {} (the attempt history kept)",
                        MAX_ESCALATION_WINDOW.as_secs()
                    ));
                }
                if e.attempts_over > MAX_ESCALATION_ATTEMPTS {
                    return Err(format!(
                        "{at}.attempts_over: at most {MAX_ESCALATION_ATTEMPTS} (the attempt history kept per agent and type)"
                    ));
                }
                if e.rationale.trim().is_empty() {
                    return Err(format!("{at}.rationale: must not be empty"));
                }
            }
        }
        for (g, members) in &file.agent_groups {
            if members.is_empty() {
                return Err(format!("agent_groups.{g}: must not be empty"));
            }
            for m in members {
                crate::intake::AgentId::parse(m)
                    .map_err(|e| format!("agent_groups.{g}: {m:?}: {e}"))?;
            }
        }
        Ok(Self {
            judge_allowed_at: file.judge_allowed_at,
            agent_groups: file.agent_groups,
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

    /// The groups `agent` belongs to.
    pub fn groups_of(&self, agent: &str) -> Vec<&str> {
        self.agent_groups
            .iter()
            .filter(|(_, members)| members.iter().any(|m| m == agent))
            .map(|(g, _)| g.as_str())
            .collect()
    }

    /// Decides how to handle `cmd`: the enforced decision, and what each matching shadow rule
    /// would have decided. The declared severity can raise handling, never lower it.
    pub fn decide(&self, cmd: &Command, facts: &Facts) -> Decision {
        let mut d = self.decide_as(cmd, facts, None);
        let t = cmd.command_type;
        let rule = self.rule(t);
        let shadow_ids = rule
            .overrides
            .iter()
            .enumerate()
            .filter(|(_, o)| o.mode == RuleMode::Shadow)
            .map(|(i, _)| Candidate::Override(i))
            .chain(
                rule.escalations
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.mode == RuleMode::Shadow)
                    .map(|(i, _)| Candidate::Escalation(i)),
            );
        for c in shadow_ids {
            if !self.matches(cmd, facts, c) {
                continue;
            }
            let would = self.decide_as(cmd, facts, Some(c));
            d.shadows.push(Shadow {
                rule: c.id(t),
                would_have: would.handling,
                rationale: would.rationale,
            });
        }
        d
    }

    fn matches(&self, cmd: &Command, facts: &Facts, c: Candidate) -> bool {
        let rule = self.rule(cmd.command_type);
        match c {
            Candidate::Override(i) => {
                let o = &rule.overrides[i];
                let service_ok =
                    o.services.is_empty() || o.services.iter().any(|s| s == cmd.service.as_str());
                let group_ok = o.agent_groups.is_empty()
                    || match (facts.agent, facts.verified) {
                        (Some(a), true) => {
                            let mine = self.groups_of(a);
                            o.agent_groups.iter().any(|g| mine.contains(&g.as_str()))
                        }
                        _ => false,
                    };
                service_ok && group_ok
            }
            Candidate::Escalation(i) => {
                let e = &rule.escalations[i];
                facts.agent.is_some()
                    && (facts.earlier_attempts)(e.within) + 1 > e.attempts_over as usize
            }
        }
    }

    /// The decision with the enforced rules, and `promoted` (a shadow rule) as if enforced.
    fn decide_as(&self, cmd: &Command, facts: &Facts, promoted: Option<Candidate>) -> Decision {
        let t = cmd.command_type;
        let rule = self.rule(t);
        let counts =
            |mode: RuleMode, c: Candidate| mode == RuleMode::Enforce || promoted == Some(c);
        let mut action = rule.action;
        let mut floor = rule.floor_severity;
        let mut rationale = rule.rationale.clone();
        let mut source = t.to_string();
        if let Some((i, o)) = rule.overrides.iter().enumerate().find(|(i, o)| {
            counts(o.mode, Candidate::Override(*i))
                && self.matches(cmd, facts, Candidate::Override(*i))
        }) {
            action = o.action.unwrap_or(action);
            floor = o.floor_severity.unwrap_or(floor);
            rationale = o.rationale.clone();
            source = Candidate::Override(i).id(t);
        }
        let effective = cmd.severity.max(floor);
        let mut handling = match action {
            PolicyAction::Allow if effective >= self.judge_allowed_at => Handling::Judge,
            a => handling_of(a),
        };
        if action == PolicyAction::Allow && handling == Handling::Judge {
            rationale = format!(
                "{rationale} Escalated to the judges: declared severity {} is at or above {}.",
                cmd.severity, self.judge_allowed_at
            );
        }
        for (i, e) in rule.escalations.iter().enumerate() {
            let c = Candidate::Escalation(i);
            let raised = handling_of(e.action);
            if counts(e.mode, c) && raised > handling && self.matches(cmd, facts, c) {
                handling = raised;
                rationale = format!(
                    "{} ({} attempts of {t} within {} s, more than {}.)",
                    e.rationale,
                    (facts.earlier_attempts)(e.within) + 1,
                    e.within.as_secs(),
                    e.attempts_over
                );
                source = c.id(t);
            }
        }
        Decision {
            handling,
            declared_severity: cmd.severity,
            effective_severity: effective,
            severity_mismatch: cmd.severity < floor,
            rationale,
            decision_rule: rule.decision_rule,
            rule: source,
            shadows: Vec::new(),
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
        Policy::parse(include_str!("../../../../config/policy.toml")).unwrap()
    }

    fn cmd(t: CommandType, s: Severity) -> Command {
        Command {
            justification: None,
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
        let d = p.decide(
            &cmd(CommandType::CheckIntegrationStatus, Severity::Low),
            &Facts::none(),
        );
        assert_eq!(d.handling, Handling::Execute);
        let d = p.decide(
            &cmd(CommandType::RefreshToken, Severity::Medium),
            &Facts::none(),
        );
        assert_eq!(d.handling, Handling::Judge);
        let d = p.decide(
            &cmd(CommandType::ConnectIntegration, Severity::High),
            &Facts::none(),
        );
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
        let d = p.decide(
            &cmd(CommandType::ConnectIntegration, Severity::Low),
            &Facts::none(),
        );
        assert_eq!(d.handling, Handling::Block);
        assert!(d.severity_mismatch);
        assert_eq!(d.effective_severity, Severity::High);
        let d = p.decide(
            &cmd(CommandType::RefreshToken, Severity::Low),
            &Facts::none(),
        );
        assert_eq!(d.handling, Handling::Judge);
        assert_eq!(d.effective_severity, Severity::Medium);
        assert!(d.severity_mismatch);
        let d = p.decide(
            &cmd(CommandType::CheckIntegrationStatus, Severity::High),
            &Facts::none(),
        );
        assert_eq!(d.handling, Handling::Judge);
        assert!(!d.severity_mismatch);
        assert_eq!(d.effective_severity, Severity::High);
    }

    #[test]
    fn invalid_files_name_the_key() {
        let good = include_str!("../../../../config/policy.toml");
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

    const GROUPS: &str = r#"
[agent_groups]
trusted = ["agent-billing", "agent-ops"]
sandbox = ["agent-exp"]

[[commands.REFRESH_TOKEN.overrides]]
agent_groups = ["trusted"]
services = ["google"]
action = "ALLOW"
floor_severity = "LOW"
rationale = "Trusted agents refresh Google tokens without the judges."

[[commands.REFRESH_TOKEN.overrides]]
agent_groups = ["sandbox"]
action = "BLOCK"
rationale = "Sandbox agents never refresh tokens."

[[commands.REFRESH_TOKEN.overrides]]
services = ["mailchimp"]
action = "BLOCK"
rationale = "Mailchimp refreshes are being retired."
mode = "shadow"

[[commands.CHECK_INTEGRATION_STATUS.escalations]]
attempts_over = 3
within_secs = 600
action = "JUDGE"
rationale = "A burst of status checks is unusual."
"#;

    /// The shipped policy with the test's groups, overrides and escalations appended.
    fn with_overrides() -> Policy {
        let base = include_str!("../../../../config/policy.toml");
        // The [agent_groups] table must come before any [commands.*] table.
        let (head, tail) = base.split_at(base.find("\n[commands.").unwrap() + 1);
        let (groups, rules) = GROUPS.split_at(GROUPS.find("[[commands.").unwrap());
        Policy::parse(&format!("{head}{groups}\n{tail}\n{rules}")).unwrap()
    }

    fn svc(t: CommandType, service: &str, s: Severity) -> Command {
        Command {
            service: Service::parse(service).unwrap(),
            ..cmd(t, s)
        }
    }

    fn facts<'a>(
        agent: &'a str,
        verified: bool,
        earlier: &'a dyn Fn(std::time::Duration) -> usize,
    ) -> Facts<'a> {
        Facts {
            agent: Some(agent),
            verified,
            earlier_attempts: earlier,
        }
    }

    #[test]
    fn overrides_apply_per_group_and_service_and_only_to_verified_agents() {
        let p = with_overrides();
        let none = |_| 0;
        let d = p.decide(
            &svc(CommandType::RefreshToken, "google", Severity::Low),
            &facts("agent-billing", true, &none),
        );
        assert_eq!(d.handling, Handling::Execute);
        assert_eq!(d.rule, "REFRESH_TOKEN.overrides[0]");
        assert_eq!(d.effective_severity, Severity::Low);
        // The same agent for another service: the type's rule.
        let d = p.decide(
            &svc(CommandType::RefreshToken, "meta", Severity::Medium),
            &facts("agent-billing", true, &none),
        );
        assert_eq!(
            (d.handling, d.rule.as_str()),
            (Handling::Judge, "REFRESH_TOKEN")
        );
        // Declared severity still raises: a trusted agent's MEDIUM refresh goes to the judges.
        let d = p.decide(
            &svc(CommandType::RefreshToken, "google", Severity::Medium),
            &facts("agent-billing", true, &none),
        );
        assert_eq!(d.handling, Handling::Judge);
        // An agent the broker did not vouch for is in no group, whatever id it claims.
        let d = p.decide(
            &svc(CommandType::RefreshToken, "google", Severity::Low),
            &facts("agent-billing", false, &none),
        );
        assert_eq!(d.handling, Handling::Judge);
        assert_eq!(d.rule, "REFRESH_TOKEN");
        let d = p.decide(
            &svc(CommandType::RefreshToken, "google", Severity::Low),
            &facts("agent-exp", true, &none),
        );
        assert_eq!(
            (d.handling, d.rule.as_str()),
            (Handling::Block, "REFRESH_TOKEN.overrides[1]")
        );
        assert_eq!(d.rationale, "Sandbox agents never refresh tokens.");
    }

    #[test]
    fn a_shadow_rule_records_without_deciding() {
        let p = with_overrides();
        let none = |_| 0;
        let d = p.decide(
            &svc(CommandType::RefreshToken, "mailchimp", Severity::Medium),
            &facts("agent-x", true, &none),
        );
        assert_eq!(d.handling, Handling::Judge, "enforced decision unchanged");
        assert_eq!(d.rule, "REFRESH_TOKEN");
        assert_eq!(
            d.shadows,
            [Shadow {
                rule: "REFRESH_TOKEN.overrides[2]".into(),
                would_have: Handling::Block,
                rationale: "Mailchimp refreshes are being retired.".into(),
            }]
        );
        let d = p.decide(
            &svc(CommandType::RefreshToken, "google", Severity::Medium),
            &facts("agent-x", true, &none),
        );
        assert!(
            d.shadows.is_empty(),
            "a shadow rule that does not match records nothing"
        );
    }

    #[test]
    fn history_conditions_raise_and_never_lower() {
        let p = with_overrides();
        let three = |w: std::time::Duration| if w.as_secs() == 600 { 3 } else { 0 };
        let two = |_| 2;
        let c = svc(CommandType::CheckIntegrationStatus, "google", Severity::Low);
        let d = p.decide(&c, &facts("agent-x", true, &two));
        assert_eq!(
            d.handling,
            Handling::Execute,
            "3 attempts in all: not more than 3"
        );
        let d = p.decide(&c, &facts("agent-x", true, &three));
        assert_eq!(d.handling, Handling::Judge, "the 4th within 600 s");
        assert_eq!(d.rule, "CHECK_INTEGRATION_STATUS.escalations[0]");
        assert!(d.rationale.contains("4 attempts"), "{}", d.rationale);
        // Raising only: a BLOCKed type stays blocked.
        let block = Policy::parse(&include_str!("../../../../config/policy.toml").replace(
            "[[commands.CONNECT_INTEGRATION.alerts]]",
            "[[commands.CONNECT_INTEGRATION.escalations]]\nattempts_over = 0\nwithin_secs = 60\naction = \"JUDGE\"\nrationale = \"r\"\n\n[[commands.CONNECT_INTEGRATION.alerts]]",
        ))
        .unwrap();
        let d = block.decide(
            &cmd(CommandType::ConnectIntegration, Severity::High),
            &facts("a", true, &two),
        );
        assert_eq!(d.handling, Handling::Block);
    }

    #[test]
    fn overrides_and_escalations_are_validated_naming_the_key() {
        let base = include_str!("../../../../config/policy.toml");
        let bad = |extra: &str| Policy::parse(&format!("{base}\n{extra}")).unwrap_err();
        let e = bad("[[commands.REFRESH_TOKEN.overrides]]\nagent_groups = [\"nobody\"]\naction = \"BLOCK\"\nrationale = \"r\"");
        assert!(
            e.contains("REFRESH_TOKEN.overrides[0].agent_groups") && e.contains("nobody"),
            "{e}"
        );
        let e = bad("[[commands.REFRESH_TOKEN.overrides]]\naction = \"BLOCK\"\nrationale = \"r\"");
        assert!(e.contains("needs services or agent_groups"), "{e}");
        let e =
            bad("[[commands.REFRESH_TOKEN.overrides]]\nservices = [\"google\"]\nrationale = \"r\"");
        assert!(e.contains("needs action or floor_severity"), "{e}");
        let e = bad("[[commands.REFRESH_TOKEN.overrides]]\nservices = [\"google\"]\naction = \"BLOCK\"\nrationale = \"r\"\nmode = \"dry\"");
        assert!(e.contains("mode"), "{e}");
        let e = bad("[[commands.REFRESH_TOKEN.escalations]]\nattempts_over = 2\nwithin_secs = 600\naction = \"ALLOW\"\nrationale = \"r\"");
        assert!(e.contains("escalations[0].action"), "{e}");
        let e = bad("[[commands.REFRESH_TOKEN.escalations]]\nattempts_over = 2\nwithin_secs = 7200\naction = \"BLOCK\"\nrationale = \"r\"");
        assert!(e.contains("within_secs"), "{e}");
        let e = bad("[[commands.REFRESH_TOKEN.escalations]]\nattempts_over = 50\nwithin_secs = 60\naction = \"BLOCK\"\nrationale = \"r\"");
        assert!(e.contains("attempts_over"), "{e}");
        let (head, tail) = base.split_at(base.find("\n[commands.").unwrap() + 1);
        let e = Policy::parse(&format!(
            "{head}[agent_groups]\nops = [\"bad id!\"]\n{tail}"
        ))
        .unwrap_err();
        assert!(e.contains("agent_groups.ops"), "{e}");
    }
}
