//! Whether a candidate policy file lets through something the policy in force refuses: what
//! makes `policy reload` a loosening lever (two people, when `control.loosening_approvals` asks
//! for them), decided by the replicas that hold both policies, so no client can skip it.
//!
//! In: the policy in force and the candidate. Out: every way the candidate enforces less, in
//! words (none: it is as strict or stricter, and one operator may load it). Conservative: a
//! change it can't show to be as strict counts as loosening (a second operator costs less than a
//! bypass). Rationale texts and alert routes are not enforcement and never count. Pure.

use super::file::{Escalation, Override, PolicyAction, RuleMode};
use super::Policy;
use crate::intake::CommandType;
use crate::outcome::DecisionRule;

fn action_rank(a: PolicyAction) -> u8 {
    match a {
        PolicyAction::Allow => 0,
        PolicyAction::Judge => 1,
        PolicyAction::Block => 2,
    }
}

fn rule_rank(r: DecisionRule) -> u8 {
    match r {
        DecisionRule::Majority => 0,
        DecisionRule::Veto => 1,
        DecisionRule::Unanimous => 2,
    }
}

/// What an enforced override decides, its rationale aside.
fn override_key(o: &Override) -> impl PartialEq + '_ {
    (&o.services, &o.agent_groups, o.action, o.floor_severity)
}

/// What an enforced escalation decides, its rationale aside.
fn escalation_key(e: &Escalation) -> impl PartialEq + '_ {
    (e.attempts_over, e.within, e.action)
}

/// Every way `candidate` enforces less than `current`.
pub fn loosenings(current: &Policy, candidate: &Policy) -> Vec<String> {
    let mut why = Vec::new();
    if candidate.judge_allowed_at > current.judge_allowed_at {
        why.push(format!(
            "judge_allowed_at raised from {} to {}: fewer ALLOW commands go to the judges",
            current.judge_allowed_at, candidate.judge_allowed_at
        ));
    }
    for t in CommandType::ALL {
        rule_loosenings(t, current, candidate, &mut why);
    }
    groups_loosenings(current, candidate, &mut why);
    why
}

fn rule_loosenings(t: CommandType, current: &Policy, candidate: &Policy, why: &mut Vec<String>) {
    let (old, new) = (current.rule(t), candidate.rule(t));
    if action_rank(new.action) < action_rank(old.action) {
        why.push(format!("{t}: action {:?} → {:?}", old.action, new.action));
    }
    if new.floor_severity < old.floor_severity {
        why.push(format!(
            "{t}: floor_severity {} → {}",
            old.floor_severity, new.floor_severity
        ));
    }
    if rule_rank(new.decision_rule) < rule_rank(old.decision_rule) {
        why.push(format!(
            "{t}: decision_rule {} → {}",
            old.decision_rule, new.decision_rule
        ));
    }
    if new.approvals_required < old.approvals_required {
        why.push(format!(
            "{t}: approvals_required {} → {}",
            old.approvals_required, new.approvals_required
        ));
    }
    // Overrides decide by first match: the enforced ones in force must all still be there, in
    // order, and anything added among them must block (nothing it preempts was stricter).
    let enforced = |r: &super::file::Rule| -> Vec<Override> {
        r.overrides
            .iter()
            .filter(|o| o.mode == RuleMode::Enforce)
            .cloned()
            .collect()
    };
    let (old_o, new_o) = (enforced(old), enforced(new));
    let mut kept = old_o.iter().peekable();
    for o in &new_o {
        match kept.peek() {
            Some(k) if override_key(k) == override_key(o) => {
                kept.next();
            }
            _ if o.action == Some(PolicyAction::Block) => {}
            _ => {
                why.push(format!(
                    "{t}: an enforced override added or changed that does not block (services {:?}, agent_groups {:?})",
                    o.services, o.agent_groups
                ));
                return;
            }
        }
    }
    if kept.peek().is_some() {
        why.push(format!(
            "{t}: an enforced override removed, changed or switched to shadow"
        ));
    }
    // Escalations each only raise: every enforced one must still be enforced as it was.
    for e in old
        .escalations
        .iter()
        .filter(|e| e.mode == RuleMode::Enforce)
    {
        let still = new
            .escalations
            .iter()
            .any(|n| n.mode == RuleMode::Enforce && escalation_key(n) == escalation_key(e));
        if !still {
            why.push(format!(
                "{t}: the escalation over {} attempts within {} s removed, changed or switched to shadow",
                e.attempts_over,
                e.within.as_secs()
            ));
        }
    }
}

/// A member added to a group an enforced override that does not block names: that agent is
/// handled by the override now.
fn groups_loosenings(current: &Policy, candidate: &Policy, why: &mut Vec<String>) {
    for (g, members) in &candidate.agent_groups {
        let named = CommandType::ALL.iter().any(|t| {
            candidate.rule(*t).overrides.iter().any(|o| {
                o.mode == RuleMode::Enforce
                    && o.action != Some(PolicyAction::Block)
                    && o.agent_groups.contains(g)
            })
        });
        let before = current.agent_groups.get(g);
        let added: Vec<&String> = members
            .iter()
            .filter(|m| before.is_none_or(|b| !b.contains(m)))
            .collect();
        if named && !added.is_empty() {
            why.push(format!("agent group {g}: {added:?} added"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../../../../config/policy.toml");

    fn with(edit: impl Fn(&str) -> String) -> (Policy, Policy) {
        let p = Policy::parse(SHIPPED).unwrap();
        let c = Policy::parse(&edit(SHIPPED)).unwrap_or_else(|e| panic!("{e}"));
        (p, c)
    }

    #[test]
    fn the_same_policy_or_a_new_rationale_loosens_nothing() {
        let (p, c) = with(|s| s.replace("requires approval by a majority", "needs a majority"));
        assert_ne!(p.digest(), c.digest());
        assert_eq!(loosenings(&p, &c), Vec::<String>::new());
    }

    #[test]
    fn a_weaker_action_floor_or_rule_loosens_and_a_stronger_one_does_not() {
        let (p, c) = with(|s| {
            s.replacen(
                "[commands.REFRESH_TOKEN]\naction = \"JUDGE\"",
                "[commands.REFRESH_TOKEN]\naction = \"ALLOW\"",
                1,
            )
        });
        let why = loosenings(&p, &c);
        assert!(
            why.iter()
                .any(|w| w.contains("REFRESH_TOKEN: action Judge → Allow")),
            "{why:?}"
        );
        assert!(loosenings(&c, &p).is_empty(), "back to JUDGE is stricter");
        let (p, c) = with(|s| {
            s.replacen(
                "decision_rule = \"majority\"",
                "decision_rule = \"unanimous\"",
                1,
            )
        });
        assert!(loosenings(&p, &c).is_empty(), "unanimous is stricter");
        assert!(!loosenings(&c, &p).is_empty(), "and back is looser");
    }

    #[test]
    fn an_enforced_rule_switched_to_shadow_loosens_and_a_new_blocking_override_does_not() {
        let escalation = |mode: &str| {
            format!(
                "{SHIPPED}\n[[commands.CHECK_INTEGRATION_STATUS.escalations]]\nattempts_over = 5\nwithin_secs = 60\naction = \"JUDGE\"\nrationale = \"a burst\"\nmode = \"{mode}\"\n"
            )
        };
        let enforced = Policy::parse(&escalation("enforce")).unwrap();
        let shadow = Policy::parse(&escalation("shadow")).unwrap();
        let why = loosenings(&enforced, &shadow);
        assert!(
            why.iter().any(|w| w.contains("switched to shadow")),
            "{why:?}"
        );
        assert!(
            loosenings(&shadow, &enforced).is_empty(),
            "enforcing it tightens"
        );

        let p = Policy::parse(SHIPPED).unwrap();
        let extra = format!(
            "{SHIPPED}\n[[commands.REFRESH_TOKEN.overrides]]\nservices = [\"crm-data-export\"]\naction = \"BLOCK\"\nrationale = \"never\"\n"
        );
        let c = Policy::parse(&extra).unwrap();
        assert!(
            loosenings(&p, &c).is_empty(),
            "a blocking override tightens"
        );
        assert!(!loosenings(&c, &p).is_empty(), "and removing it loosens");
        let shadowed = extra.replace(
            "rationale = \"never\"",
            "rationale = \"never\"\nmode = \"shadow\"",
        );
        let s = Policy::parse(&shadowed).unwrap();
        assert!(
            !loosenings(&c, &s).is_empty(),
            "switching it to shadow loosens"
        );
        let allow = extra.replace("action = \"BLOCK\"", "action = \"ALLOW\"");
        let c = Policy::parse(&allow).unwrap();
        assert!(
            !loosenings(&p, &c).is_empty(),
            "an allowing override loosens"
        );
    }
}
