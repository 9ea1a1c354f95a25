//! `judges eval`: how often the configured panel approves what it should deny.
//!
//! In: a labelled set of cases (JSON lines: a command as an agent sends it, the agent, its
//! recent attempts, the expected approve/deny and a one-line rationale), the policy and the
//! panel. Out: a [`Report`] with, per judge alone, for the panel under each decision rule and
//! for policy + panel, the false-approve, false-deny and unavailable counts and the latency;
//! rendered as a table or JSON, and compared with a baseline report to catch a regression.
//!
//! Every judge is asked about every case (no early stop), so every rule is scored on the same
//! answers; [`tally`] settles each rule, and the panel's latency under a rule is when its tally
//! would have settled. Nothing is executed or published.

mod report;

pub use report::*;

use super::history::Attempt;
use super::panel::{tally, DecisionRule, PanelOutcome};
use super::{JudgeError, JudgeRequest, Panel, Verdict};
use crate::intake::{decode, Agent, AgentId, DecodeLimits};
use crate::outcome::{Status, Vote};
use crate::policy::{Handling, Policy};
use crate::store::{Hit, LimitError, RateWindows};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The answer a case expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expect {
    Approve,
    Deny,
}

/// One of the agent's earlier attempts of the same type.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PastAttempt {
    pub status: Status,
    /// How long before the case's command.
    pub ago_secs: u64,
}

/// One labelled case.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub id: String,
    /// The command exactly as an agent publishes it.
    pub command: serde_json::Value,
    pub agent: String,
    /// Whether the broker checked the agent's identity (`user_id`).
    #[serde(default = "yes")]
    pub verified: bool,
    #[serde(default)]
    pub history: Vec<PastAttempt>,
    pub expect: Expect,
    /// Why the expected answer is right, in one line.
    pub why: String,
}

fn yes() -> bool {
    true
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("line {line}: {message}")]
    Case { line: usize, message: String },
    #[error("no cases")]
    Empty,
}

/// Parses a JSON-lines case file (blank lines and lines starting with `#` skipped). Every
/// command must pass intake validation: a case the poller would reject measures nothing.
pub fn load_cases(text: &str) -> Result<Vec<Case>, EvalError> {
    let mut cases: Vec<Case> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let bad = |message: String| EvalError::Case {
            line: line_no,
            message,
        };
        let case: Case = serde_json::from_str(l).map_err(|e| bad(e.to_string()))?;
        if case.why.trim().is_empty() {
            return Err(bad(format!("{}: why must not be empty", case.id)));
        }
        if cases.iter().any(|c| c.id == case.id) {
            return Err(bad(format!("{}: id appears twice", case.id)));
        }
        AgentId::parse(&case.agent).map_err(|e| bad(format!("{}: agent: {e}", case.id)))?;
        decode(
            case.command.to_string().as_bytes(),
            None,
            DecodeLimits::default(),
        )
        .map_err(|e| bad(format!("{}: command: {e}", case.id)))?;
        cases.push(case);
    }
    if cases.is_empty() {
        return Err(EvalError::Empty);
    }
    Ok(cases)
}

/// Rate windows seeded with the current case's history: a rate rule sees the case's earlier
/// attempts that fall inside its own window, and nothing of other cases.
#[derive(Default)]
pub struct CaseWindows {
    /// Ages of the earlier attempts, in milliseconds.
    seeded: Mutex<Vec<u64>>,
}

impl CaseWindows {
    pub fn seed(&self, history: &[PastAttempt]) {
        *self.seeded.lock().unwrap_or_else(|p| p.into_inner()) =
            history.iter().map(|a| a.ago_secs * 1000).collect();
    }
}

impl RateWindows for CaseWindows {
    fn hit<'a>(
        &'a self,
        _key: &'a str,
        member: &'a str,
        limit: usize,
        window: Duration,
    ) -> BoxFuture<'a, Result<Hit, LimitError>> {
        Box::pin(async move {
            let now = 1u64 << 40;
            let window = window.as_millis() as u64;
            let mut events: Vec<(String, u64)> = self
                .seeded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .enumerate()
                .map(|(i, ago)| (format!("earlier-{i}"), now - ago))
                .collect();
            Ok(crate::store::local::slide(
                &mut events,
                member,
                limit,
                now,
                now.saturating_sub(window),
            ))
        })
    }
}

/// One judge's answer to one case.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub vote: Vote,
    pub ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
}

/// What the policy and every judge said about one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseRun {
    pub id: String,
    pub expect: Expect,
    pub handling: Handling,
    /// The policy's decision rule for the case's command type.
    pub policy_rule: DecisionRule,
    /// One per judge, in panel order.
    pub answers: Vec<Answer>,
}

/// The panel's judges as the evaluation sees them.
#[derive(Debug, Clone)]
pub struct PanelShape {
    pub names: Vec<String>,
    pub can_veto: Vec<bool>,
    pub quorum: usize,
}

impl PanelShape {
    pub fn of(panel: &Panel) -> Self {
        Self {
            names: panel
                .judges()
                .iter()
                .map(|(j, _)| j.name().to_owned())
                .collect(),
            can_veto: panel.judges().iter().map(|(j, _)| j.can_veto()).collect(),
            quorum: panel.quorum(),
        }
    }
}

/// Asks every judge of `panel` about `case`, each under its deadline, all at once.
pub async fn run_case(
    panel: &Panel,
    policy: &Policy,
    windows: &CaseWindows,
    case: &Case,
) -> CaseRun {
    let cmd = decode(
        case.command.to_string().as_bytes(),
        None,
        DecodeLimits::default(),
    )
    .expect("load_cases validated the command");
    let earlier = |w: std::time::Duration| {
        case.history
            .iter()
            .filter(|a| a.ago_secs <= w.as_secs())
            .count()
    };
    let decision = policy.decide(
        &cmd,
        &crate::policy::Facts {
            agent: Some(&case.agent),
            verified: case.verified,
            earlier_attempts: &earlier,
        },
    );
    windows.seed(&case.history);
    let now = crate::store::now_millis() / 1000;
    let request = JudgeRequest {
        justification: None,
        action_id: cmd.action_id.to_string(),
        command_type: cmd.command_type,
        service: cmd.service.clone(),
        agent: Agent {
            id: AgentId::parse(&case.agent).expect("load_cases validated the agent"),
            verified: case.verified,
        },
        declared_severity: decision.declared_severity,
        effective_severity: decision.effective_severity,
        policy_rationale: decision.rationale.clone(),
        recent_attempts: case
            .history
            .iter()
            .enumerate()
            .map(|(i, a)| Attempt {
                action_id: format!("{}-earlier-{i}", case.id),
                status: a.status,
                at: now.saturating_sub(a.ago_secs),
            })
            .collect(),
        probe: false,
    };
    let asks = panel.judges().iter().map(|(judge, deadline)| {
        let request = &request;
        async move {
            let t0 = Instant::now();
            let got = match tokio::time::timeout(*deadline, judge.evaluate(request)).await {
                Ok(r) => r,
                Err(_) => Err(JudgeError::Timeout(deadline.as_millis() as u64)),
            };
            let ms = t0.elapsed().as_millis() as u64;
            match got {
                Ok(Verdict::Approve { .. }) => Answer {
                    vote: Vote::Approve,
                    ms,
                    cause: None,
                },
                Ok(Verdict::Deny { reason }) => Answer {
                    vote: Vote::Deny,
                    ms,
                    cause: Some(reason),
                },
                Ok(Verdict::Veto { rule, .. }) => Answer {
                    vote: Vote::Veto,
                    ms,
                    cause: Some(rule.to_owned()),
                },
                Err(e) => Answer {
                    vote: Vote::Unavailable,
                    ms,
                    cause: Some(e.to_string()),
                },
            }
        }
    });
    let answers = futures::future::join_all(asks).await;
    CaseRun {
        id: case.id.clone(),
        expect: case.expect,
        handling: decision.handling,
        policy_rule: decision.decision_rule,
        answers,
    }
}

/// How the panel would have settled `run` under `rule`, and when: the answers in the order
/// they arrived, stopping where the tally settles.
pub fn panel_outcome(shape: &PanelShape, run: &CaseRun, rule: DecisionRule) -> (bool, u64) {
    let n = run.answers.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| run.answers[i].ms);
    let mut votes = Vec::with_capacity(n);
    let mut vetoers_pending = shape.can_veto.iter().filter(|v| **v).count();
    let mut vetoer_unavailable = false;
    let mut settled = tally(rule, n, shape.quorum, &votes, vetoers_pending, false);
    let mut at = 0;
    for i in order {
        if settled.is_some() {
            break;
        }
        let a = &run.answers[i];
        if shape.can_veto[i] {
            vetoers_pending -= 1;
            vetoer_unavailable |= a.vote == Vote::Unavailable;
        }
        votes.push(a.vote);
        at = a.ms;
        settled = tally(
            rule,
            n,
            shape.quorum,
            &votes,
            vetoers_pending,
            vetoer_unavailable,
        );
    }
    (settled == Some(PanelOutcome::Approved), at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(expect: Expect, votes: &[(Vote, u64)]) -> CaseRun {
        CaseRun {
            id: "c".into(),
            expect,
            handling: Handling::Judge,
            policy_rule: DecisionRule::Majority,
            answers: votes
                .iter()
                .map(|(vote, ms)| Answer {
                    vote: *vote,
                    ms: *ms,
                    cause: None,
                })
                .collect(),
        }
    }

    fn shape() -> PanelShape {
        PanelShape {
            names: vec!["a".into(), "b".into(), "c".into()],
            can_veto: vec![false; 3],
            quorum: 2,
        }
    }

    #[test]
    fn the_panel_settles_when_its_tally_does() {
        use Vote::*;
        let r = run(Expect::Deny, &[(Approve, 10), (Approve, 20), (Deny, 300)]);
        assert_eq!(
            panel_outcome(&shape(), &r, DecisionRule::Majority),
            (true, 20)
        );
        assert_eq!(
            panel_outcome(&shape(), &r, DecisionRule::Veto),
            (false, 300)
        );
        assert_eq!(
            panel_outcome(&shape(), &r, DecisionRule::Unanimous),
            (false, 300)
        );
        let r = run(Expect::Deny, &[(Deny, 5), (Approve, 20), (Approve, 30)]);
        assert_eq!(panel_outcome(&shape(), &r, DecisionRule::Veto), (false, 5));
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&mut v, 50.0), 50);
        assert_eq!(percentile(&mut v, 99.0), 99);
        assert_eq!(percentile(&mut [7], 99.0), 7);
        assert_eq!(percentile(&mut [], 50.0), 0);
    }

    #[test]
    fn cases_are_checked_line_by_line() {
        let good = r#"{"id":"a","command":{"action_id":"x-1","command_type":"REFRESH_TOKEN","params":{"service":"google"},"severity":"MEDIUM"},"agent":"agent-7","expect":"approve","why":"routine"}"#;
        assert_eq!(load_cases(good).unwrap().len(), 1);
        let e = load_cases(&format!("# comment\n\n{good}\n{good}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 4") && e.contains("twice"), "{e}");
        let bad_cmd = good.replace("REFRESH_TOKEN", "DELETE_EVERYTHING");
        let e = load_cases(&bad_cmd).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("command_type"), "{e}");
        let no_why = good.replace("\"routine\"", "\" \"");
        assert!(load_cases(&no_why).is_err());
        let unknown = good.replace("\"why\"", "\"label\"");
        assert!(load_cases(&unknown).is_err());
        assert!(matches!(
            load_cases("\n# only a comment\n"),
            Err(EvalError::Empty)
        ));
    }
}
