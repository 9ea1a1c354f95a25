//! Incidents, read from the audit chain: what opened one (a halt, the automatic trip, an
//! automatic quarantine, an operator's `incident open`), what closed it, and everything in
//! between: every lever, trip, refusal, cut and approval decision, and the actions affected, by
//! agent and by service, with the policy digests in force. The E02 post-mortem and the E01
//! "investigate … escalate … for a full audit" start here.
//!
//! In: the audit records in chain order, with their sequence numbers. Out: the [`Incident`]s,
//! pure and deterministic, so the same records always give the same incident (an exported
//! bundle is checked by building it again from its own records).
//!
//! The chain holds one control record per replica for a change every replica applies (a halt,
//! a pause from the stream): records of one change share its request id and are one entry.

use crate::audit::{AuditEvent, AuditRecord};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Control record kinds that open an incident.
pub const HALTED: &str = "halted";
pub const TRIPPED: &str = "tripped";
pub const OPENED: &str = "incident_opened";
pub const CLOSED: &str = "incident_closed";
pub const QUARANTINED: &str = "quarantined";
/// The mode change that ends a halt's or a trip's incident (the mode's name, lower case).
pub const RUNNING: &str = "running";

/// What opened an incident.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Opener {
    /// The master shut-off (Emergency-INT-E02).
    Halt,
    /// The automatic trip that paused the fleet (Emergency-INT-E01).
    Trip,
    /// The agent-scoped trip: this agent quarantined automatically.
    Quarantine { agent: String },
    /// An operator's `incident open`.
    Manual,
}

/// Who ended it and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closing {
    pub seq: u64,
    pub at: String,
    pub by: String,
    pub reason: String,
}

/// One line of the timeline: a control change (once, however many replicas recorded it) or a
/// command's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub at: String,
    pub what: String,
}

/// A command the incident touched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Affected {
    pub action_id: String,
    pub agent: String,
    pub service: Option<String>,
    pub command_type: Option<String>,
    /// The last status published for it in the incident's records.
    pub status: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incident {
    /// The request id of the change that opened it.
    pub id: String,
    pub opener: Opener,
    pub opened_seq: u64,
    pub opened_at: String,
    pub opened_by: String,
    pub reason: String,
    pub closed: Option<Closing>,
    pub timeline: Vec<Entry>,
    pub affected: Vec<Affected>,
    /// Action ids by agent, and by service.
    pub by_agent: BTreeMap<String, Vec<String>>,
    pub by_service: BTreeMap<String, Vec<String>>,
    /// Every policy digest that decided a command or was reloaded within it.
    pub policy_sha256: BTreeSet<String>,
    /// The sequence numbers of every record it was built from (for an export).
    pub seqs: BTreeSet<u64>,
}

/// The control change in a record, if it is one.
fn control(r: &AuditRecord) -> Option<(&str, &str, &str, &str, Option<&str>)> {
    r.events.iter().find_map(|e| match e {
        AuditEvent::ControlChange {
            kind,
            actor,
            request_id,
            reason,
            detail,
            ..
        } => Some((
            kind.as_str(),
            actor.as_str(),
            request_id.as_str(),
            reason.as_str(),
            detail.as_deref(),
        )),
        _ => None,
    })
}

/// What `(kind, detail)` opens, if anything.
fn opener(kind: &str, detail: Option<&str>) -> Option<Opener> {
    match kind {
        HALTED => Some(Opener::Halt),
        TRIPPED => Some(Opener::Trip),
        OPENED => Some(Opener::Manual),
        // `agent X: automatic trip: ...`, as the agent-scoped trip records it.
        QUARANTINED => {
            let d = detail?;
            let (agent, why) = d.strip_prefix("agent ")?.split_once(": ")?;
            why.starts_with("automatic trip")
                .then(|| Opener::Quarantine {
                    agent: agent.to_owned(),
                })
        }
        _ => None,
    }
}

/// Whether a control change `(kind, detail)` closes an incident opened by `o` with `id`.
fn closes(o: &Opener, id: &str, kind: &str, detail: Option<&str>) -> bool {
    match o {
        Opener::Halt | Opener::Trip => kind == RUNNING,
        Opener::Manual => kind == CLOSED && detail.is_some_and(|d| d.starts_with(id)),
        Opener::Quarantine { agent } => {
            kind == "released" && detail.is_some_and(|d| d.starts_with(&format!("agent {agent}:")))
        }
    }
}

/// Every incident in `records` (chain order), oldest first.
pub fn incidents(records: &[(u64, AuditRecord)]) -> Vec<Incident> {
    let mut out: Vec<Incident> = Vec::new();
    for (i, (seq, r)) in records.iter().enumerate() {
        let Some((kind, actor, request_id, reason, detail)) = control(r) else {
            continue;
        };
        let Some(o) = opener(kind, detail) else {
            continue;
        };
        // Another replica's record of a change already opened.
        if out.iter().any(|x| x.id == request_id) || request_id.is_empty() {
            continue;
        }
        let closing = records[i + 1..].iter().find_map(|(s, later)| {
            let (k, by, _, why, d) = control(later)?;
            closes(&o, request_id, k, d).then(|| Closing {
                seq: *s,
                at: later.at.clone(),
                by: by.to_owned(),
                reason: d.filter(|_| k == CLOSED).unwrap_or(why).to_owned(),
            })
        });
        let reason = match (&o, detail) {
            (Opener::Manual | Opener::Quarantine { .. }, Some(d)) => d.to_owned(),
            _ => reason.to_owned(),
        };
        let mut inc = Incident {
            id: request_id.to_owned(),
            opener: o,
            opened_seq: *seq,
            opened_at: r.at.clone(),
            opened_by: actor.to_owned(),
            reason,
            closed: closing,
            timeline: Vec::new(),
            affected: Vec::new(),
            by_agent: BTreeMap::new(),
            by_service: BTreeMap::new(),
            policy_sha256: BTreeSet::new(),
            seqs: BTreeSet::new(),
        };
        fill(&mut inc, records);
        out.push(inc);
    }
    out
}

/// The incident's records: everything from its opening to its closing (or the end), and the
/// earlier commands its opening names (the attempts that tripped it).
fn fill(inc: &mut Incident, records: &[(u64, AuditRecord)]) {
    let last = inc.closed.as_ref().map_or(u64::MAX, |c| c.seq);
    let reason = inc.reason.clone();
    let named = |r: &AuditRecord| {
        r.action_id
            .as_ref()
            .is_some_and(|a| mentions(&reason, a.as_str()))
    };
    let mut seen_changes: BTreeSet<(String, String)> = BTreeSet::new();
    for (seq, r) in records {
        let within = *seq >= inc.opened_seq && *seq <= last;
        if !(within || (*seq < inc.opened_seq && r.kind == "command" && named(r))) {
            continue;
        }
        if let Some((kind, actor, request_id, reason, detail)) = control(r) {
            inc.seqs.insert(*seq);
            if !seen_changes.insert((kind.to_owned(), request_id.to_owned())) {
                continue; // another replica's record of the same change
            }
            let text = detail.unwrap_or(reason);
            inc.timeline.push(Entry {
                seq: *seq,
                at: r.at.clone(),
                what: format!("{kind} by {actor}: {text}"),
            });
            continue;
        }
        inc.seqs.insert(*seq);
        for e in &r.events {
            match e {
                AuditEvent::PolicyDecision { policy_sha256, .. } => {
                    inc.policy_sha256.insert(policy_sha256.clone());
                }
                AuditEvent::PolicyReload { after, .. } => {
                    inc.policy_sha256.insert(after.clone());
                }
                _ => {}
            }
        }
        match r.kind.as_str() {
            "command" => command(inc, *seq, r),
            "approval" => approval(inc, *seq, r),
            _ => {}
        }
    }
}

/// `text` names `id` as a whole word (trip reasons list the attempts' action ids).
fn mentions(text: &str, id: &str) -> bool {
    text.split(|c: char| c.is_whitespace() || c == ',' || c == ';' || c == '(' || c == ')')
        .any(|w| w == id)
}

/// An approver's decision (its refusal, or the expiry) joins the timeline.
fn approval(inc: &mut Incident, seq: u64, r: &AuditRecord) {
    for e in &r.events {
        if let AuditEvent::ApprovalDecision {
            approval_id,
            by,
            decision,
            outcome,
            refusal,
            ..
        } = e
        {
            let on = r
                .action_id
                .as_ref()
                .map_or(approval_id.as_str(), |a| a.as_str());
            let refused = refusal
                .as_ref()
                .map(|x| format!(" ({x})"))
                .unwrap_or_default();
            inc.timeline.push(Entry {
                seq,
                at: r.at.clone(),
                what: format!("approval {decision} by {by} on {on}: {outcome}{refused}"),
            });
        }
    }
}

/// A command's record joins the timeline and the affected actions.
fn command(inc: &mut Incident, seq: u64, r: &AuditRecord) {
    let Some(action_id) = r.action_id.as_ref().map(|a| a.as_str().to_owned()) else {
        return;
    };
    let agent = r
        .agent
        .as_ref()
        .map_or_else(|| "(unknown)".to_owned(), |a| a.as_str().to_owned());
    let mut service = None;
    let mut command_type = None;
    let mut status = None;
    let mut notes = Vec::new();
    for e in &r.events {
        match e {
            AuditEvent::PolicyDecision {
                command: Some(c), ..
            } => {
                service = Some(c.service.as_str().to_owned());
                command_type = Some(c.command_type.as_str().to_owned());
            }
            AuditEvent::ResultPublished { status: s, .. } => {
                status = Some(crate::outcome::wire_name(s));
            }
            AuditEvent::ApprovalDecision {
                by,
                decision,
                outcome,
                ..
            } => notes.push(format!("{decision} by {by} ({outcome})")),
            AuditEvent::Rejected { field, .. } => notes.push(format!("rejected ({field})")),
            _ => {}
        }
    }
    let what = format!(
        "{} {} of {agent} for {}: {}{}",
        command_type.as_deref().unwrap_or("command"),
        action_id,
        service.as_deref().unwrap_or("?"),
        status.as_deref().unwrap_or("no result yet"),
        if notes.is_empty() {
            String::new()
        } else {
            format!(" [{}]", notes.join("; "))
        }
    );
    inc.timeline.push(Entry {
        seq,
        at: r.at.clone(),
        what,
    });
    let ids = inc.by_agent.entry(agent.clone()).or_default();
    if !ids.contains(&action_id) {
        ids.push(action_id.clone());
    }
    if let Some(s) = &service {
        let ids = inc.by_service.entry(s.clone()).or_default();
        if !ids.contains(&action_id) {
            ids.push(action_id.clone());
        }
    }
    match inc
        .affected
        .iter_mut()
        .find(|a| a.action_id == action_id && a.agent == agent)
    {
        Some(a) => {
            a.status = status.or(a.status.take());
            a.service = a.service.take().or(service);
            a.command_type = a.command_type.take().or(command_type);
        }
        None => inc.affected.push(Affected {
            action_id,
            agent,
            service,
            command_type,
            status,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::DecidedCommand;
    use crate::intake::{ActionId, AgentId, CommandType, Service};
    use crate::outcome::Status;

    fn control_record(
        kind: &str,
        actor: &str,
        request_id: &str,
        detail: Option<&str>,
    ) -> AuditRecord {
        AuditRecord {
            kind: "control".into(),
            action_id: None,
            agent: None,
            instance: "r1".into(),
            at: format!("t-{kind}"),
            events: vec![AuditEvent::ControlChange {
                at: "t".into(),
                kind: kind.into(),
                actor: actor.into(),
                request_id: request_id.into(),
                mode: "PAUSED".into(),
                reason: format!("why {kind}"),
                detail: detail.map(str::to_owned),
            }],
        }
    }

    fn command_record(id: &str, agent: &str, service: &str, status: Status) -> AuditRecord {
        AuditRecord {
            kind: "command".into(),
            action_id: Some(ActionId::parse(id).unwrap()),
            agent: Some(AgentId::parse(agent).unwrap()),
            instance: "r1".into(),
            at: format!("t-{id}"),
            events: vec![
                AuditEvent::PolicyDecision {
                    at: "t".into(),
                    handling: crate::policy::Handling::Judge,
                    declared_severity: crate::intake::Severity::Medium,
                    effective_severity: crate::intake::Severity::Medium,
                    severity_mismatch: false,
                    rationale: "r".into(),
                    policy_sha256: "p1".into(),
                    command: Some(DecidedCommand {
                        command_type: CommandType::RefreshToken,
                        service: Service::parse(service).unwrap(),
                        agent: agent.into(),
                        agent_verified: true,
                    }),
                    rule: None,
                    shadows: vec![],
                },
                AuditEvent::ResultPublished {
                    at: "t".into(),
                    status,
                    routing_key: "k".into(),
                    rationale: "r".into(),
                },
            ],
        }
    }

    fn numbered(records: Vec<AuditRecord>) -> Vec<(u64, AuditRecord)> {
        records
            .into_iter()
            .enumerate()
            .map(|(i, r)| (i as u64 + 1, r))
            .collect()
    }

    #[test]
    fn a_trip_opens_an_incident_holding_its_attempts_and_a_resume_closes_it() {
        let records = numbered(vec![
            command_record("before", "agent-2", "meta", Status::Success),
            command_record("rt-1", "agent-7", "google", Status::NeedsApproval),
            command_record("rt-2", "agent-7", "google", Status::NeedsApproval),
            control_record(TRIPPED, "poller", "trip-req", None),
            control_record("paused", "poller", "trip-req", None),
            control_record("revoked", "poller", "cut-req", Some("service google: trip")),
            command_record("during", "agent-3", "mailchimp", Status::Rejected),
            AuditRecord {
                kind: "approval".into(),
                action_id: Some(ActionId::parse("rt-1").unwrap()),
                agent: Some(AgentId::parse("agent-7").unwrap()),
                instance: "i".into(),
                at: "t".into(),
                events: vec![AuditEvent::ApprovalDecision {
                    at: "t".into(),
                    approval_id: "ap-1".into(),
                    by: "ann".into(),
                    decision: "deny".into(),
                    digest: None,
                    reason: "the trip".into(),
                    outcome: "denied".into(),
                    refusal: None,
                }],
            },
            control_record(RUNNING, "ops", "resume-req", None),
            command_record("after", "agent-7", "google", Status::Success),
        ]);
        let mut t = incidents(&records)[0].clone();
        // The trip's reason names its attempts, as `Trip::reason` writes it.
        assert_eq!(t.id, "trip-req");
        assert_eq!(t.opener, Opener::Trip);
        assert_eq!(t.closed.as_ref().unwrap().by, "ops");
        assert_eq!(t.closed.as_ref().unwrap().seq, 9);
        t.reason = "automatic trip: rt-1, rt-2".into();
        t.timeline.clear();
        t.affected.clear();
        t.by_agent.clear();
        t.by_service.clear();
        t.seqs.clear();
        fill(&mut t, &records);
        let ids: Vec<&str> = t.affected.iter().map(|a| a.action_id.as_str()).collect();
        assert_eq!(ids, vec!["rt-1", "rt-2", "during"], "not before, not after");
        assert_eq!(t.by_agent["agent-7"], vec!["rt-1", "rt-2"]);
        assert_eq!(t.by_service["mailchimp"], vec!["during"]);
        assert_eq!(t.affected[0].status.as_deref(), Some("NEEDS_APPROVAL"));
        assert!(t.policy_sha256.contains("p1"));
        let kinds: Vec<&str> = t.timeline.iter().map(|e| e.what.as_str()).collect();
        assert!(
            kinds.iter().any(|w| w.starts_with("revoked by poller")),
            "{kinds:?}"
        );
        assert!(
            kinds.iter().any(|w| w.starts_with("running by ops")),
            "{kinds:?}"
        );
        assert!(
            kinds.contains(&"approval deny by ann on rt-1: denied"),
            "{kinds:?}"
        );
        assert_eq!(
            t.seqs.iter().copied().collect::<Vec<_>>(),
            vec![2, 3, 4, 5, 6, 7, 8, 9]
        );
    }

    #[test]
    fn one_change_recorded_by_every_replica_is_one_incident_and_one_entry() {
        let records = numbered(vec![
            control_record(HALTED, "ops", "halt-1", None),
            control_record(HALTED, "ops", "halt-1", None),
            control_record(HALTED, "ops", "halt-1", None),
        ]);
        let all = incidents(&records);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].timeline.len(), 1);
        assert!(all[0].closed.is_none(), "still open");
        assert_eq!(all[0].seqs.len(), 3, "every record is exported");
    }

    #[test]
    fn a_manual_incident_closes_on_its_own_close_and_an_automatic_quarantine_on_its_release() {
        let records = numbered(vec![
            control_record(OPENED, "ops", "inc-1", Some("suspicious logins")),
            control_record(
                QUARANTINED,
                "poller",
                "q-1",
                Some("agent agent-9: automatic trip: 3 unapproved CONNECT_INTEGRATION attempts"),
            ),
            control_record(QUARANTINED, "ops", "q-2", Some("agent agent-5: looping")),
            control_record(CLOSED, "ops", "c-x", Some("inc-other: no")),
            control_record("released", "ops", "r-1", Some("agent agent-9: fixed")),
            control_record(CLOSED, "ops", "c-1", Some("inc-1: false alarm")),
        ]);
        let all = incidents(&records);
        assert_eq!(all.len(), 2, "an operator's quarantine opens none: {all:?}");
        assert_eq!(all[0].opener, Opener::Manual);
        assert_eq!(all[0].reason, "suspicious logins");
        assert_eq!(all[0].closed.as_ref().unwrap().seq, 6);
        assert_eq!(all[0].closed.as_ref().unwrap().reason, "inc-1: false alarm");
        assert_eq!(
            all[1].opener,
            Opener::Quarantine {
                agent: "agent-9".into()
            }
        );
        assert_eq!(all[1].closed.as_ref().unwrap().seq, 5);
    }

    #[test]
    fn an_action_id_is_named_only_as_a_whole_word() {
        assert!(mentions("attempts within 600 s: rt-1, rt-2", "rt-1"));
        assert!(!mentions("attempts within 600 s: rt-10, rt-2", "rt-1"));
    }
}
