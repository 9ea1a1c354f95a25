//! Prometheus metrics, served on the health port at `/metrics`.
//!
//! In: each command's disposition, and the live state at scrape time. Out: the text exposition
//! format. Names follow Prometheus conventions (`command_poller_` prefix, `_total` counters,
//! `_seconds` histograms).

use crate::outcome::{Alert, ResultMessage, Vote};
use crate::pipeline::Disposition;
use poller_core::control::Mode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

mod classic;
pub use classic::{classic_text, CLASSIC_CONTENT_TYPE};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command_type: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    judge: String,
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JudgeLabels {
    judge: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabels {
    team: String,
    priority: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CanaryLabels {
    canary: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShadowLabels {
    rule: String,
    enforced: String,
    would_have: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TripLabels {
    scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms to ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

pub struct Metrics {
    registry: Registry,
    commands: Family<CommandLabels, Counter>,
    dead_letters: Counter,
    deferred: Counter,
    lookups: Counter,
    judge_verdicts: Family<VerdictLabels, Counter>,
    judge_latency: HistogramFamily<JudgeLabels>,
    bridge_latency: Histogram,
    bridge_retries: Counter,
    bridge_errors: Counter,
    bridge_reposts: Counter,
    bridge_looked_up: Counter,
    canaries: Family<CanaryLabels, Counter>,
    policy_shadow: Family<ShadowLabels, Counter>,
    alerts: Family<AlertLabels, Counter>,
    publish_failures: Counter,
    audit_diverted: Counter,
    in_flight: Gauge,
    control_mode: Family<ModeLabels, Gauge>,
    trips: Family<TripLabels, Counter>,
    approvals_pending: Gauge,
    approval_sweeps: Counter,
    approval_decisions: Family<DecisionLabels, Counter>,
    approval_time_to_decision: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("command_poller");
        let m = Self {
            commands: Family::default(),
            dead_letters: Counter::default(),
            deferred: Counter::default(),
            lookups: Counter::default(),
            judge_verdicts: Family::default(),
            judge_latency: Family::new_with_constructor(latency_histogram),
            bridge_latency: latency_histogram(),
            bridge_retries: Counter::default(),
            bridge_errors: Counter::default(),
            bridge_reposts: Counter::default(),
            bridge_looked_up: Counter::default(),
            canaries: Family::default(),
            policy_shadow: Family::default(),
            alerts: Family::default(),
            publish_failures: Counter::default(),
            audit_diverted: Counter::default(),
            in_flight: Gauge::default(),
            control_mode: Family::default(),
            trips: Family::default(),
            approvals_pending: Gauge::default(),
            approval_sweeps: Counter::default(),
            approval_decisions: Family::default(),
            // 1 s to ~36 h.
            approval_time_to_decision: Histogram::new(exponential_buckets(1.0, 2.0, 18)),
            registry: Registry::default(),
        };
        m.register_commands(&mut registry);
        m.register_shell(&mut registry);
        Self { registry, ..m }
    }

    /// The command path's metrics: commands, dead letters, deferrals, lookups, judges and the
    /// bridge.
    fn register_commands(&self, registry: &mut Registry) {
        registry.register(
            "commands",
            "Commands concluded, by type and final status",
            self.commands.clone(),
        );
        registry.register(
            "policy_shadow",
            "Commands a shadow rule matched, by rule, the enforced handling and the handling it would have decided",
            self.policy_shadow.clone(),
        );
        registry.register(
            "dead_letters",
            "Undecodable commands copied to the dead-letter queue",
            self.dead_letters.clone(),
        );
        registry.register(
            "deferred",
            "Commands sent back to the queue because the system was paused or halted",
            self.deferred.clone(),
        );
        registry.register(
            "lookups",
            "Lookups of a stored result (get_action) answered from the store",
            self.lookups.clone(),
        );
        registry.register(
            "judge_verdicts",
            "Judge verdicts, by judge and verdict",
            self.judge_verdicts.clone(),
        );
        registry.register(
            "judge_latency_seconds",
            "Time each judge took to answer",
            self.judge_latency.clone(),
        );
        registry.register(
            "bridge_latency_seconds",
            "Time of bridge calls, retries included",
            self.bridge_latency.clone(),
        );
        registry.register(
            "bridge_retries",
            "Bridge POSTs beyond the first",
            self.bridge_retries.clone(),
        );
    }

    /// The shell's and the levers' metrics: reposts, canaries, alerts, the audit, publishing,
    /// in flight, the control mode and approvals.
    fn register_shell(&self, registry: &mut Registry) {
        registry.register(
            "bridge_errors",
            "Bridge calls that ended in failure",
            self.bridge_errors.clone(),
        );
        registry.register(
            "bridge_reposts",
            "Bridge calls for an action an earlier attempt had already sent (a replica crashed or lost its claim): safe only while the bridge remembers the first answer",
            self.bridge_reposts.clone(),
        );
        registry.register(
            "bridge_looked_up",
            "Results reported from the bridge's memory of an earlier attempt's call (its replica died before storing the result), asked for with a lookup that never acts",
            self.bridge_looked_up.clone(),
        );
        registry.register(
            "canaries",
            "Canary panel checks, by canary (known_bad, known_good) and outcome (approved, not_approved)",
            self.canaries.clone(),
        );
        registry.register(
            "alerts",
            "Alerts published, by team and priority",
            self.alerts.clone(),
        );
        registry.register(
            "trips",
            "Automatic trips this replica fired, by scope (fleet: paused everything; agent: quarantined the agent)",
            self.trips.clone(),
        );
        registry.register(
            "audit_diverted",
            "Audit records the audit exchange refused twice: dead-lettered (or, failing that, logged) instead",
            self.audit_diverted.clone(),
        );
        registry.register(
            "publish_failures",
            "Dispositions that could not be published (the command was not acked)",
            self.publish_failures.clone(),
        );
        registry.register(
            "in_flight_commands",
            "Commands being processed",
            self.in_flight.clone(),
        );
        registry.register(
            "control_mode",
            "1 for the current control mode (RUNNING, PAUSED, HALTED)",
            self.control_mode.clone(),
        );
        registry.register(
            "approvals_pending",
            "NEEDS_APPROVAL commands waiting for approvers (as of this replica's last sweep)",
            self.approvals_pending.clone(),
        );
        registry.register(
            "approval_sweeps",
            "Sweeps of the parked approvals this replica finished (expire, notify, finalize)",
            self.approval_sweeps.clone(),
        );
        registry.register(
            "approval_decisions",
            "Decisions on parked commands, by outcome (counted, approved, denied, refused, expired)",
            self.approval_decisions.clone(),
        );
        registry.register(
            "approval_time_to_decision_seconds",
            "From parking to the decision that ended the wait (approved, denied or expired)",
            self.approval_time_to_decision.clone(),
        );
    }

    /// A decision on a parked command (`outcome` as the reply and the audit spell it).
    pub fn approval_decision(&self, outcome: &str) {
        self.approval_decisions
            .get_or_create(&DecisionLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// A parked command's wait ended after `secs`.
    pub fn approval_decided(&self, secs: u64) {
        self.approval_time_to_decision.observe(secs as f64);
    }

    /// A sweep finished with `n` parked commands still waiting.
    pub fn approvals_swept(&self, n: usize) {
        self.approvals_pending.set(n as i64);
        self.approval_sweeps.inc();
    }

    /// Sweeps finished so far.
    pub fn approval_sweeps(&self) -> u64 {
        self.approval_sweeps.get()
    }

    /// Records a settled disposition: one `match`, so a new kind of disposition can't go
    /// uncounted. A replay counts as a command and its alerts, never again in the judge and
    /// bridge figures (its judges and bridge call happened, and were counted, the first time).
    pub fn observe(&self, d: &Disposition) {
        match d {
            Disposition::Defer { .. } => {
                self.deferred.inc();
            }
            Disposition::DeadLetter { result, .. } => {
                self.dead_letters.inc();
                if let Some(r) = result {
                    self.command(r);
                }
            }
            Disposition::Conclude { outcome, .. } => {
                self.command(&outcome.result);
                self.shadows(&outcome.audit);
                self.judges_and_bridge(&outcome.result);
                self.alerts(&outcome.alerts);
            }
            Disposition::Replay { outcome, .. } => {
                self.command(&outcome.result);
                self.alerts(&outcome.alerts);
            }
            Disposition::Answer { .. } => {
                self.lookups.inc();
            }
        }
    }

    fn command(&self, r: &ResultMessage) {
        self.commands
            .get_or_create(&CommandLabels {
                command_type: r
                    .command_type
                    .map_or_else(|| "UNKNOWN".into(), |t| t.to_string()),
                status: r.status.to_string(),
            })
            .inc();
    }

    /// What the shadow rules would have decided, from the command's policy decision.
    fn shadows(&self, trail: &[poller_core::audit::AuditEvent]) {
        for e in trail {
            if let poller_core::audit::AuditEvent::PolicyDecision {
                handling, shadows, ..
            } = e
            {
                for s in shadows {
                    self.policy_shadow
                        .get_or_create(&ShadowLabels {
                            rule: s.rule.clone(),
                            enforced: handling.as_str().into(),
                            would_have: s.would_have.as_str().into(),
                        })
                        .inc();
                }
            }
        }
    }

    fn judges_and_bridge(&self, r: &ResultMessage) {
        for j in &r.judges {
            self.judge_verdicts
                .get_or_create(&VerdictLabels {
                    judge: j.name.clone(),
                    // The one spelling of a vote: serde's, as in results and the audit.
                    verdict: crate::outcome::wire_name(&j.verdict),
                })
                .inc();
            if j.verdict != Vote::Skipped {
                self.judge_latency
                    .get_or_create(&JudgeLabels {
                        judge: j.name.clone(),
                    })
                    .observe(j.ms as f64 / 1000.0);
            }
        }
        if let Some(b) = &r.bridge {
            self.bridge_latency.observe(b.ms as f64 / 1000.0);
            self.bridge_retries
                .inc_by(u64::from(b.attempts.saturating_sub(1)));
            if b.error.is_some() {
                self.bridge_errors.inc();
            }
            if b.repost {
                self.bridge_reposts.inc();
            }
            if b.looked_up {
                self.bridge_looked_up.inc();
            }
        }
    }

    fn alerts(&self, alerts: &[Alert]) {
        for a in alerts {
            self.alerts
                .get_or_create(&AlertLabels {
                    team: a.team.clone(),
                    priority: a.priority.as_str().into(),
                })
                .inc();
        }
    }

    /// An audit record the audit exchange refused (dead-lettered or logged instead).
    /// A canary the panel was asked about.
    pub fn canary(&self, canary: &str, approved: bool) {
        self.canaries
            .get_or_create(&CanaryLabels {
                canary: canary.to_owned(),
                outcome: if approved { "approved" } else { "not_approved" }.to_owned(),
            })
            .inc();
    }

    pub fn audit_diverted(&self) {
        self.audit_diverted.inc();
    }

    /// Metrics with one series in every family (a family shows in the exposition only once it
    /// has one): what a dashboard or a rule may query, for the tests that check them.
    #[cfg(any(test, feature = "test-util"))]
    pub fn with_every_family() -> Self {
        let m = Self::new();
        let s = |v: &str| v.to_owned();
        drop(m.commands.get_or_create(&CommandLabels {
            command_type: s("REFRESH_TOKEN"),
            status: s("SUCCESS"),
        }));
        drop(m.judge_verdicts.get_or_create(&VerdictLabels {
            judge: s("rules"),
            verdict: s("approve"),
        }));
        drop(
            m.judge_latency
                .get_or_create(&JudgeLabels { judge: s("rules") }),
        );
        drop(m.policy_shadow.get_or_create(&ShadowLabels {
            rule: s("r"),
            enforced: s("JUDGE"),
            would_have: s("BLOCK"),
        }));
        drop(m.alerts.get_or_create(&AlertLabels {
            team: s("ops"),
            priority: s("normal"),
        }));
        m.canary("known_bad", false);
        m.approval_decision("expired");
        m.tripped("fleet");
        m
    }

    pub fn tripped(&self, scope: &str) {
        self.trips
            .get_or_create(&TripLabels {
                scope: scope.to_owned(),
            })
            .inc();
    }

    pub fn publish_failed(&self) {
        self.publish_failures.inc();
    }

    /// The exposition text, with the gauges set from the live state.
    pub fn render(&self, in_flight: usize, mode: Mode) -> String {
        self.in_flight.set(in_flight as i64);
        for m in [Mode::Running, Mode::Paused, Mode::Halted] {
            self.control_mode
                .get_or_create(&ModeLabels {
                    mode: m.as_str().into(),
                })
                .set(i64::from(m == mode));
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

/// The OpenMetrics content type of [`Metrics::render`]'s text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::ReplyTarget;
    use crate::pipeline::Concluded;

    fn concluded() -> Concluded {
        let result: ResultMessage = serde_json::from_value(serde_json::json!({
            "action_id": "a-1", "command_type": "REFRESH_TOKEN", "service": "google",
            "status": "SUCCESS", "rationale": "approved",
            "judges": [{"name": "rules", "verdict": "approve", "reason": "ok", "ms": 12}],
            "bridge": {"attempts": 2, "ms": 340},
            "received_at": "2026-01-01T00:00:00Z", "completed_at": "2026-01-01T00:00:01Z",
            "poller_instance": "poller-1"
        }))
        .unwrap();
        Concluded {
            result,
            reply: ReplyTarget::None,
            alerts: Vec::new(),
            audit: Vec::new(),
            unapproved: None,
            command_digest: None,
        }
    }

    fn sample(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    #[test]
    fn a_replay_counts_as_a_command_but_never_again_in_the_judge_and_bridge_figures() {
        let m = Metrics::new();
        m.observe(&Disposition::Conclude {
            outcome: concluded(),
            claim: None,
        });
        let mut replayed = concluded();
        replayed.result.replay = true;
        m.observe(&Disposition::Replay {
            outcome: replayed,
            claim: None,
        });
        let text = m.render(0, Mode::Running);
        assert_eq!(
            sample(
                &text,
                "command_poller_commands_total{command_type=\"REFRESH_TOKEN\",status=\"SUCCESS\"}"
            ),
            2.0,
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "command_poller_judge_latency_seconds_count{judge=\"rules\"}"
            ),
            1.0,
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "command_poller_judge_verdicts_total{judge=\"rules\",verdict=\"approve\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(&text, "command_poller_bridge_latency_seconds_count"),
            1.0
        );
        assert_eq!(sample(&text, "command_poller_bridge_retries_total"), 1.0);
        assert_eq!(sample(&text, "command_poller_bridge_reposts_total"), 0.0);
    }

    #[test]
    fn a_re_post_after_a_crash_is_counted_once_and_never_for_its_replay() {
        let m = Metrics::new();
        let mut resent = concluded();
        resent.result.bridge.as_mut().unwrap().repost = true;
        m.observe(&Disposition::Conclude {
            outcome: resent.clone(),
            claim: None,
        });
        resent.result.replay = true;
        m.observe(&Disposition::Replay {
            outcome: resent.clone(),
            claim: None,
        });
        // A result from the bridge's memory of a dead replica's call: counted, not a re-POST.
        let b = resent.result.bridge.as_mut().unwrap();
        (b.repost, b.looked_up, resent.result.replay) = (false, true, false);
        m.observe(&Disposition::Conclude {
            outcome: resent,
            claim: None,
        });
        let text = m.render(0, Mode::Running);
        assert_eq!(sample(&text, "command_poller_bridge_looked_up_total"), 1.0);
        assert_eq!(
            sample(&text, "command_poller_bridge_reposts_total"),
            1.0,
            "{text}"
        );
    }
}
