//! The panel: runs the judges concurrently, each under its own deadline, and stops waiting as
//! soon as [`tally`] says the outcome is settled. Dropping the remaining futures cancels them.

use super::{Judge, JudgeError, JudgeRequest, Verdict};
use crate::outcome::{JudgeVote, Vote};
use futures::stream::{FuturesUnordered, StreamExt};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanelOutcome {
    Approved,
    NotApproved,
}

#[derive(Debug, Clone)]
pub struct PanelReport {
    pub outcome: PanelOutcome,
    pub approvals: usize,
    pub panel_size: usize,
    /// One per configured judge, in configuration order.
    pub votes: Vec<JudgeVote>,
    /// The veto that decided, if one did: (judge, rule, reason).
    pub veto: Option<(String, String, String)>,
}

/// Counts votes. Approval needs a strict majority of the whole panel, at least `quorum`
/// judges that actually answered, no veto, and an answer from every judge that can veto
/// (`vetoers_pending` of them have not answered yet); a vetoing judge that was unavailable
/// fails closed, as its hard rules went unchecked (`vetoer_unavailable`). Returns `None` while
/// the outcome could still go either way.
pub fn tally(
    panel_size: usize,
    quorum: usize,
    votes: &[Vote],
    vetoers_pending: usize,
    vetoer_unavailable: bool,
) -> Option<PanelOutcome> {
    if vetoer_unavailable || votes.contains(&Vote::Veto) {
        return Some(PanelOutcome::NotApproved);
    }
    let approvals = votes.iter().filter(|v| **v == Vote::Approve).count();
    let answered = votes
        .iter()
        .filter(|v| matches!(v, Vote::Approve | Vote::Deny))
        .count();
    let pending = panel_size.saturating_sub(votes.len());
    let majority = panel_size / 2 + 1;
    if approvals >= majority && answered >= quorum {
        return (vetoers_pending == 0).then_some(PanelOutcome::Approved);
    }
    let approvals_possible = approvals + pending >= majority;
    let quorum_possible = answered + pending >= quorum;
    if !approvals_possible || !quorum_possible {
        return Some(PanelOutcome::NotApproved);
    }
    if pending == 0 {
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

    pub async fn convene(&self, request: &JudgeRequest) -> PanelReport {
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
        let mut outcome = tally(n, self.quorum, &cast, vetoers_pending, vetoer_unavailable);
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
            let ms = took.as_millis() as u64;
            let vote = match answer {
                Ok(Verdict::Approve { reason }) => JudgeVote {
                    name,
                    verdict: Vote::Approve,
                    reason,
                    ms,
                    cause: None,
                    rule: None,
                },
                Ok(Verdict::Deny { reason }) => JudgeVote {
                    name,
                    verdict: Vote::Deny,
                    reason,
                    ms,
                    cause: None,
                    rule: None,
                },
                Ok(Verdict::Veto { rule, reason }) => {
                    tracing::info!(judge = %name, rule, "vetoed by a hard rule");
                    veto.get_or_insert((name.clone(), rule.to_owned(), reason.clone()));
                    JudgeVote {
                        name,
                        verdict: Vote::Veto,
                        reason,
                        ms,
                        cause: None,
                        rule: Some(rule.to_owned()),
                    }
                }
                Err(e) => {
                    tracing::warn!(judge = %name, cause = %e, "judge unavailable; counted as not approving");
                    JudgeVote {
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
                    }
                }
            };
            cast.push(vote.verdict);
            votes[i] = Some(vote);
            outcome = tally(n, self.quorum, &cast, vetoers_pending, vetoer_unavailable);
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
            approvals: cast.iter().filter(|v| **v == Vote::Approve).count(),
            panel_size: n,
            votes,
            veto,
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
            tally(3, 2, &[Approve, Approve], 0, false),
            Some(PanelOutcome::Approved)
        );
        assert_eq!(tally(3, 2, &[Approve], 0, false), None);
        assert_eq!(
            tally(3, 2, &[Deny, Unavailable], 0, false),
            Some(PanelOutcome::NotApproved)
        );
        assert_eq!(tally(3, 2, &[Approve, Deny], 0, false), None);
        assert_eq!(
            tally(3, 2, &[Approve, Deny, Unavailable], 0, false),
            Some(PanelOutcome::NotApproved)
        );
        assert_eq!(tally(4, 3, &[Approve, Approve], 0, false), None);
        assert_eq!(
            tally(4, 3, &[Approve, Approve, Approve], 0, false),
            Some(PanelOutcome::Approved)
        );
        assert_eq!(tally(4, 3, &[Approve, Approve, Deny], 0, false), None);
        assert_eq!(
            tally(4, 3, &[Approve, Approve, Deny, Approve], 0, false),
            Some(PanelOutcome::Approved)
        );
        assert_eq!(tally(0, 0, &[], 0, false), Some(PanelOutcome::NotApproved));
    }

    #[test]
    fn quorum_blocks_thin_approvals() {
        // 3 of 3 must answer: one unavailable sinks it even with two approvals.
        assert_eq!(tally(3, 3, &[Approve, Approve], 0, false), None);
        assert_eq!(
            tally(3, 3, &[Approve, Unavailable], 0, false),
            Some(PanelOutcome::NotApproved)
        );
    }

    #[test]
    fn a_veto_is_not_a_vote() {
        // The attack: compliance's rate limit denies and is outvoted 2-1.
        assert_eq!(
            tally(3, 2, &[Approve, Approve, Veto], 0, false),
            Some(PanelOutcome::NotApproved)
        );
        assert_eq!(
            tally(3, 2, &[Veto], 2, false),
            Some(PanelOutcome::NotApproved),
            "settled at the first veto"
        );
        // Two approvals, but a judge that can veto hasn't answered: wait for it.
        assert_eq!(tally(3, 2, &[Approve, Approve], 1, false), None);
        assert_eq!(
            tally(3, 2, &[Approve, Approve, Approve], 0, false),
            Some(PanelOutcome::Approved)
        );
        // A vetoing judge that couldn't answer: its hard rules went unchecked.
        assert_eq!(
            tally(3, 2, &[Approve, Approve, Unavailable], 0, true),
            Some(PanelOutcome::NotApproved)
        );
    }

    #[test]
    fn unavailable_never_approves() {
        for n in 1..6 {
            let all = vec![Unavailable; n];
            assert_eq!(tally(n, 1, &all, 0, false), Some(PanelOutcome::NotApproved));
        }
    }
}
