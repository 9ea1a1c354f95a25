//! `policy replay`: every recorded command re-decided under a candidate policy.
//!
//! In: audit records (the chain file's lines, or bare records), whose `policy_decision` events
//! carry the validated command fields ([`DecidedCommand`]: never the payload, its params,
//! tokens or secrets), and the candidate policy. Out: a [`ReplayReport`]: counts by old → new
//! handling and every command whose handling, rule or rationale changed. Nothing is executed,
//! judged or published. Pure but for reading the file.
//!
//! History-aware conditions see what the pipeline saw: each command's earlier decided commands
//! of the same agent and type in the file, within the condition's window. A command decided
//! more than once (deferred, then redelivered) counts once, at its last decision.

use super::{Facts, Handling, Policy};
use crate::audit::{AuditEvent, AuditRecord};
use crate::intake::{ActionId, Command, CommandType, Severity};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

pub use crate::audit::DecidedCommand;

/// One recorded decision, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub action_id: ActionId,
    pub at_unix: i64,
    pub command: DecidedCommand,
    pub declared_severity: Severity,
    pub handling: Handling,
    pub rule: Option<String>,
    pub rationale: String,
    pub policy_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub action_id: String,
    pub agent: String,
    pub command_type: CommandType,
    pub service: String,
    pub declared_severity: Severity,
    pub old: Handling,
    pub new: Handling,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_rule: Option<String>,
    pub new_rule: String,
    pub new_rationale: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transition {
    pub old: Handling,
    pub new: Handling,
    pub count: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    pub candidate_sha256: String,
    /// The policies that decided the recorded commands.
    pub recorded_under: Vec<String>,
    pub commands: usize,
    /// Command records without the command's fields (written before the audit carried them),
    /// and so not re-decided.
    pub skipped: usize,
    pub transitions: Vec<Transition>,
    /// Commands whose handling changed.
    pub changed: Vec<Change>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("line {line}: {why}")]
    Line { line: usize, why: String },
}

/// Reads audit lines (chain lines `{"seq":..,"record":{..}}` or bare records).
pub fn read(text: &str) -> Result<(Vec<Recorded>, usize), ReplayError> {
    let mut out: Vec<Recorded> = Vec::new();
    let mut skipped = 0;
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| ReplayError::Line {
                line: i + 1,
                why: e.to_string(),
            })?;
        let value = value.get("record").cloned().unwrap_or(value);
        let record: AuditRecord = serde_json::from_value(value).map_err(|e| ReplayError::Line {
            line: i + 1,
            why: format!("not an audit record: {e}"),
        })?;
        if record.kind != "command" {
            continue;
        }
        let Some(action_id) = record.action_id.clone() else {
            continue;
        };
        for event in &record.events {
            let AuditEvent::PolicyDecision {
                at,
                handling,
                declared_severity,
                rationale,
                policy_sha256,
                command,
                rule,
                ..
            } = event
            else {
                continue;
            };
            let Some(command) = command else {
                skipped += 1;
                continue;
            };
            let at_unix =
                time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                    .map(|t| t.unix_timestamp())
                    .map_err(|e| ReplayError::Line {
                        line: i + 1,
                        why: format!("policy_decision.at {at:?}: {e}"),
                    })?;
            let r = Recorded {
                action_id: action_id.clone(),
                at_unix,
                command: command.clone(),
                declared_severity: *declared_severity,
                handling: *handling,
                rule: rule.clone(),
                rationale: rationale.clone(),
                policy_sha256: policy_sha256.clone(),
            };
            // Decided again after a deferral: the last decision stands.
            match seen.entry((command.agent.clone(), action_id.to_string())) {
                std::collections::hash_map::Entry::Occupied(e) => out[*e.get()] = r,
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(out.len());
                    out.push(r);
                }
            }
        }
    }
    out.sort_by_key(|r| r.at_unix);
    Ok((out, skipped))
}

/// Re-decides every recorded command under `candidate`.
pub fn replay(candidate: &Policy, recorded: &[Recorded], skipped: usize) -> ReplayReport {
    let mut transitions: BTreeMap<(Handling, Handling), usize> = BTreeMap::new();
    let mut changed = Vec::new();
    let mut under: Vec<String> = Vec::new();
    // Times of the decided commands so far, per agent and type.
    let mut history: HashMap<(String, CommandType), Vec<i64>> = HashMap::new();
    for r in recorded {
        if !under.contains(&r.policy_sha256) {
            under.push(r.policy_sha256.clone());
        }
        let key = (r.command.agent.clone(), r.command.command_type);
        let earlier = history.get(&key).cloned().unwrap_or_default();
        let at = r.at_unix;
        let earlier_attempts = move |w: std::time::Duration| {
            earlier
                .iter()
                .filter(|t| **t >= at - w.as_secs() as i64)
                .count()
        };
        let facts = Facts {
            agent: Some(&r.command.agent),
            verified: r.command.agent_verified,
            earlier_attempts: &earlier_attempts,
        };
        let cmd = Command {
            justification: None,
            action_id: r.action_id.clone(),
            command_type: r.command.command_type,
            service: r.command.service.clone(),
            severity: r.declared_severity,
            claimed_agent: None,
        };
        let d = candidate.decide(&cmd, &facts);
        *transitions.entry((r.handling, d.handling)).or_default() += 1;
        if d.handling != r.handling {
            changed.push(Change {
                action_id: r.action_id.to_string(),
                agent: r.command.agent.clone(),
                command_type: r.command.command_type,
                service: r.command.service.to_string(),
                declared_severity: r.declared_severity,
                old: r.handling,
                new: d.handling,
                old_rule: r.rule.clone(),
                new_rule: d.rule,
                new_rationale: d.rationale,
            });
        }
        history.entry(key).or_default().push(r.at_unix);
    }
    ReplayReport {
        candidate_sha256: candidate.digest().to_owned(),
        recorded_under: under,
        commands: recorded.len(),
        skipped,
        transitions: transitions
            .into_iter()
            .map(|((old, new), count)| Transition { old, new, count })
            .collect(),
        changed,
    }
}

impl ReplayReport {
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "replayed {} recorded commands under sha256:{} ({} skipped: recorded without the command's fields)",
            self.commands, self.candidate_sha256, self.skipped
        );
        let _ = writeln!(out, "old -> new             count");
        for t in &self.transitions {
            let mark = if t.old == t.new { "" } else { "  changed" };
            let _ = writeln!(
                out,
                "{:<8} -> {:<8} {:>8}{mark}",
                t.old.as_str(),
                t.new.as_str(),
                t.count
            );
        }
        if self.changed.is_empty() {
            let _ = writeln!(out, "no command's handling changes");
        }
        for c in &self.changed {
            let _ = writeln!(
                out,
                "{} {} {} {} {}: {} -> {} ({}): {}",
                c.action_id,
                c.agent,
                c.command_type,
                c.service,
                c.declared_severity,
                c.old.as_str(),
                c.new.as_str(),
                c.new_rule,
                c.new_rationale
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::{AgentId, Service};

    fn record(
        action_id: &str,
        agent: &str,
        t: CommandType,
        service: &str,
        sev: Severity,
        handling: Handling,
        at: &str,
    ) -> String {
        let r = AuditRecord {
            kind: "command".into(),
            action_id: Some(ActionId::parse(action_id).unwrap()),
            agent: Some(AgentId::parse(agent).unwrap()),
            instance: "i".into(),
            at: at.into(),
            events: vec![AuditEvent::PolicyDecision {
                at: at.into(),
                handling,
                declared_severity: sev,
                effective_severity: sev,
                severity_mismatch: false,
                rationale: "r".into(),
                policy_sha256: "old".into(),
                command: Some(DecidedCommand {
                    command_type: t,
                    service: Service::parse(service).unwrap(),
                    agent: agent.into(),
                    agent_verified: true,
                }),
                rule: Some(t.to_string()),
                shadows: vec![],
            }],
        };
        // As the chain file holds it.
        format!(
            r#"{{"seq":1,"prev":"x","hash":"y","record":{}}}"#,
            serde_json::to_string(&r).unwrap()
        )
    }

    #[test]
    fn a_candidate_that_blocks_refresh_token_shows_the_exact_diff() {
        use CommandType::*;
        let lines = [
            record("a1", "agent-a", RefreshToken, "google", Severity::Medium, Handling::Judge, "2026-11-28T10:00:00Z"),
            record("a2", "agent-a", CheckIntegrationStatus, "google", Severity::Low, Handling::Execute, "2026-11-28T10:00:01Z"),
            record("a3", "agent-b", RefreshToken, "meta", Severity::High, Handling::Judge, "2026-11-28T10:00:02Z"),
            record("a4", "agent-b", ConnectIntegration, "meta", Severity::High, Handling::Block, "2026-11-28T10:00:03Z"),
            // Decided again after a deferral: counted once.
            record("a1", "agent-a", RefreshToken, "google", Severity::Medium, Handling::Judge, "2026-11-28T10:00:04Z"),
            // A control record and an old record without the command's fields.
            r#"{"kind":"control","action_id":null,"agent":null,"instance":"i","at":"t","events":[]}"#.into(),
            r#"{"kind":"command","action_id":"old-1","agent":"agent-a","instance":"i","at":"t","events":[{"type":"policy_decision","at":"2026-11-28T09:00:00Z","handling":"JUDGE","declared_severity":"MEDIUM","effective_severity":"MEDIUM","severity_mismatch":false,"rationale":"r","policy_sha256":"older"}]}"#.into(),
        ];
        let (recorded, skipped) = read(&lines.join("\n")).unwrap();
        assert_eq!((recorded.len(), skipped), (4, 1));
        let candidate = Policy::parse(&include_str!("../../config/policy.toml").replace(
            "[commands.REFRESH_TOKEN]\naction = \"JUDGE\"",
            "[commands.REFRESH_TOKEN]\naction = \"BLOCK\"",
        ))
        .unwrap();
        let report = replay(&candidate, &recorded, skipped);
        let t: Vec<(Handling, Handling, usize)> = report
            .transitions
            .iter()
            .map(|t| (t.old, t.new, t.count))
            .collect();
        assert_eq!(
            t,
            [
                (Handling::Execute, Handling::Execute, 1),
                (Handling::Judge, Handling::Block, 2),
                (Handling::Block, Handling::Block, 1),
            ]
        );
        let changed: Vec<&str> = report
            .changed
            .iter()
            .map(|c| c.action_id.as_str())
            .collect();
        assert_eq!(
            changed,
            ["a3", "a1"],
            "in time order; a1 at its last decision"
        );
        assert_eq!(report.recorded_under, ["old"]);
        let text = report.text();
        assert!(
            text.contains("JUDGE    -> BLOCK           2  changed"),
            "{text}"
        );

        // The same policy: nothing changes.
        let same = Policy::parse(include_str!("../../config/policy.toml")).unwrap();
        assert!(replay(&same, &recorded, skipped).changed.is_empty());
        assert!(read("not json").is_err());
    }

    #[test]
    fn history_conditions_count_the_files_own_earlier_commands() {
        use CommandType::CheckIntegrationStatus as C;
        let lines: Vec<String> = (0..5)
            .map(|i| {
                record(
                    &format!("c{i}"),
                    "agent-a",
                    C,
                    "google",
                    Severity::Low,
                    Handling::Execute,
                    &format!("2026-11-28T10:0{i}:00Z"),
                )
            })
            .collect();
        let (recorded, _) = read(&lines.join("\n")).unwrap();
        let candidate = Policy::parse(&format!(
            "{}\n[[commands.CHECK_INTEGRATION_STATUS.escalations]]\nattempts_over = 3\nwithin_secs = 600\naction = \"JUDGE\"\nrationale = \"burst\"\n",
            include_str!("../../config/policy.toml")
        ))
        .unwrap();
        let report = replay(&candidate, &recorded, 0);
        let changed: Vec<&str> = report
            .changed
            .iter()
            .map(|c| c.action_id.as_str())
            .collect();
        assert_eq!(changed, ["c3", "c4"], "the 4th and 5th within 600 s");
        assert_eq!(
            report.changed[0].new_rule,
            "CHECK_INTEGRATION_STATUS.escalations[0]"
        );
    }
}
