//! The panel: runs the judges concurrently, each under its own deadline, and stops waiting as
//! soon as [`tally`] says the outcome is settled. Dropping the remaining futures cancels them.

use super::{Judge, JudgeError, JudgeRequest, Verdict};
use crate::outcome::{JudgeVote, PanelSummary, Vote};
use futures::stream::{FuturesUnordered, StreamExt};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanelOutcome {
    Approved,
    NotApproved,
}

pub use crate::outcome::DecisionRule;

#[derive(Debug, Clone)]
pub struct PanelReport {
    pub outcome: PanelOutcome,
    pub rule: DecisionRule,
    pub quorum: usize,
    pub approvals: usize,
    pub panel_size: usize,
    /// One per configured judge, in configuration order.
    pub votes: Vec<JudgeVote>,
    /// The veto that decided, if one did: (judge, rule, reason).
    pub veto: Option<(String, String, String)>,
    /// Every judge that can veto answered, and none vetoed: the hard rules were checked and
    /// held (a panel that settled early may not have waited for them).
    pub hard_rules_held: bool,
}

impl PanelReport {
    /// What the result and the audit say about how the panel decided.
    pub fn summary(&self) -> PanelSummary {
        let count = |v: Vote| self.votes.iter().filter(|j| j.verdict == v).count();
        PanelSummary {
            rule: self.rule,
            quorum: self.quorum,
            size: self.panel_size,
            approvals: count(Vote::Approve),
            denials: count(Vote::Deny) + count(Vote::Veto),
            unavailable: count(Vote::Unavailable),
            approved: self.outcome == PanelOutcome::Approved,
        }
    }
}

/// Counts votes under `rule` (see [`DecisionRule`]). Approval also needs an answer from every
/// judge that can veto (`vetoers_pending` of them have not answered yet); a vetoing judge that
/// was unavailable fails closed, as its hard rules went unchecked (`vetoer_unavailable`).
/// Returns `None` while the outcome could still go either way. Once settled, no later vote
/// changes it, so the panel stops waiting.
pub fn tally(
    rule: DecisionRule,
    panel_size: usize,
    quorum: usize,
    votes: &[Vote],
    vetoers_pending: usize,
    vetoer_unavailable: bool,
) -> Option<PanelOutcome> {
    if panel_size == 0 || vetoer_unavailable || votes.contains(&Vote::Veto) {
        return Some(PanelOutcome::NotApproved);
    }
    let approvals = votes.iter().filter(|v| **v == Vote::Approve).count();
    let denials = votes.iter().filter(|v| **v == Vote::Deny).count();
    let answered = approvals + denials;
    let pending = panel_size.saturating_sub(votes.len());
    let needed = rule.approvals_needed(panel_size, quorum);
    let approved_now = match rule {
        DecisionRule::Majority => approvals >= needed && answered >= quorum,
        DecisionRule::Unanimous => approvals == panel_size,
        DecisionRule::Veto => pending == 0 && denials == 0 && approvals >= needed,
    };
    if approved_now {
        return (vetoers_pending == 0).then_some(PanelOutcome::Approved);
    }
    let still_possible = match rule {
        DecisionRule::Majority => approvals + pending >= needed && answered + pending >= quorum,
        DecisionRule::Unanimous => approvals + pending == panel_size,
        DecisionRule::Veto => denials == 0 && approvals + pending >= needed,
    };
    if !still_possible || pending == 0 {
        return Some(PanelOutcome::NotApproved);
    }
    None
}

/// A configured panel of judges.
pub struct Panel {
    judges: Vec<(Arc<dyn Judge>, Duration)>,
    quorum: usize,
}

impl Panel {
    /// `judges` with their deadlines. `quorum` is clamped to the panel size; an empty panel
    /// approves nothing.
    pub fn new(judges: Vec<(Arc<dyn Judge>, Duration)>, quorum: usize) -> Self {
        let quorum = quorum.min(judges.len());
        Self { judges, quorum }
    }

    pub fn size(&self) -> usize {
        self.judges.len()
    }

    pub fn quorum(&self) -> usize {
        self.quorum
    }

    /// The judges, each with its deadline, in configuration order.
    pub fn judges(&self) -> &[(Arc<dyn Judge>, Duration)] {
        &self.judges
    }

    /// Asks only the judges that can veto (the hard rules), each under its deadline, all of
    /// them: `Err` names the first that vetoed or could not answer (fail closed). What a grant
    /// asks before it stands in for a human, when the panel settled without them.
    pub async fn hard_rules(&self, request: &JudgeRequest) -> Result<(), String> {
        for (judge, deadline) in self.judges.iter().filter(|(j, _)| j.can_veto()) {
            match tokio::time::timeout(*deadline, judge.evaluate(request)).await {
                Ok(Ok(Verdict::Veto { rule, reason })) => {
                    return Err(format!("{} vetoed ({rule}): {reason}", judge.name()))
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("{} could not answer: {e}", judge.name())),
                Err(_) => return Err(format!("{} did not answer in time", judge.name())),
            }
        }
        Ok(())
    }

    /// Asks the judges about `request` and settles under `rule` as soon as it can.
    pub async fn convene(&self, request: &JudgeRequest, rule: DecisionRule) -> PanelReport {
        let n = self.judges.len();
        let mut votes: Vec<Option<JudgeVote>> = vec![None; n];
        let mut cast: Vec<Vote> = Vec::with_capacity(n);
        let started = Instant::now();
        let mut running: FuturesUnordered<_> = self
            .judges
            .iter()
            .enumerate()
            .map(|(i, (judge, deadline))| {
                let judge = judge.clone();
                let deadline = *deadline;
                async move {
                    let t0 = Instant::now();
                    let answer = match tokio::time::timeout(deadline, judge.evaluate(request)).await
                    {
                        Ok(r) => r,
                        Err(_) => Err(JudgeError::Timeout(deadline.as_millis() as u64)),
                    };
                    (i, answer, t0.elapsed())
                }
            })
            .collect();

        let mut vetoers_pending = self.judges.iter().filter(|(j, _)| j.can_veto()).count();
        let mut vetoer_unavailable = false;
        let mut veto = None;
        let mut outcome = tally(
            rule,
            n,
            self.quorum,
            &cast,
            vetoers_pending,
            vetoer_unavailable,
        );
        while outcome.is_none() {
            let Some((i, answer, took)) = running.next().await else {
                break;
            };
            let name = self.judges[i].0.name().to_owned();
            let can_veto = self.judges[i].0.can_veto();
            if can_veto {
                vetoers_pending -= 1;
                vetoer_unavailable |= answer.is_err();
            }
            let (vote, vetoed) = vote_of(name, can_veto, answer, took.as_millis() as u64);
            if let Some(v) = vetoed {
                veto.get_or_insert(v);
            }
            cast.push(vote.verdict);
            votes[i] = Some(vote);
            outcome = tally(
                rule,
                n,
                self.quorum,
                &cast,
                vetoers_pending,
                vetoer_unavailable,
            );
        }
        // Dropping `running` cancels the judges still deliberating.
        drop(running);
        let settled_ms = started.elapsed().as_millis() as u64;
        let votes: Vec<JudgeVote> = votes
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                v.unwrap_or_else(|| JudgeVote {
                    name: self.judges[i].0.name().to_owned(),
                    verdict: Vote::Skipped,
                    reason: "outcome already settled; not waited for".into(),
                    ms: settled_ms,
                    cause: None,
                    rule: None,
                })
            })
            .collect();
        PanelReport {
            outcome: outcome.unwrap_or(PanelOutcome::NotApproved),
            rule,
            quorum: self.quorum,
            approvals: cast.iter().filter(|v| **v == Vote::Approve).count(),
            panel_size: n,
            votes,
            hard_rules_held: vetoers_pending == 0 && !vetoer_unavailable && veto.is_none(),
            veto,
        }
    }
}

/// One judge's answer as its vote, and the veto it casts (judge, rule, reason), if any.
fn vote_of(
    name: String,
    can_veto: bool,
    answer: Result<Verdict, JudgeError>,
    ms: u64,
) -> (JudgeVote, Option<(String, String, String)>) {
    match answer {
        Ok(Verdict::Approve { reason }) => (
            JudgeVote {
                name,
                verdict: Vote::Approve,
                reason,
                ms,
                cause: None,
                rule: None,
            },
            None,
        ),
        Ok(Verdict::Deny { reason }) => (
            JudgeVote {
                name,
                verdict: Vote::Deny,
                reason,
                ms,
                cause: None,
                rule: None,
            },
            None,
        ),
        Ok(Verdict::Veto { rule, reason }) => {
            tracing::info!(judge = %name, rule, "vetoed by a hard rule");
            let vetoed = (name.clone(), rule.to_owned(), reason.clone());
            (
                JudgeVote {
                    name,
                    verdict: Vote::Veto,
                    reason,
                    ms,
                    cause: None,
                    rule: Some(rule.to_owned()),
                },
                Some(vetoed),
            )
        }
        Err(e) => {
            tracing::warn!(judge = %name, cause = %e, "judge unavailable; counted as not approving");
            let vote = JudgeVote {
                name,
                verdict: Vote::Unavailable,
                reason: if can_veto {
                    "no verdict: its hard rules went unchecked (not approved)".into()
                } else {
                    "no verdict (counted as not approving)".into()
                },
                ms,
                cause: Some(e.to_string()),
                rule: None,
            };
            (vote, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Vote::*;

    #[test]
    fn strict_majority_of_the_configured_panel() {
        assert_eq!(
            tally(DecisionRule::Majority, 3, 2, &[Approve, Approve], 0, false),
            Some(PanelOutcome::Approved)
        );
        assert_eq!(
            tally(DecisionRule::Majority, 3, 2, &[Approve], 0, false),
            None
        );
        assert_eq!(
            tally(DecisionRule::Majority, 3, 2, &[Deny, Unavailable], 0, false),
            Some(PanelOutcome::NotApproved)
        );
        assert_eq!(
            tally(DecisionRule::Majority, 3, 2, &[Approve, Deny], 0, false),
            None
        );
        assert_eq!(
            tally(
                DecisionRule::Majority,
                3,
                2,
                &[Approve, Deny, Unavailable],
                0,
                false
            ),
            Some(PanelOutcome::NotApproved)
        );
        assert_eq!(
            tally(DecisionRule::Majority, 4, 3, &[Approve, Approve], 0, false),
            None
        );
        assert_eq!(
            tally(
                DecisionRule::Majority,
                4,
                3,
                &[Approve, Approve, Approve],
                0,
                false
            ),
            Some(PanelOutcome::Approved)
        );
        assert_eq!(
            tally(
                DecisionRule::Majority,
                4,
                3,
                &[Approve, Approve, Deny],
                0,
                false
            ),
            None
        );
        assert_eq!(
            tally(
                DecisionRule::Majority,
                4,
                3,
                &[Approve, Approve, Deny, Approve],
                0,
                false
            ),
            Some(PanelOutcome::Approved)
        );
        assert_eq!(
            tally(DecisionRule::Majority, 0, 0, &[], 0, false),
            Some(PanelOutcome::NotApproved)
        );
    }

    #[test]
    fn quorum_blocks_thin_approvals() {
        // 3 of 3 must answer: one unavailable sinks it even with two approvals.
        assert_eq!(
            tally(DecisionRule::Majority, 3, 3, &[Approve, Approve], 0, false),
            None
        );
        assert_eq!(
            tally(
                DecisionRule::Majority,
                3,
                3,
                &[Approve, Unavailable],
                0,
                false
            ),
            Some(PanelOutcome::NotApproved)
        );
    }

    #[test]
    fn a_veto_is_not_a_vote() {
        // The attack: compliance's rate limit denies and is outvoted 2-1.
        assert_eq!(
            tally(
                DecisionRule::Majority,
                3,
                2,
                &[Approve, Approve, Veto],
                0,
                false
            ),
            Some(PanelOutcome::NotApproved)
        );
        assert_eq!(
            tally(DecisionRule::Majority, 3, 2, &[Veto], 2, false),
            Some(PanelOutcome::NotApproved),
            "settled at the first veto"
        );
        // Two approvals, but a judge that can veto hasn't answered: wait for it.
        assert_eq!(
            tally(DecisionRule::Majority, 3, 2, &[Approve, Approve], 1, false),
            None
        );
        assert_eq!(
            tally(
                DecisionRule::Majority,
                3,
                2,
                &[Approve, Approve, Approve],
                0,
                false
            ),
            Some(PanelOutcome::Approved)
        );
        // A vetoing judge that couldn't answer: its hard rules went unchecked.
        assert_eq!(
            tally(
                DecisionRule::Majority,
                3,
                2,
                &[Approve, Approve, Unavailable],
                0,
                true
            ),
            Some(PanelOutcome::NotApproved)
        );
    }

    #[test]
    fn unanimous_needs_every_judge() {
        let u = DecisionRule::Unanimous;
        assert_eq!(tally(u, 3, 2, &[Approve, Approve], 0, false), None);
        assert_eq!(
            tally(u, 3, 2, &[Approve, Approve, Approve], 0, false),
            Some(PanelOutcome::Approved)
        );
        assert_eq!(
            tally(u, 3, 2, &[Approve, Deny], 0, false),
            Some(PanelOutcome::NotApproved),
            "settled at the first deny"
        );
        assert_eq!(
            tally(u, 3, 2, &[Approve, Approve, Unavailable], 0, false),
            Some(PanelOutcome::NotApproved),
            "an unavailable judge sinks it"
        );
        // A split panel that majority approves, unanimous doesn't.
        let split = [Approve, Approve, Deny];
        assert_eq!(
            tally(DecisionRule::Majority, 3, 2, &split, 0, false),
            Some(PanelOutcome::Approved)
        );
        assert_eq!(
            tally(u, 3, 2, &split, 0, false),
            Some(PanelOutcome::NotApproved)
        );
    }

    #[test]
    fn veto_any_deny_denies_and_waits_for_every_judge() {
        let v = DecisionRule::Veto;
        // Two approvals are a majority, but the third judge may still deny: wait.
        assert_eq!(tally(v, 3, 2, &[Approve, Approve], 0, false), None);
        assert_eq!(
            tally(v, 3, 2, &[Approve, Approve, Deny], 0, false),
            Some(PanelOutcome::NotApproved)
        );
        assert_eq!(
            tally(v, 3, 2, &[Deny], 0, false),
            Some(PanelOutcome::NotApproved),
            "settled at the first deny"
        );
        // An unavailable judge is no deny: the quorum of answers decides.
        assert_eq!(
            tally(v, 3, 2, &[Approve, Unavailable, Approve], 0, false),
            Some(PanelOutcome::Approved)
        );
        assert_eq!(
            tally(v, 3, 3, &[Approve, Unavailable, Approve], 0, false),
            Some(PanelOutcome::NotApproved),
            "quorum 3: two answers are not enough"
        );
        assert_eq!(
            tally(v, 3, 2, &[Approve, Unavailable], 0, false),
            None,
            "one approval and one pending may still reach the quorum"
        );
        assert_eq!(
            tally(v, 3, 2, &[Unavailable, Unavailable], 0, false),
            Some(PanelOutcome::NotApproved)
        );
        // Quorum 0 still needs one approval.
        assert_eq!(
            tally(v, 2, 0, &[Unavailable, Unavailable], 0, false),
            Some(PanelOutcome::NotApproved)
        );
    }

    #[test]
    fn hard_rules_hold_under_every_rule() {
        for rule in DecisionRule::ALL {
            assert_eq!(
                tally(rule, 3, 2, &[Approve, Approve, Veto], 0, false),
                Some(PanelOutcome::NotApproved),
                "{rule}"
            );
            assert_eq!(
                tally(rule, 3, 2, &[Approve, Approve, Unavailable], 0, true),
                Some(PanelOutcome::NotApproved),
                "{rule}"
            );
            assert_eq!(
                tally(rule, 0, 0, &[], 0, false),
                Some(PanelOutcome::NotApproved)
            );
            assert_eq!(
                tally(rule, 3, 2, &[Approve, Approve, Approve], 1, false),
                None,
                "{rule}: a vetoing judge has not answered"
            );
        }
    }

    #[test]
    fn unavailable_never_approves() {
        for rule in DecisionRule::ALL {
            for n in 1..6 {
                for q in 0..=n {
                    let all = vec![Unavailable; n];
                    assert_eq!(
                        tally(rule, n, q, &all, 0, false),
                        Some(PanelOutcome::NotApproved),
                        "{rule} n={n} q={q}"
                    );
                }
            }
        }
    }

    /// A judge that applies hard rules, answering after `delay`.
    struct Rules {
        veto: bool,
        delay: Duration,
    }

    impl Judge for Rules {
        fn name(&self) -> &str {
            "rules"
        }
        fn can_veto(&self) -> bool {
            true
        }
        fn evaluate<'a>(
            &'a self,
            _: &'a JudgeRequest,
        ) -> futures::future::BoxFuture<'a, Result<Verdict, JudgeError>> {
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                Ok(if self.veto {
                    Verdict::Veto {
                        rule: "denied_agents",
                        reason: "on the deny list".into(),
                    }
                } else {
                    Verdict::Approve {
                        reason: "all rules passed".into(),
                    }
                })
            })
        }
    }

    /// The hard rules answering after `delay_ms`, a model that denies after `model_ms`.
    fn with_rules(veto: bool, delay_ms: u64, model_ms: u64) -> Panel {
        let deny = crate::test_util::ScriptedJudge::new(
            "model",
            crate::test_util::Script::Deny,
            Duration::from_millis(model_ms),
        );
        Panel::new(
            vec![
                (
                    Arc::new(Rules {
                        veto,
                        delay: Duration::from_millis(delay_ms),
                    }) as Arc<dyn Judge>,
                    Duration::from_secs(2),
                ),
                (Arc::new(deny), Duration::from_secs(2)),
            ],
            2,
        )
    }

    /// What a grant relies on: a panel that settled before its hard rules answered says so,
    /// and asking them afterwards gives their veto.
    #[tokio::test]
    async fn a_panel_settled_early_says_its_hard_rules_went_unheard_and_they_can_be_asked() {
        let policy =
            crate::policy::Policy::parse(include_str!("../../../../config/policy.toml")).unwrap();
        let (req, rule) = crate::judging::canary::request(
            crate::judging::canary::Canary::KnownGood,
            &policy,
            "a",
            1,
        );
        let early = with_rules(true, 300, 0).convene(&req, rule).await;
        assert_eq!(early.outcome, PanelOutcome::NotApproved);
        assert!(early.veto.is_none() && !early.hard_rules_held, "{early:?}");
        let why = with_rules(true, 300, 0).hard_rules(&req).await.unwrap_err();
        assert!(why.contains("rules vetoed (denied_agents)"), "{why}");
        assert_eq!(with_rules(false, 300, 0).hard_rules(&req).await, Ok(()));
        // Heard: a veto is the report's, and rules that held say so.
        let heard = with_rules(true, 0, 100)
            .convene(&req, DecisionRule::Veto)
            .await;
        assert!(heard.veto.is_some() && !heard.hard_rules_held);
        let held = with_rules(false, 0, 100)
            .convene(&req, DecisionRule::Veto)
            .await;
        assert!(held.veto.is_none() && held.hard_rules_held, "{held:?}");
    }
}
