//! Operator control: the runbook's two levers, pause (Emergency-INT-E01) and the master
//! shut-off (halt, Emergency-INT-E02), across every replica, plus the automatic trip.
//!
//! In: control messages on the control exchange (from operators, or from a replica that
//! tripped), and the last state stored in the broker. Out: the [`gate::Gate`] the pipeline
//! checks before judging and before every bridge call, events, and alerts. The state
//! transitions ([`transition`]) and the trip counting ([`trip`]) are pure.

mod anchor;
pub mod fold;
pub mod gate;
pub mod grant;
pub mod loosening;
pub mod revocation;
mod settings;
pub mod trip;

pub use grant::Grant;
pub use revocation::{Cut, Revocation};
pub use settings::{ControlSettings, EmptyStream};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One agent held out: its commands end REJECTED, never judged or executed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    pub by: String,
    pub reason: String,
    /// RFC 3339.
    pub since: String,
    pub request_id: String,
}

/// The system's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Mode {
    Running,
    Paused,
    Halted,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Running => "RUNNING",
            Mode::Paused => "PAUSED",
            Mode::Halted => "HALTED",
        }
    }
}

/// The state with its provenance: who, when, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlState {
    pub mode: Mode,
    /// RFC 3339.
    pub since: String,
    pub by: String,
    pub reason: String,
    /// The control request that set it.
    pub request_id: String,
    /// Its place in the stored state's history: every change is one more (see
    /// [`state_log`]).
    #[serde(default)]
    pub seq: u64,
    /// Agents in quarantine, by agent id. Kept apart from the mode: a quarantine or release
    /// is its own entry in the stored state and never moves `seq`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub quarantined: BTreeMap<String, Quarantined>,
    /// Services revoked or disconnected, by service: their REFRESH_TOKEN is refused until an
    /// operator records them reconnected. Like quarantines, their own entries, never `seq`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub revoked: BTreeMap<String, Revocation>,
    /// Loosening levers waiting for other operators, by proposal id (the lever's request id).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub proposals: BTreeMap<String, loosening::Proposal>,
    /// Scoped grants in force, by grant id (the grant lever's request id): see [`grant`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub grants: BTreeMap<String, Grant>,
    /// Policy files (SHA-256) that loosen the policy in force and were approved by the
    /// operators two people's rules need: a replica loads a looser file only if it is here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approved_policies: Vec<String>,
}

impl ControlState {
    /// The state of a system nobody has paused yet.
    pub fn initial() -> Self {
        Self {
            mode: Mode::Running,
            since: now(),
            by: "(start)".into(),
            reason: "no control state stored".into(),
            request_id: String::new(),
            seq: 0,
            quarantined: BTreeMap::new(),
            revoked: BTreeMap::new(),
            proposals: BTreeMap::new(),
            grants: BTreeMap::new(),
            approved_policies: Vec::new(),
        }
    }
}

/// What an operator (or a tripping replica) asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlCommand {
    Pause {
        reason: String,
        request_id: String,
    },
    Halt {
        reason: String,
        request_id: String,
    },
    /// `lift_halt` is the explicit confirmation a halt needs to be lifted.
    Resume {
        #[serde(default)]
        reason: String,
        #[serde(default)]
        lift_halt: bool,
        /// Lifting a halt (Emergency-INT-E02 step 4) names the post-mortem it follows.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        post_mortem: Option<String>,
        request_id: String,
    },
    Status {
        request_id: String,
    },
    /// Every replica reloads its policy file (validated whole, swapped at once; an invalid
    /// file is refused and the old policy stays).
    ReloadPolicy {
        request_id: String,
    },
    /// One agent's commands end REJECTED while every other agent's flow.
    Quarantine {
        agent: String,
        reason: String,
        request_id: String,
    },
    Release {
        agent: String,
        #[serde(default)]
        reason: String,
        request_id: String,
    },
    /// Emergency-INT-E01 step 2: the service's credentials revoked at the provider (where it
    /// allows) and deleted from the bridge; its REFRESH_TOKEN refused until reconnected.
    Revoke {
        service: String,
        reason: String,
        request_id: String,
    },
    /// Emergency-INT-E02 step 2: the integration disconnected (every credential of the
    /// service revoked and deleted); its REFRESH_TOKEN refused until reconnected.
    Disconnect {
        service: String,
        reason: String,
        request_id: String,
    },
    /// The service was reconnected by hand (SOP-INT-03): its REFRESH_TOKEN flows again.
    Reconnected {
        service: String,
        reason: String,
        request_id: String,
    },
    /// An operator opens an incident by hand (a halt or a trip opens one by itself): recorded
    /// in the audit trail by every replica, changing nothing it enforces.
    OpenIncident {
        reason: String,
        request_id: String,
    },
    /// Another operator seconds a loosening lever parked as a proposal, bound to its digest.
    Second {
        proposal: String,
        digest: String,
        reason: String,
        request_id: String,
    },
    /// An operator closes an incident opened by hand (`incident` is its id).
    CloseIncident {
        incident: String,
        reason: String,
        request_id: String,
    },
    /// A scoped, time-boxed grant (see [`grant`]): `agent`'s `command_type` for `service` let
    /// through without a human's approval, `uses` times within `for_secs`. A loosening lever.
    Grant {
        agent: String,
        command_type: crate::intake::CommandType,
        service: String,
        uses: u32,
        for_secs: u64,
        reason: String,
        request_id: String,
    },
    /// A policy file (its SHA-256) that loosens the policy in force, approved for loading:
    /// a loosening lever (two people), then `policy reload`.
    ApprovePolicy {
        digest: String,
        reason: String,
        request_id: String,
    },
    /// A grant withdrawn (`grant` is its id): its next use is refused.
    Ungrant {
        grant: String,
        reason: String,
        request_id: String,
    },
}

impl ControlCommand {
    pub fn request_id(&self) -> &str {
        match self {
            ControlCommand::Pause { request_id, .. }
            | ControlCommand::Halt { request_id, .. }
            | ControlCommand::Resume { request_id, .. }
            | ControlCommand::Status { request_id }
            | ControlCommand::ReloadPolicy { request_id }
            | ControlCommand::Quarantine { request_id, .. }
            | ControlCommand::Release { request_id, .. }
            | ControlCommand::Revoke { request_id, .. }
            | ControlCommand::Disconnect { request_id, .. }
            | ControlCommand::Reconnected { request_id, .. }
            | ControlCommand::OpenIncident { request_id, .. }
            | ControlCommand::Second { request_id, .. }
            | ControlCommand::CloseIncident { request_id, .. }
            | ControlCommand::Grant { request_id, .. }
            | ControlCommand::Ungrant { request_id, .. }
            | ControlCommand::ApprovePolicy { request_id, .. } => request_id,
        }
    }

    pub fn routing_key(&self) -> &'static str {
        match self {
            ControlCommand::Pause { .. } => "control.pause",
            ControlCommand::Halt { .. } => "control.halt",
            ControlCommand::Resume { .. } => "control.resume",
            ControlCommand::Status { .. } => "control.status",
            ControlCommand::ReloadPolicy { .. } => "control.policy_reload",
            ControlCommand::Quarantine { .. } => "control.quarantine",
            ControlCommand::Release { .. } => "control.release",
            ControlCommand::Revoke { .. } => "control.revoke",
            ControlCommand::Disconnect { .. } => "control.disconnect",
            ControlCommand::Reconnected { .. } => "control.reconnected",
            ControlCommand::OpenIncident { .. } => "control.incident_open",
            ControlCommand::Second { .. } => "control.second",
            ControlCommand::CloseIncident { .. } => "control.incident_close",
            ControlCommand::Grant { .. } => "control.grant",
            ControlCommand::Ungrant { .. } => "control.ungrant",
            ControlCommand::ApprovePolicy { .. } => "control.policy_approve",
        }
    }

    /// The cut a lever asks the bridge to carry out at the provider, and for which service.
    pub fn cut(&self) -> Option<(Cut, &str)> {
        match self {
            ControlCommand::Revoke { service, .. } => Some((Cut::Revoked, service)),
            ControlCommand::Disconnect { service, .. } => Some((Cut::Disconnected, service)),
            _ => None,
        }
    }
}

/// Who sent a control message, by its broker-checked `user_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    Operator(String),
    /// The poller's own broker user: a replica that tripped. It may only pause.
    Poller(String),
    /// Anyone else, including a message without `user_id`.
    Other(Option<String>),
}

impl Actor {
    pub fn classify(user_id: Option<&str>, operators: &[String], poller_user: &str) -> Actor {
        match user_id {
            Some(u) if operators.iter().any(|o| o == u) => Actor::Operator(u.to_owned()),
            Some(u) if u == poller_user => Actor::Poller(u.to_owned()),
            other => Actor::Other(other.map(str::to_owned)),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Actor::Operator(u) | Actor::Poller(u) => u.clone(),
            Actor::Other(Some(u)) => u.clone(),
            Actor::Other(None) => "(no user_id)".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0} is not an operator")]
    NotOperator(String),
    #[error("the poller's own user may only pause, quarantine or revoke")]
    PollerMayOnlyPause,
    #[error("not an agent id: {0}")]
    BadAgent(String),
    #[error("not a service: {0}")]
    BadService(String),
    #[error("revoke, disconnect, reconnected, a grant or its withdrawal, a second and an incident's opening or closing need a reason (it goes to the security team and the audit record)")]
    NoReason,
    #[error(transparent)]
    Grant(#[from] grant::GrantRefused),
    #[error("not a policy file's SHA-256 (64 hex digits): {0}")]
    BadDigest(String),
    #[error("the system is halted: resuming needs the explicit confirmation (resume --lift-halt)")]
    HaltNeedsConfirmation,
    #[error("the system is halted; a pause changes nothing")]
    AlreadyHalted,
    #[error("lifting a halt (Emergency-INT-E02 step 4) names the post-mortem it follows: resume --lift-halt --post-mortem REF")]
    NoPostMortem,
    /// A lever whose change the stored state (read afresh) does not show: it was never
    /// written to the state stream, or a concurrent change won. A lever changes nothing by
    /// itself.
    #[error("the stored control state does not show this change (read afresh): a lever takes effect only through the state stream, which `command-poller` writes before it sends the lever")]
    NotStored,
}

impl Refusal {
    /// A refusal that smells of an attack (alerted to security), rather than operator error.
    pub fn is_security_relevant(&self) -> bool {
        matches!(self, Refusal::NotOperator(_) | Refusal::PollerMayOnlyPause)
    }
}

pub use crate::clock::now_rfc3339 as now;

/// Whether `state` shows what `cmd` asks for. A lever never changes what a replica enforces:
/// the stored state (the state stream) does, and the lever is answered once the state the
/// replica enforces shows it. A pause is shown by a halt too (stricter), a release by an agent
/// not in quarantine; `status` and `policy reload` ask for no state.
pub fn shows(state: &ControlState, cmd: &ControlCommand) -> bool {
    match cmd {
        // A loosening lever parked for other operators shows as its proposal.
        cmd if state.proposals.contains_key(cmd.request_id()) => true,
        ControlCommand::Pause { .. } => state.mode != Mode::Running,
        ControlCommand::Halt { .. } => state.mode == Mode::Halted,
        ControlCommand::Resume { .. } => state.mode == Mode::Running,
        ControlCommand::Quarantine { agent, .. } => state.quarantined.contains_key(agent),
        ControlCommand::Release { agent, .. } => !state.quarantined.contains_key(agent),
        // A service already cut the other way shows it too (both refuse its refresh).
        ControlCommand::Revoke { service, .. } | ControlCommand::Disconnect { service, .. } => {
            state.revoked.contains_key(service)
        }
        ControlCommand::Reconnected { service, .. } => !state.revoked.contains_key(service),
        ControlCommand::Grant { request_id, .. } => state.grants.contains_key(request_id),
        ControlCommand::Ungrant { grant, .. } => !state.grants.contains_key(grant),
        ControlCommand::ApprovePolicy { digest, .. } => state.approved_policies.contains(digest),
        ControlCommand::Status { .. }
        | ControlCommand::ReloadPolicy { .. }
        | ControlCommand::OpenIncident { .. }
        | ControlCommand::CloseIncident { .. }
        | ControlCommand::Second { .. } => true,
    }
}

/// The new state after `cmd` from `actor`, or why it is refused. `Status` never changes state.
pub fn transition(
    current: &ControlState,
    cmd: &ControlCommand,
    actor: &Actor,
) -> Result<ControlState, Refusal> {
    let by = match actor {
        Actor::Other(u) => {
            return Err(Refusal::NotOperator(
                u.clone().unwrap_or_else(|| "(no user_id)".into()),
            ))
        }
        Actor::Poller(_)
            if !matches!(
                cmd,
                ControlCommand::Pause { .. }
                    | ControlCommand::Status { .. }
                    | ControlCommand::Quarantine { .. }
                    | ControlCommand::Revoke { .. }
            ) =>
        {
            return Err(Refusal::PollerMayOnlyPause)
        }
        a => a.name(),
    };
    let set = |mode: Mode, reason: &str| ControlState {
        mode,
        since: now(),
        by: by.clone(),
        reason: reason.to_owned(),
        request_id: cmd.request_id().to_owned(),
        seq: current.seq + 1,
        quarantined: current.quarantined.clone(),
        revoked: current.revoked.clone(),
        proposals: current.proposals.clone(),
        grants: current.grants.clone(),
        approved_policies: current.approved_policies.clone(),
    };
    match cmd {
        ControlCommand::Status { .. } | ControlCommand::ReloadPolicy { .. } => Ok(current.clone()),
        // Recorded, changing nothing enforced; what a second changes is decided by
        // `loosening::second` (it needs who and when).
        ControlCommand::OpenIncident { reason, .. }
        | ControlCommand::CloseIncident { reason, .. }
        | ControlCommand::Second { reason, .. } => {
            if reason.trim().is_empty() {
                return Err(Refusal::NoReason);
            }
            Ok(current.clone())
        }
        ControlCommand::Quarantine { agent, reason, .. } => {
            held_out(current, agent, Some((reason, &by, cmd.request_id())))
        }
        ControlCommand::Release { agent, .. } => held_out(current, agent, None),
        ControlCommand::Revoke { reason, .. } | ControlCommand::Disconnect { reason, .. } => {
            let (cut, service) = cmd.cut().expect("a revoke or disconnect is a cut");
            let lever = (reason.as_str(), by.as_str(), cmd.request_id());
            revocation::cut_off(current, cut, service, lever)
        }
        ControlCommand::Reconnected {
            service, reason, ..
        } => revocation::reconnected(current, service, reason),
        ControlCommand::Grant { .. } => grant::add(
            current,
            cmd,
            &by,
            Default::default(),
            crate::clock::unix_now(),
        ),
        ControlCommand::Ungrant { grant, reason, .. } => grant::withdraw(current, grant, reason),
        ControlCommand::ApprovePolicy { digest, reason, .. } => {
            loosening::approve_policy(current, digest, reason)
        }
        ControlCommand::Halt { reason, .. } => Ok(set(Mode::Halted, reason)),
        ControlCommand::Pause { reason, .. } => match current.mode {
            Mode::Halted => Err(Refusal::AlreadyHalted),
            // Already paused: keep who paused first and why.
            Mode::Paused => Ok(current.clone()),
            Mode::Running => Ok(set(Mode::Paused, reason)),
        },
        ControlCommand::Resume {
            reason,
            lift_halt,
            post_mortem,
            ..
        } => match current.mode {
            Mode::Halted if !lift_halt => Err(Refusal::HaltNeedsConfirmation),
            Mode::Halted if post_mortem.as_deref().is_none_or(|p| p.trim().is_empty()) => {
                Err(Refusal::NoPostMortem)
            }
            Mode::Running => Ok(current.clone()),
            _ => Ok(set(
                Mode::Running,
                if reason.is_empty() { "resumed" } else { reason },
            )),
        },
    }
}

/// `current` with `agent` quarantined (`Some((reason, by, request_id))`; one already there
/// stays: who did it first and why) or released (`None`).
fn held_out(
    current: &ControlState,
    agent: &str,
    quarantine: Option<(&str, &str, &str)>,
) -> Result<ControlState, Refusal> {
    crate::intake::AgentId::parse(agent).map_err(|e| Refusal::BadAgent(e.to_string()))?;
    let mut new = current.clone();
    match quarantine {
        Some((reason, by, request_id)) => {
            new.quarantined
                .entry(agent.to_owned())
                .or_insert_with(|| Quarantined {
                    by: by.to_owned(),
                    reason: reason.to_owned(),
                    since: now(),
                    request_id: request_id.to_owned(),
                });
        }
        None => {
            new.quarantined.remove(agent);
        }
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op() -> Actor {
        Actor::Operator("ops".into())
    }
    fn pause() -> ControlCommand {
        ControlCommand::Pause {
            reason: "E01".into(),
            request_id: "r1".into(),
        }
    }
    fn halt() -> ControlCommand {
        ControlCommand::Halt {
            reason: "E02".into(),
            request_id: "r2".into(),
        }
    }
    fn resume(lift: bool) -> ControlCommand {
        ControlCommand::Resume {
            reason: String::new(),
            lift_halt: lift,
            post_mortem: lift.then(|| "PM-1".into()),
            request_id: "r3".into(),
        }
    }
    fn state(mode: Mode) -> ControlState {
        ControlState {
            mode,
            ..ControlState::initial()
        }
    }

    #[test]
    fn operators_pull_the_levers() {
        let s = transition(&state(Mode::Running), &pause(), &op()).unwrap();
        assert_eq!(s.mode, Mode::Paused);
        assert_eq!(s.by, "ops");
        assert_eq!(s.reason, "E01");
        assert_eq!(
            transition(&s, &resume(false), &op()).unwrap().mode,
            Mode::Running
        );
        let h = transition(&s, &halt(), &op()).unwrap();
        assert_eq!(h.mode, Mode::Halted);
    }

    #[test]
    fn a_halt_needs_the_confirmation_to_lift() {
        let h = state(Mode::Halted);
        assert_eq!(
            transition(&h, &resume(false), &op()),
            Err(Refusal::HaltNeedsConfirmation)
        );
        assert_eq!(
            transition(&h, &resume(true), &op()).unwrap().mode,
            Mode::Running
        );
        assert_eq!(transition(&h, &pause(), &op()), Err(Refusal::AlreadyHalted));
    }

    #[test]
    fn lifting_a_halt_names_its_post_mortem() {
        let lift = |pm: Option<&str>| ControlCommand::Resume {
            reason: "back".into(),
            lift_halt: true,
            post_mortem: pm.map(str::to_owned),
            request_id: "r".into(),
        };
        let h = state(Mode::Halted);
        assert_eq!(
            transition(&h, &lift(None), &op()),
            Err(Refusal::NoPostMortem)
        );
        assert_eq!(
            transition(&h, &lift(Some(" ")), &op()),
            Err(Refusal::NoPostMortem)
        );
        assert!(transition(&h, &lift(Some("PM-7")), &op()).is_ok());
        // A pause needs none.
        assert!(transition(&state(Mode::Paused), &lift(None), &op()).is_ok());
    }

    #[test]
    fn nobody_else_can() {
        for cmd in [pause(), halt(), resume(true)] {
            let e = transition(
                &state(Mode::Paused),
                &cmd,
                &Actor::Other(Some("agent-7".into())),
            )
            .unwrap_err();
            assert!(e.is_security_relevant());
            assert!(transition(&state(Mode::Paused), &cmd, &Actor::Other(None)).is_err());
        }
        let poller = Actor::Poller("poller".into());
        assert_eq!(
            transition(&state(Mode::Running), &pause(), &poller)
                .unwrap()
                .mode,
            Mode::Paused
        );
        assert_eq!(
            transition(&state(Mode::Paused), &resume(false), &poller),
            Err(Refusal::PollerMayOnlyPause)
        );
        assert_eq!(
            transition(&state(Mode::Running), &halt(), &poller),
            Err(Refusal::PollerMayOnlyPause)
        );
    }

    #[test]
    fn classify_by_user_id() {
        let ops = vec!["ops".to_string()];
        assert_eq!(
            Actor::classify(Some("ops"), &ops, "poller"),
            Actor::Operator("ops".into())
        );
        assert_eq!(
            Actor::classify(Some("poller"), &ops, "poller"),
            Actor::Poller("poller".into())
        );
        assert_eq!(
            Actor::classify(Some("x"), &ops, "poller"),
            Actor::Other(Some("x".into()))
        );
        assert_eq!(Actor::classify(None, &ops, "poller"), Actor::Other(None));
    }

    fn quarantine(agent: &str) -> ControlCommand {
        ControlCommand::Quarantine {
            agent: agent.into(),
            reason: "looping".into(),
            request_id: "q1".into(),
        }
    }

    #[test]
    fn quarantine_holds_one_agent_and_only_an_operator_releases() {
        let release = ControlCommand::Release {
            agent: "agent-7".into(),
            reason: String::new(),
            request_id: "q2".into(),
        };
        let s = transition(&state(Mode::Running), &quarantine("agent-7"), &op()).unwrap();
        assert_eq!(s.mode, Mode::Running, "the fleet keeps running");
        assert_eq!(s.seq, 0, "a quarantine never moves the mode's sequence");
        assert_eq!(s.quarantined["agent-7"].by, "ops");
        let again = transition(
            &s,
            &ControlCommand::Quarantine {
                agent: "agent-7".into(),
                reason: "other".into(),
                request_id: "q3".into(),
            },
            &op(),
        )
        .unwrap();
        assert_eq!(
            again.quarantined["agent-7"].reason, "looping",
            "the first stays"
        );
        // A pause keeps the quarantine list.
        let paused = transition(&s, &pause(), &op()).unwrap();
        assert!(paused.quarantined.contains_key("agent-7"));
        let poller = Actor::Poller("poller".into());
        assert!(transition(&state(Mode::Halted), &quarantine("a"), &poller).is_ok());
        assert_eq!(
            transition(&s, &release, &poller),
            Err(Refusal::PollerMayOnlyPause)
        );
        assert!(transition(&s, &release, &Actor::Other(Some("agent-7".into()))).is_err());
        assert!(transition(&s, &release, &op())
            .unwrap()
            .quarantined
            .is_empty());
        assert!(matches!(
            transition(&s, &quarantine("no such agent!"), &op()),
            Err(Refusal::BadAgent(_))
        ));
        let reload = ControlCommand::ReloadPolicy {
            request_id: "r".into(),
        };
        assert_eq!(transition(&s, &reload, &op()).unwrap(), s);
        assert!(transition(&s, &reload, &poller).is_err());
    }

    fn revoke(service: &str, reason: &str) -> ControlCommand {
        ControlCommand::Revoke {
            service: service.into(),
            reason: reason.into(),
            request_id: "v1".into(),
        }
    }

    #[test]
    fn a_cut_is_an_operators_or_a_trips_and_only_an_operator_records_a_reconnection() {
        let running = state(Mode::Running);
        let s = transition(&running, &revoke("google", "E01"), &op()).unwrap();
        assert_eq!(s.revoked["google"].cut, Cut::Revoked);
        assert_eq!(s.revoked["google"].by, "ops");
        assert_eq!(s.seq, running.seq, "a cut never moves the mode's sequence");
        assert_eq!(s.mode, Mode::Running, "a cut pauses nothing by itself");
        assert!(shows(&s, &revoke("google", "E01")));
        // Already cut: the first stays, and a disconnect shows on it too.
        let disconnect = ControlCommand::Disconnect {
            service: "google".into(),
            reason: "E02".into(),
            request_id: "d1".into(),
        };
        let again = transition(&s, &disconnect, &op()).unwrap();
        assert_eq!(again.revoked["google"].reason, "E01");
        assert!(shows(&again, &disconnect));
        // Works while halted: step 2 comes after step 1.
        let halted = transition(&state(Mode::Halted), &disconnect, &op()).unwrap();
        assert_eq!(halted.revoked["google"].cut, Cut::Disconnected);
        assert_eq!(halted.mode, Mode::Halted);
        let reconnected = |reason: &str| ControlCommand::Reconnected {
            service: "google".into(),
            reason: reason.into(),
            request_id: "c1".into(),
        };
        let poller = Actor::Poller("poller".into());
        assert!(transition(&running, &revoke("google", "trip"), &poller).is_ok());
        assert_eq!(
            transition(&s, &disconnect, &poller),
            Err(Refusal::PollerMayOnlyPause)
        );
        assert_eq!(
            transition(&s, &reconnected("SOP-INT-03 done"), &poller),
            Err(Refusal::PollerMayOnlyPause)
        );
        let agent = Actor::Other(Some("agent-7".into()));
        for cmd in [revoke("google", "x"), disconnect.clone(), reconnected("x")] {
            let e = transition(&s, &cmd, &agent).unwrap_err();
            assert!(e.is_security_relevant(), "{cmd:?}");
        }
        assert_eq!(
            transition(&s, &reconnected(" "), &op()),
            Err(Refusal::NoReason)
        );
        assert_eq!(
            transition(&running, &revoke("google", ""), &op()),
            Err(Refusal::NoReason)
        );
        assert!(matches!(
            transition(&running, &revoke("Google Ads", "x"), &op()),
            Err(Refusal::BadService(_))
        ));
        let back = transition(&s, &reconnected("SOP-INT-03 review #12"), &op()).unwrap();
        assert!(back.revoked.is_empty());
        assert!(shows(&back, &reconnected("x")));
        assert!(!shows(&back, &revoke("google", "x")));
        // A pause keeps the cut.
        assert!(transition(&s, &pause(), &op())
            .unwrap()
            .revoked
            .contains_key("google"));
    }

    #[test]
    fn a_state_shows_a_lever_when_it_holds_what_the_lever_asks_for() {
        let (running, paused, halted) = (
            state(Mode::Running),
            state(Mode::Paused),
            state(Mode::Halted),
        );
        assert!(!shows(&running, &pause()));
        assert!(shows(&paused, &pause()));
        assert!(shows(&halted, &pause()), "a halt is stricter than a pause");
        assert!(!shows(&paused, &halt()));
        assert!(shows(&halted, &halt()));
        assert!(!shows(&halted, &resume(true)));
        assert!(!shows(&paused, &resume(false)));
        assert!(shows(&running, &resume(false)));
        // What the transition makes always shows the lever.
        for (from, cmd) in [
            (&running, pause()),
            (&paused, halt()),
            (&halted, resume(true)),
            (&running, quarantine("agent-7")),
        ] {
            let to = transition(from, &cmd, &op()).unwrap();
            assert!(shows(&to, &cmd), "{cmd:?}");
            assert!(!shows(from, &cmd), "{cmd:?}");
        }
        let held = transition(&running, &quarantine("agent-7"), &op()).unwrap();
        let release = ControlCommand::Release {
            agent: "agent-7".into(),
            reason: String::new(),
            request_id: "r".into(),
        };
        assert!(shows(&held, &quarantine("agent-7")));
        assert!(!shows(&held, &release));
        assert!(shows(&running, &release));
        assert!(!shows(&running, &quarantine("agent-7")));
        let status = ControlCommand::Status {
            request_id: "r".into(),
        };
        assert!(shows(&halted, &status));
    }
}
