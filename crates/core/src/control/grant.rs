//! Scoped, time-boxed grants: so humans are not asked about every routine refresh a small
//! model won't approve. `grant AGENT REFRESH_TOKEN SERVICE --uses N --for DURATION --reason`
//! lets that agent's commands of that type for that service through *when the judges did not
//! approve them*, at most N times, until the grant expires or an operator withdraws it.
//!
//! A grant loosens enforcement, so it is parked as a proposal and needs
//! `control.loosening_approvals` distinct operators like any loosening lever (never its proposer
//! twice); its clock starts when the last operator it needs seconds it. It is never for
//! CONNECT_INTEGRATION (the policy blocks that whatever a human says), and it never overrides a
//! rule judge's veto, a vetoing judge that could not answer, a quarantine, a cut, a pause, a halt
//! or a trip: it only stands in for the human approval a NEEDS_APPROVAL result would have asked
//! for. Its uses are counted in the shared store (one count for every replica); a command judged
//! twice (redelivered, deferred) spends one use.
//!
//! In: the control state, a grant lever or its withdrawal, who and when. Out: the state with the
//! grant added or removed, or why not; the grant that matches a command at a time. Pure.

use super::{ControlCommand, ControlState, Refusal};
use crate::intake::CommandType;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Uses one grant may have at most: a grant is for routine work, not a standing exemption.
pub const MAX_USES: u32 = 1000;
/// The shortest and longest a grant may last, in seconds (one minute; seven days).
pub const MIN_SECS: u64 = 60;
pub const MAX_SECS: u64 = 7 * 24 * 3600;
/// Grants in force at once (expired ones are dropped when the next is added).
pub const MAX_ACTIVE: usize = 64;

/// One grant in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub agent: String,
    pub command_type: CommandType,
    pub service: String,
    /// Commands it may let through, counted for the fleet.
    pub uses: u32,
    /// Unix seconds when it took effect (the last second it needed) and when it ends.
    pub from: u64,
    pub until: u64,
    pub reason: String,
    /// The operator who proposed it.
    pub by: String,
    /// The operators who seconded it.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub seconded_by: BTreeSet<String>,
}

impl Grant {
    /// Whether it lets `agent`'s `command_type` for `service` through at `now` (unix seconds).
    pub fn covers(&self, agent: &str, command_type: CommandType, service: &str, now: u64) -> bool {
        self.agent == agent
            && self.command_type == command_type
            && self.service == service
            && now < self.until
    }

    /// How long its uses are counted: its whole life, and a minute's margin for clocks.
    pub fn window_secs(&self) -> u64 {
        self.until.saturating_sub(self.from) + 60
    }

    /// Who approved it, the proposer first.
    pub fn approvers(&self) -> Vec<String> {
        std::iter::once(self.by.clone())
            .chain(self.seconded_by.iter().cloned())
            .collect()
    }
}

/// The key its uses are counted under in the shared store.
pub fn count_key(id: &str) -> String {
    format!("grant:{id}")
}

/// The grant in `state` that lets `agent`'s `command_type` for `service` through at `now`,
/// with its id: of several, the one that ends first (so a longer one is kept for later).
pub fn covering<'a>(
    state: &'a ControlState,
    agent: &str,
    command_type: CommandType,
    service: &str,
    now: u64,
) -> Option<(&'a str, &'a Grant)> {
    state
        .grants
        .iter()
        .filter(|(_, g)| g.covers(agent, command_type, service, now))
        .min_by_key(|(id, g)| (g.until, id.as_str()))
        .map(|(id, g)| (id.as_str(), g))
}

/// Why a grant lever is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantRefused {
    #[error(
        "a grant is never for CONNECT_INTEGRATION: the policy blocks it whatever a human says"
    )]
    Connect,
    #[error("a grant's uses must be 1 to {MAX_USES}")]
    Uses,
    #[error("a grant lasts {MIN_SECS} s to {MAX_SECS} s (seven days)")]
    Duration,
    #[error("{MAX_ACTIVE} grants are in force: withdraw one first")]
    TooMany,
    #[error("no grant {0} is in force (withdrawn, expired, or still a proposal)")]
    Unknown(String),
}

/// `current` with the grant `lever` asks for, proposed by `by`, seconded by `seconded_by`,
/// taking effect at `at` (unix seconds); expired grants dropped. Any other lever: refused.
pub fn add(
    current: &ControlState,
    lever: &ControlCommand,
    by: &str,
    seconded_by: BTreeSet<String>,
    at: u64,
) -> Result<ControlState, Refusal> {
    let ControlCommand::Grant {
        agent,
        command_type,
        service,
        uses,
        for_secs,
        reason,
        request_id,
    } = lever
    else {
        return Err(Refusal::NotStored);
    };
    check(lever)?;
    let mut new = current.clone();
    new.grants.retain(|_, g| g.until > at);
    if !new.grants.contains_key(request_id) && new.grants.len() >= MAX_ACTIVE {
        return Err(Refusal::Grant(GrantRefused::TooMany));
    }
    new.grants
        .entry(request_id.clone())
        .or_insert_with(|| Grant {
            agent: agent.clone(),
            command_type: *command_type,
            service: service.clone(),
            uses: *uses,
            from: at,
            until: at + for_secs,
            reason: reason.clone(),
            by: by.to_owned(),
            seconded_by,
        });
    Ok(new)
}

/// Whether a grant lever may be pulled at all (checked again when its last second lands).
pub fn check(lever: &ControlCommand) -> Result<(), Refusal> {
    let ControlCommand::Grant {
        agent,
        command_type,
        service,
        uses,
        for_secs,
        reason,
        ..
    } = lever
    else {
        return Ok(());
    };
    crate::intake::AgentId::parse(agent).map_err(Refusal::BadAgent)?;
    crate::intake::Service::parse(service).map_err(Refusal::BadService)?;
    if reason.trim().is_empty() {
        return Err(Refusal::NoReason);
    }
    if *command_type == CommandType::ConnectIntegration {
        return Err(Refusal::Grant(GrantRefused::Connect));
    }
    if *uses == 0 || *uses > MAX_USES {
        return Err(Refusal::Grant(GrantRefused::Uses));
    }
    if !(MIN_SECS..=MAX_SECS).contains(for_secs) {
        return Err(Refusal::Grant(GrantRefused::Duration));
    }
    Ok(())
}

/// `current` without grant `id` (withdrawn: its next use is refused, and a command it let
/// through that has not reached the bridge yet goes back to the judges and the humans). One
/// already gone stays gone: a replica that enforces the withdrawal answers its lever.
pub fn withdraw(current: &ControlState, id: &str, reason: &str) -> Result<ControlState, Refusal> {
    if reason.trim().is_empty() {
        return Err(Refusal::NoReason);
    }
    let mut new = current.clone();
    new.grants.remove(id);
    Ok(new)
}

/// Whether an operator's withdrawal names a grant in force (checked by the operator's client
/// for a clear error before anything is stored).
pub fn in_force(current: &ControlState, lever: &ControlCommand) -> Result<(), Refusal> {
    match lever {
        ControlCommand::Ungrant { grant, .. } if !current.grants.contains_key(grant) => {
            Err(Refusal::Grant(GrantRefused::Unknown(grant.clone())))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{transition, Actor};

    fn lever(t: CommandType, uses: u32, for_secs: u64) -> ControlCommand {
        ControlCommand::Grant {
            agent: "agent-7".into(),
            command_type: t,
            service: "google".into(),
            uses,
            for_secs,
            reason: "weekly refreshes".into(),
            request_id: "g-1".into(),
        }
    }

    fn op() -> Actor {
        Actor::Operator("alice".into())
    }

    #[test]
    fn a_grant_covers_its_agent_type_and_service_until_it_ends() {
        let s = add(
            &ControlState::initial(),
            &lever(CommandType::RefreshToken, 3, 3600),
            "alice",
            BTreeSet::from(["bob".to_owned()]),
            1_000,
        )
        .unwrap();
        let refresh = CommandType::RefreshToken;
        let (id, g) = covering(&s, "agent-7", refresh, "google", 1_000).unwrap();
        assert_eq!((id, g.uses, g.until), ("g-1", 3, 4_600));
        assert_eq!(g.approvers(), vec!["alice".to_owned(), "bob".to_owned()]);
        assert!(
            covering(&s, "agent-7", refresh, "google", 4_600).is_none(),
            "expired"
        );
        assert!(
            covering(&s, "agent-8", refresh, "google", 1_000).is_none(),
            "other agent"
        );
        assert!(
            covering(&s, "agent-7", refresh, "meta", 1_000).is_none(),
            "other service"
        );
        let status = CommandType::CheckIntegrationStatus;
        assert!(
            covering(&s, "agent-7", status, "google", 1_000).is_none(),
            "other type"
        );
        assert_eq!(g.window_secs(), 3_660);
        assert_eq!(count_key(id), "grant:g-1");
    }

    #[test]
    fn never_for_connect_never_unbounded_never_from_the_poller() {
        let s = ControlState::initial();
        let refused = |l: &ControlCommand| transition(&s, l, &op()).unwrap_err();
        assert_eq!(
            refused(&lever(CommandType::ConnectIntegration, 1, 3600)),
            Refusal::Grant(GrantRefused::Connect)
        );
        assert_eq!(
            refused(&lever(CommandType::RefreshToken, 0, 3600)),
            Refusal::Grant(GrantRefused::Uses)
        );
        assert_eq!(
            refused(&lever(CommandType::RefreshToken, MAX_USES + 1, 3600)),
            Refusal::Grant(GrantRefused::Uses)
        );
        assert_eq!(
            refused(&lever(CommandType::RefreshToken, 1, MAX_SECS + 1)),
            Refusal::Grant(GrantRefused::Duration)
        );
        let mut no_reason = lever(CommandType::RefreshToken, 1, 3600);
        if let ControlCommand::Grant { reason, .. } = &mut no_reason {
            *reason = " ".into();
        }
        assert_eq!(refused(&no_reason), Refusal::NoReason);
        let poller = Actor::Poller("poller".into());
        assert_eq!(
            transition(&s, &lever(CommandType::RefreshToken, 1, 3600), &poller).unwrap_err(),
            Refusal::PollerMayOnlyPause
        );
        assert!(transition(&s, &lever(CommandType::RefreshToken, 1, 3600), &op()).is_ok());
    }

    #[test]
    fn withdrawn_it_covers_nothing_and_expired_ones_are_dropped_on_the_next() {
        let s = add(
            &ControlState::initial(),
            &lever(CommandType::RefreshToken, 3, 60),
            "alice",
            BTreeSet::new(),
            1_000,
        )
        .unwrap();
        let unknown = ControlCommand::Ungrant {
            grant: "g-2".into(),
            reason: "r".into(),
            request_id: "u-1".into(),
        };
        assert_eq!(
            in_force(&s, &unknown).unwrap_err(),
            Refusal::Grant(GrantRefused::Unknown("g-2".into()))
        );
        assert_eq!(withdraw(&s, "g-2", "r").unwrap(), s, "one gone stays gone");
        assert_eq!(withdraw(&s, "g-1", "").unwrap_err(), Refusal::NoReason);
        let w = withdraw(&s, "g-1", "done").unwrap();
        assert!(w.grants.is_empty());
        let mut later = lever(CommandType::RefreshToken, 1, 60);
        if let ControlCommand::Grant { request_id, .. } = &mut later {
            *request_id = "g-2".into();
        }
        let s2 = add(&s, &later, "alice", BTreeSet::new(), 2_000).unwrap();
        assert_eq!(s2.grants.keys().collect::<Vec<_>>(), vec!["g-2"]);
    }

    #[test]
    fn at_most_max_active_in_force() {
        let mut s = ControlState::initial();
        for i in 0..MAX_ACTIVE {
            let mut l = lever(CommandType::RefreshToken, 1, 3600);
            if let ControlCommand::Grant { request_id, .. } = &mut l {
                *request_id = format!("g-{i}");
            }
            s = add(&s, &l, "alice", BTreeSet::new(), 1_000).unwrap();
        }
        let mut one_more = lever(CommandType::RefreshToken, 1, 3600);
        if let ControlCommand::Grant { request_id, .. } = &mut one_more {
            *request_id = "g-x".into();
        }
        assert_eq!(
            add(&s, &one_more, "alice", BTreeSet::new(), 1_000).unwrap_err(),
            Refusal::Grant(GrantRefused::TooMany)
        );
    }
}
