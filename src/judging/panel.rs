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
}

/// Counts votes. Approval needs a strict majority of the whole panel, and at least `quorum`
/// judges that actually answered; returns `None` while the outcome could still go either way.
pub fn tally(panel_size: usize, quorum: usize, votes: &[Vote]) -> Option<PanelOutcome> {
    let approvals = votes.iter().filter(|v| **v == Vote::Approve).count();
    let answered = votes
        .iter()
        .filter(|v| matches!(v, Vote::Approve | Vote::Deny))
        .count();
    let pending = panel_size.saturating_sub(votes.len());
    let majority = panel_size / 2 + 1;
    if approvals >= majority && answered >= quorum {
        return Some(PanelOutcome::Approved);
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

        let mut outcome = tally(n, self.quorum, &cast);
        while outcome.is_none() {
            let Some((i, answer, took)) = running.next().await else {
                break;
            };
            let name = self.judges[i].0.name().to_owned();
            let ms = took.as_millis() as u64;
            let vote = match answer {
                Ok(Verdict::Approve { reason }) => JudgeVote {
                    name,
                    verdict: Vote::Approve,
                    reason,
                    ms,
                    cause: None,
                },
                Ok(Verdict::Deny { reason }) => JudgeVote {
                    name,
                    verdict: Vote::Deny,
                    reason,
                    ms,
                    cause: None,
                },
                Err(e) => {
                    tracing::warn!(judge = %name, cause = %e, "judge unavailable; counted as not approving");
                    JudgeVote {
                        name,
                        verdict: Vote::Unavailable,
                        reason: "no verdict (counted as not approving)".into(),
                        ms,
                        cause: Some(e.to_string()),
                    }
                }
            };
            cast.push(vote.verdict);
            votes[i] = Some(vote);
            outcome = tally(n, self.quorum, &cast);
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
                })
            })
            .collect();
        PanelReport {
            outcome: outcome.unwrap_or(PanelOutcome::NotApproved),
            approvals: cast.iter().filter(|v| **v == Vote::Approve).count(),
            panel_size: n,
            votes,
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
            tally(3, 2, &[Approve, Approve]),
            Some(PanelOutcome::Approved)
        );
        assert_eq!(tally(3, 2, &[Approve]), None);
        assert_eq!(
            tally(3, 2, &[Deny, Unavailable]),
            Some(PanelOutcome::NotApproved)
        );
        assert_eq!(tally(3, 2, &[Approve, Deny]), None);
        assert_eq!(
            tally(3, 2, &[Approve, Deny, Unavailable]),
            Some(PanelOutcome::NotApproved)
        );
        assert_eq!(tally(4, 3, &[Approve, Approve]), None);
        assert_eq!(
            tally(4, 3, &[Approve, Approve, Approve]),
            Some(PanelOutcome::Approved)
        );
        assert_eq!(tally(4, 3, &[Approve, Approve, Deny]), None);
        assert_eq!(
            tally(4, 3, &[Approve, Approve, Deny, Approve]),
            Some(PanelOutcome::Approved)
        );
        assert_eq!(tally(0, 0, &[]), Some(PanelOutcome::NotApproved));
    }

    #[test]
    fn quorum_blocks_thin_approvals() {
        // 3 of 3 must answer: one unavailable sinks it even with two approvals.
        assert_eq!(tally(3, 3, &[Approve, Approve]), None);
        assert_eq!(
            tally(3, 3, &[Approve, Unavailable]),
            Some(PanelOutcome::NotApproved)
        );
    }

    #[test]
    fn unavailable_never_approves() {
        for n in 1..6 {
            let all = vec![Unavailable; n];
            assert_eq!(tally(n, 1, &all), Some(PanelOutcome::NotApproved));
        }
    }
}
