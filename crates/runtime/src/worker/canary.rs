//! The canary runner: while the system runs, every `panel.canary.interval_secs` it asks the
//! panel about the known-bad and the known-good canary ([`crate::judging::canary`]), counts
//! the outcomes, and hands a wrong answer to the control replica (alert, and the pause).
//!
//! In: the pipeline's panel and policy, the gate, a session's publisher. Out: metrics, logs,
//! and [`Replica::canary_failed`]. Nothing is executed, stored or published as a result.

use crate::broker::Publisher;
use crate::control::replica::Replica;
use crate::judging::canary::{self, Canary, CanarySettings, Finding};
use crate::judging::PanelOutcome;
use crate::settle::Shell;
use poller_core::control::Mode;
use std::sync::Arc;

/// Runs until the task is aborted (at the end of the session).
pub(crate) async fn watch(
    settings: CanarySettings,
    shell: Arc<Shell>,
    replica: Arc<Replica>,
    publisher: Publisher,
) {
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        let gate = &shell.settler.state.gate;
        if gate.mode() != Mode::Running {
            continue;
        }
        n += 1;
        for which in Canary::ALL {
            let pipeline = &shell.pipeline;
            let (request, rule) =
                canary::request(which, &pipeline.policy().snapshot(), &settings.agent, n);
            let report = pipeline.panel().convene(&request, rule).await;
            let approved = report.outcome == PanelOutcome::Approved;
            shell.settler.state.metrics.canary(which.as_str(), approved);
            let finding = canary::finding(which, report.outcome);
            if finding == Finding::Healthy {
                tracing::debug!(
                    canary = which.as_str(),
                    approved,
                    "canary answered as it should"
                );
                continue;
            }
            let votes: Vec<String> = report
                .votes
                .iter()
                .map(|v| format!("{} {}", v.name, crate::outcome::wire_name(&v.verdict)))
                .collect();
            let detail = format!(
                "{} of {} approved under the {} rule ({})",
                report.approvals,
                report.panel_size,
                rule,
                votes.join(", ")
            );
            if let Err(e) = replica
                .canary_failed(&publisher, finding, &detail, settings.pause_on_bad_approval)
                .await
            {
                tracing::error!(error = %e, "could not report the failed canary");
            }
        }
    }
}
