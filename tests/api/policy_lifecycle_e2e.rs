//! The policy lifecycle and per-agent controls against the real broker, with two replicas:
//! a reload (and a refused one) reaching every replica, a reload during load, shadow rules on
//! live traffic, `policy replay` on the audit the run wrote, quarantine across replicas and a
//! restart, and the agent-scoped trip.

use crate::common::*;
use command_poller::control::operator::new_request_id;
use command_poller::control::{ControlCommand, Mode};
use command_poller::outcome::{Priority, Status};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const SHIPPED: &str = include_str!("../../config/policy.toml");

/// The shipped policy with CHECK_INTEGRATION_STATUS blocked (and said so).
fn blocking_checks() -> String {
    let p = SHIPPED.replace(
        "[commands.CHECK_INTEGRATION_STATUS]\naction = \"ALLOW\"\nfloor_severity = \"LOW\"\nrationale = \"Low-risk, read-only status check: bypasses judge evaluation.\"",
        "[commands.CHECK_INTEGRATION_STATUS]\naction = \"BLOCK\"\nfloor_severity = \"LOW\"\nrationale = \"Status checks are frozen for the drill.\"",
    );
    assert_ne!(p, SHIPPED, "the replacement must apply");
    p
}

fn digest_of(text: &str) -> String {
    command_poller::policy::Policy::parse(text)
        .unwrap()
        .digest()
        .to_owned()
}

/// A policy file of the test's own, which the harness's replicas load and reload.
struct PolicyFile(PathBuf);
impl PolicyFile {
    fn new(text: &str) -> Self {
        let p = std::env::temp_dir().join(format!("policy-{}.toml", suffix()));
        std::fs::write(&p, text).unwrap();
        Self(p)
    }
    fn write(&self, text: &str) {
        // Written whole and renamed into place, as an operator's deploy would.
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.0).unwrap();
    }
}
impl Drop for PolicyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn harness_with(policy: &PolicyFile) -> Harness {
    let file = policy.0.clone();
    Harness::start(Options {
        start_poller: false,
        tweak: Box::new(move |s| s.policy.file = file),
        ..Default::default()
    })
    .await
}

async fn ready(replicas: &[&ReplicaHandle]) {
    eventually("replicas connected", Duration::from_secs(15), || {
        replicas.iter().all(|r| r.connected())
    })
    .await;
}

fn check(id: &str) -> serde_json::Value {
    cmd(id, "CHECK_INTEGRATION_STATUS", "mailchimp", "LOW")
}

fn reload() -> ControlCommand {
    ControlCommand::ReloadPolicy {
        request_id: new_request_id(),
    }
}

fn records(file: &Path) -> Vec<serde_json::Value> {
    command_poller::audit::chain::select(file, |_| true)
        .unwrap_or_default()
        .into_iter()
        .map(|l| l["record"].clone())
        .collect()
}

/// The `policy_decision` event of `action_id`'s last audit record.
fn decision_of(file: &Path, action_id: &str) -> Option<serde_json::Value> {
    records(file)
        .into_iter()
        .filter(|r| r["action_id"] == action_id)
        .filter_map(|r| {
            r["events"]
                .as_array()?
                .iter()
                .find(|e| e["type"] == "policy_decision")
                .cloned()
        })
        .next_back()
}

async fn audited(file: &Path, what: &str, f: impl Fn(&[serde_json::Value]) -> bool) {
    eventually(what, Duration::from_secs(20), || f(&records(file))).await;
}

#[tokio::test]
async fn a_reload_reaches_every_replica_and_a_refused_file_keeps_the_old_policy() {
    let policy = PolicyFile::new(SHIPPED);
    let h = harness_with(&policy).await;
    let audit = std::env::temp_dir().join(format!("reload-audit-{}.jsonl", suffix()));
    let stop = CancellationToken::new();
    let sink = spawn_sink(&h.settings, &audit, stop.clone());
    let r1 = h.spawn_replica("r1", None);
    let r2 = h.spawn_replica("r2", None);
    ready(&[&r1, &r2]).await;

    h.send(&check("rl-1")).await;
    assert_eq!(h.result("rl-1").await.status, Status::Success);

    let blocked = blocking_checks();
    policy.write(&blocked);
    let report = h.operator().run(reload()).await.unwrap();
    assert_eq!(report.replicas.len(), 2, "{report:?}");
    for r in &report.replicas {
        assert!(r.accepted, "{r:?}");
        assert_eq!(r.policy_sha256, digest_of(&blocked), "{}", r.instance);
    }
    h.send(&check("rl-2")).await;
    let r = h.result("rl-2").await;
    assert_eq!(r.status, Status::Blocked);
    assert_eq!(r.rationale, "Status checks are frozen for the drill.");

    // An invalid file: refused on both, naming the key; the old policy stays; ops hear of it.
    policy.write(&blocked.replace("floor_severity = \"HIGH\"", "floor_severty = \"HIGH\""));
    let report = h.operator().run(reload()).await.unwrap();
    assert_eq!(report.replicas.len(), 2);
    for r in &report.replicas {
        assert!(!r.accepted, "{r:?}");
        let why = r.refusal.as_deref().unwrap();
        assert!(why.contains("floor_severty"), "{why}");
        assert_eq!(r.policy_sha256, digest_of(&blocked));
    }
    h.send(&check("rl-3")).await;
    assert_eq!(h.result("rl-3").await.status, Status::Blocked);
    let refused = h
        .wait_until("the refused-reload alerts", Duration::from_secs(10), |i| {
            let a: Vec<_> = i
                .alerts
                .iter()
                .filter(|(_, a)| a.summary.contains("Policy reload refused"))
                .cloned()
                .collect();
            (a.len() == 2).then_some(a)
        })
        .await;
    assert!(refused.iter().all(|(m, _)| m.routing_key == "ops.normal"));

    // Back to the shipped policy by the SIGHUP path (the binary's handler notifies this).
    policy.write(SHIPPED);
    r1.state.reload.notify_one();
    eventually(
        "r1 back on the shipped policy",
        Duration::from_secs(10),
        || *r1.state.policy_sha256.lock().unwrap() == digest_of(SHIPPED),
    )
    .await;
    let status = h.status().await;
    let mut digests: Vec<(String, String)> = status
        .replicas
        .iter()
        .map(|r| (r.instance.clone(), r.policy_sha256.clone()))
        .collect();
    digests.sort();
    assert_eq!(
        digests,
        [
            (r1.instance.clone(), digest_of(SHIPPED)),
            (r2.instance.clone(), digest_of(&blocked)),
        ],
        "a fleet with mixed policies shows in status"
    );

    // Every reload on every replica is an audit record: who, digest before and after.
    audited(&audit, "five reload records", |recs| {
        recs.iter()
            .flat_map(|r| r["events"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["type"] == "policy_reload")
            .count()
            == 5
    })
    .await;
    let reloads: Vec<serde_json::Value> = records(&audit)
        .iter()
        .flat_map(|r| r["events"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["type"] == "policy_reload")
        .collect();
    let by = |who: &str, refused: bool| {
        reloads
            .iter()
            .filter(|e| e["by"] == who && e.get("refused").is_some() == refused)
            .count()
    };
    assert_eq!(
        (by("guest", false), by("guest", true), by("SIGHUP", false)),
        (2, 2, 1)
    );
    let sighup = reloads.iter().find(|e| e["by"] == "SIGHUP").unwrap();
    assert_eq!(sighup["before"], digest_of(&blocked));
    assert_eq!(sighup["after"], digest_of(SHIPPED));
    // And each command's decision names the policy that decided it.
    assert_eq!(
        decision_of(&audit, "rl-2").unwrap()["policy_sha256"],
        digest_of(&blocked)
    );
    stop.cancel();
    let _ = sink.await;
    r1.stop().await;
    r2.stop().await;
    let _ = std::fs::remove_file(&audit);
}

#[tokio::test]
async fn no_command_is_decided_by_a_half_loaded_policy_during_reloads_under_load() {
    let policy = PolicyFile::new(SHIPPED);
    let h = harness_with(&policy).await;
    let audit = std::env::temp_dir().join(format!("reload-load-{}.jsonl", suffix()));
    let stop = CancellationToken::new();
    let sink = spawn_sink(&h.settings, &audit, stop.clone());
    let r1 = h.spawn_replica("l1", None);
    ready(&[&r1]).await;
    let blocked = blocking_checks();
    let (allow_digest, block_digest) = (digest_of(SHIPPED), digest_of(&blocked));
    const N: usize = 120;
    let sender = async {
        for i in 0..N {
            h.send(&check(&format!("ld-{i}"))).await;
        }
    };
    // Flip between the two policies for as long as commands are being decided.
    let flipper = async {
        let mut k = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while h.inbox.lock().unwrap().results.len() < N && std::time::Instant::now() < deadline {
            policy.write(if k % 2 == 0 { &blocked } else { SHIPPED });
            r1.state.reload.notify_one();
            k += 1;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    tokio::join!(sender, flipper);
    h.wait_until("every result", Duration::from_secs(60), |i| {
        (i.results.len() >= N).then_some(())
    })
    .await;
    audited(&audit, "every decision audited", |recs| {
        recs.iter()
            .filter(|r| r["kind"] == "command")
            .filter(|r| {
                r["events"]
                    .as_array()
                    .is_some_and(|e| e.iter().any(|e| e["type"] == "result_published"))
            })
            .count()
            >= N
    })
    .await;
    let (mut allowed, mut blocked_n) = (0, 0);
    for i in 0..N {
        let id = format!("ld-{i}");
        let r = h.result(&id).await;
        let d = decision_of(&audit, &id).unwrap();
        // The handling, the rationale and the digest all come from one policy.
        match r.status {
            Status::Success => {
                allowed += 1;
                assert_eq!(d["handling"], "EXECUTE", "{id}");
                assert_eq!(d["policy_sha256"], allow_digest.as_str(), "{id}");
                assert!(r.rationale.starts_with("Low-risk"), "{id}: {}", r.rationale);
            }
            Status::Blocked => {
                blocked_n += 1;
                assert_eq!(d["handling"], "BLOCK", "{id}");
                assert_eq!(d["policy_sha256"], block_digest.as_str(), "{id}");
                assert_eq!(
                    r.rationale, "Status checks are frozen for the drill.",
                    "{id}"
                );
            }
            other => panic!("{id}: {other:?}"),
        }
        assert_eq!(h.results_for(&id), 1, "{id}");
    }
    assert_eq!(allowed + blocked_n, N);
    assert!(
        allowed > 0 && blocked_n > 0,
        "the reloads overlapped the load: {allowed} allowed, {blocked_n} blocked"
    );
    stop.cancel();
    let _ = sink.await;
    r1.stop().await;
    let _ = std::fs::remove_file(&audit);
}

#[tokio::test]
async fn a_shadow_rule_records_what_it_would_do_and_replay_shows_a_candidates_exact_diff() {
    let shadow = format!(
        "{SHIPPED}\n[[commands.CHECK_INTEGRATION_STATUS.overrides]]\nservices = [\"mailchimp\"]\naction = \"BLOCK\"\nrationale = \"Mailchimp checks are to be blocked.\"\nmode = \"shadow\"\n"
    );
    let policy = PolicyFile::new(&shadow);
    let h = harness_with(&policy).await;
    let audit = std::env::temp_dir().join(format!("shadow-audit-{}.jsonl", suffix()));
    let stop = CancellationToken::new();
    let sink = spawn_sink(&h.settings, &audit, stop.clone());
    let r1 = h.spawn_replica("s1", None);
    ready(&[&r1]).await;
    h.send(&check("sh-1")).await;
    h.send(&cmd("sh-2", "CHECK_INTEGRATION_STATUS", "google", "LOW"))
        .await;
    h.send(&cmd("sh-3", "REFRESH_TOKEN", "google", "MEDIUM"))
        .await;
    h.send(&cmd("sh-4", "CONNECT_INTEGRATION", "salesforce", "HIGH"))
        .await;
    let r = h.result("sh-1").await;
    assert_eq!(r.status, Status::Success, "a shadow rule decides nothing");
    assert_eq!(h.result("sh-2").await.status, Status::Success);
    let refresh = h.result("sh-3").await.status;
    assert_eq!(h.result("sh-4").await.status, Status::Blocked);
    audited(&audit, "four decisions", |_| {
        ["sh-1", "sh-2", "sh-3", "sh-4"]
            .iter()
            .all(|id| decision_of(&audit, id).is_some())
    })
    .await;
    let d = decision_of(&audit, "sh-1").unwrap();
    assert_eq!(d["handling"], "EXECUTE");
    assert_eq!(
        d["shadows"][0]["rule"],
        "CHECK_INTEGRATION_STATUS.overrides[0]"
    );
    assert_eq!(d["shadows"][0]["would_have"], "BLOCK");
    assert!(decision_of(&audit, "sh-2")
        .unwrap()
        .get("shadows")
        .is_none());
    // The validated command fields, never the payload.
    assert_eq!(d["command"]["service"], "mailchimp");
    assert_eq!(d["command"]["agent"], "guest");
    assert_eq!(d["command"]["agent_verified"], true);
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(!text.contains("\"params\""), "no payload in the audit");
    let metrics = r1.state.metrics.render(0, Mode::Running);
    assert!(
        metrics.contains(r#"command_poller_policy_shadow_total{rule="CHECK_INTEGRATION_STATUS.overrides[0]",enforced="EXECUTE",would_have="BLOCK"} 1"#),
        "{metrics}"
    );

    // Replay the run's audit under a candidate that blocks REFRESH_TOKEN.
    let candidate = std::env::temp_dir().join(format!("candidate-{}.toml", suffix()));
    std::fs::write(
        &candidate,
        SHIPPED.replace(
            "[commands.REFRESH_TOKEN]\naction = \"JUDGE\"",
            "[commands.REFRESH_TOKEN]\naction = \"BLOCK\"",
        ),
    )
    .unwrap();
    let out = isolated(env!("CARGO_BIN_EXE_command-poller"))
        .args(["policy", "replay", "--json", "--audit"])
        .arg(&audit)
        .arg("--policy")
        .arg(&candidate)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["commands"], 4);
    assert_eq!(
        report["transitions"],
        serde_json::json!([
            {"old": "EXECUTE", "new": "EXECUTE", "count": 2},
            {"old": "JUDGE", "new": "BLOCK", "count": 1},
            {"old": "BLOCK", "new": "BLOCK", "count": 1},
        ]),
        "{report}"
    );
    assert_eq!(report["changed"].as_array().unwrap().len(), 1);
    assert_eq!(report["changed"][0]["action_id"], "sh-3");
    assert_eq!(report["changed"][0]["new_rule"], "REFRESH_TOKEN");
    // Nothing was executed or published by the replay.
    settle().await;
    assert_eq!(h.results_for("sh-3"), 1);
    assert!(matches!(refresh, Status::Success | Status::NeedsApproval));
    stop.cancel();
    let _ = sink.await;
    r1.stop().await;
    let _ = std::fs::remove_file(&audit);
    let _ = std::fs::remove_file(&candidate);
}

fn quarantine(agent: &str) -> ControlCommand {
    ControlCommand::Quarantine {
        agent: agent.into(),
        reason: "looping on refreshes".into(),
        request_id: new_request_id(),
    }
}

#[tokio::test]
async fn a_quarantined_agent_is_refused_on_every_replica_and_after_a_restart_while_others_flow() {
    let policy = PolicyFile::new(SHIPPED);
    let h = harness_with(&policy).await;
    let bad = BrokerUser::create();
    let r1 = h.spawn_replica("q1", None);
    let r2 = h.spawn_replica("q2", None);
    ready(&[&r1, &r2]).await;

    let report = h.operator().run(quarantine(&bad.0)).await.unwrap();
    assert_eq!(report.replicas.len(), 2);
    assert!(report
        .replicas
        .iter()
        .all(|r| r.accepted && r.state.quarantined.contains_key(&bad.0)));
    assert_eq!(report.stored_state.as_ref().unwrap().mode, Mode::Running);
    let alerts = h
        .wait_until("quarantine alerts", Duration::from_secs(10), |i| {
            let a: Vec<_> = i
                .alerts
                .iter()
                .filter(|(_, a)| a.summary.contains("quarantined by guest"))
                .cloned()
                .collect();
            (a.len() == 2).then_some(a)
        })
        .await;
    assert_eq!(alerts[0].1.agent.as_ref().unwrap().id, bad.0.as_str());

    // Both replicas refuse the agent; the other agent flows.
    for i in 0..6 {
        bad.send(&h, &check(&format!("qb-{i}"))).await;
        h.send(&check(&format!("qg-{i}"))).await;
    }
    for i in 0..6 {
        let r = h.result_of(&bad.0, &format!("qb-{i}")).await;
        assert_eq!(r.status, Status::Rejected);
        assert_eq!(r.error_field.as_deref(), Some("agent"));
        assert!(r.rationale.contains("quarantine"), "{}", r.rationale);
        assert!(
            r.rationale.contains("looping on refreshes"),
            "{}",
            r.rationale
        );
        assert_eq!(h.result(&format!("qg-{i}")).await.status, Status::Success);
    }
    for i in 0..6 {
        assert_eq!(h.sim.executions(&format!("qb-{i}")), 0, "never executed");
    }
    // Each replica refuses on its own: with r2 gone, r1; after a restart, the new r3.
    r2.stop().await;
    bad.send(&h, &check("qb-on-r1")).await;
    let r = h.result_of(&bad.0, "qb-on-r1").await;
    assert_eq!(
        (r.status, r.poller_instance.as_str()),
        (Status::Rejected, r1.instance.as_str())
    );
    // A replica started later reads the quarantine from the stored state.
    let r3 = h.spawn_replica("q3", None);
    ready(&[&r3]).await;
    assert!(r3.state.gate.quarantine_of(&bad.0).is_some());
    r1.stop().await;
    bad.send(&h, &check("qb-after-restart")).await;
    let r = h.result_of(&bad.0, "qb-after-restart").await;
    assert_eq!(
        (r.status, r.poller_instance.as_str()),
        (Status::Rejected, r3.instance.as_str())
    );

    // Released: its commands are decided again; the retry of a refused action_id runs.
    let report = h
        .operator()
        .run(ControlCommand::Release {
            agent: bad.0.clone(),
            reason: "fixed".into(),
            request_id: new_request_id(),
        })
        .await
        .unwrap();
    assert!(report
        .replicas
        .iter()
        .all(|r| r.state.quarantined.is_empty()));
    bad.send(&h, &check("qb-0")).await;
    h.wait_until("the retried qb-0 succeeds", Duration::from_secs(20), |i| {
        i.results
            .iter()
            .find(|(_, r)| r.action_id.as_deref() == Some("qb-0") && r.status == Status::Success)
            .map(|_| ())
    })
    .await;
    assert_eq!(h.sim.executions("qb-0"), 1);
    r3.stop().await;
}

#[tokio::test]
async fn the_agent_scoped_trip_quarantines_the_offender_and_the_fleet_keeps_running() {
    let policy = PolicyFile::new(SHIPPED);
    let h = harness_with(&policy).await;
    let bad = BrokerUser::create();
    let r1 = h.spawn_replica("a1", None);
    let r2 = h.spawn_replica("a2", None);
    ready(&[&r1, &r2]).await;
    // The shipped trips: CONNECT_INTEGRATION x3 by one agent within 600 s, scope "agent".
    for i in 1..=3 {
        let id = format!("ci-{i}");
        bad.send(&h, &cmd(&id, "CONNECT_INTEGRATION", "salesforce", "HIGH"))
            .await;
        assert_eq!(h.result_of(&bad.0, &id).await.status, Status::Blocked);
    }
    eventually(
        "the agent quarantined on both",
        Duration::from_secs(10),
        || {
            r1.state.gate.quarantine_of(&bad.0).is_some()
                && r2.state.gate.quarantine_of(&bad.0).is_some()
        },
    )
    .await;
    assert_eq!((r1.mode(), r2.mode()), (Mode::Running, Mode::Running));
    let alert = h
        .wait_until("the trip's alert", Duration::from_secs(10), |i| {
            i.alerts
                .iter()
                .find(|(_, a)| a.summary.contains("quarantined automatically"))
                .cloned()
        })
        .await;
    assert_eq!(alert.1.priority, Priority::High);
    assert_eq!(alert.0.routing_key, "security.high");
    for id in ["ci-1", "ci-2", "ci-3"] {
        assert!(alert.1.summary.contains(id), "{}", alert.1.summary);
    }
    settle().await;
    let n = h
        .inbox
        .lock()
        .unwrap()
        .alerts
        .iter()
        .filter(|(_, a)| a.summary.contains("quarantined automatically"))
        .count();
    assert_eq!(n, 1, "one replica tripped, one alert");
    bad.send(&h, &check("ci-then-check")).await;
    assert_eq!(
        h.result_of(&bad.0, "ci-then-check").await.status,
        Status::Rejected
    );
    h.send(&check("others-flow")).await;
    assert_eq!(h.result("others-flow").await.status, Status::Success);
    // Stored: what the operator sees.
    let status = h.status().await;
    let stored = status.stored_state.unwrap();
    assert_eq!(stored.mode, Mode::Running);
    assert!(stored.quarantined[&bad.0].reason.contains("automatic trip"));
    r1.stop().await;
    r2.stop().await;
}

/// Item 6 of the levers issue: three unverified CONNECT_INTEGRATION claiming a verified agent's
/// name quarantined the real agent. Unverified claims trip and quarantine as `unverified:<id>`.
#[tokio::test]
async fn unverified_claims_never_quarantine_the_verified_agent_of_that_name() {
    let policy = PolicyFile::new(SHIPPED);
    let file = policy.0.clone();
    let h = Harness::start(Options {
        start_poller: false,
        tweak: Box::new(move |s| {
            s.policy.file = file;
            s.intake.allow_unverified_agents = true;
        }),
        ..Default::default()
    })
    .await;
    let r = h.spawn_replica("u1", None);
    ready(&[&r]).await;
    // The verified agent is guest (the harness's sender); the claims say agent_id = guest.
    for i in 1..=3 {
        let id = format!("claim-ci-{i}");
        let mut c = cmd(&id, "CONNECT_INTEGRATION", "salesforce", "HIGH");
        c["agent_id"] = "guest".into();
        h.publish(
            c.to_string().as_bytes(),
            lapin::BasicProperties::default().with_content_type("application/json".into()),
        )
        .await;
        assert_eq!(h.result(&id).await.status, Status::Blocked);
    }
    eventually(
        "the unverified claimant quarantined",
        Duration::from_secs(10),
        || r.state.gate.quarantine_of("unverified:guest").is_some(),
    )
    .await;
    assert!(
        r.state.gate.quarantine_of("guest").is_none(),
        "the verified agent was quarantined by claims of its name"
    );
    h.send(&check("verified-still-runs")).await;
    assert_eq!(
        h.result("verified-still-runs").await.status,
        Status::Success
    );
    let mut c = check("claim-then-check");
    c["agent_id"] = "guest".into();
    h.publish(
        c.to_string().as_bytes(),
        lapin::BasicProperties::default().with_content_type("application/json".into()),
    )
    .await;
    assert_eq!(h.result("claim-then-check").await.status, Status::Rejected);
    r.stop().await;
}

/// Two people to loosen the policy: a stricter file is one operator's and instant; a file that
/// lets through what the policy in force refuses is refused by every replica until its digest
/// is approved by a second operator (never its proposer), and the approval binds that file
/// only.
#[tokio::test]
async fn a_looser_policy_file_needs_a_second_operator_and_a_stricter_one_does_not() {
    let bob = tokio::task::spawn_blocking(BrokerUser::create)
        .await
        .unwrap();
    let policy = PolicyFile::new(SHIPPED);
    let (file, bob_name) = (policy.0.clone(), bob.0.clone());
    let h = Harness::start(Options {
        start_poller: false,
        tweak: Box::new(move |s| {
            s.policy.file = file;
            s.control.operators.push(bob_name);
            s.control.loosening_approvals = 2;
        }),
        ..Default::default()
    })
    .await;
    let (r1, r2) = (h.spawn_replica("p1", None), h.spawn_replica("p2", None));
    ready(&[&r1, &r2]).await;
    let guest = h.operator();

    // Stricter: one operator, at once.
    let blocked = blocking_checks();
    policy.write(&blocked);
    let report = guest.run(reload()).await.unwrap();
    assert!(report.replicas.iter().all(|r| r.accepted), "{report:?}");

    // Back to the shipped file: it lets status checks through again, so it is refused.
    policy.write(SHIPPED);
    let report = guest.run(reload()).await.unwrap();
    assert_eq!(report.replicas.len(), 2, "{report:?}");
    for r in &report.replicas {
        assert!(!r.accepted, "{r:?}");
        let why = r.refusal.clone().unwrap_or_default();
        assert!(
            why.contains("lets through what the policy in force refuses"),
            "{why}"
        );
        assert!(
            why.contains("CHECK_INTEGRATION_STATUS: action Block → Allow"),
            "{why}"
        );
        assert_eq!(r.policy_sha256, digest_of(&blocked));
    }
    h.send(&check("loose-1")).await;
    assert_eq!(h.result("loose-1").await.status, Status::Blocked);

    // Approved by two: parked, the proposer can't second it, another operator does.
    let approve = ControlCommand::ApprovePolicy {
        digest: digest_of(SHIPPED),
        reason: "the drill is over, PM-7".into(),
        request_id: new_request_id(),
    };
    let id = approve.request_id().to_owned();
    let report = guest.run(approve).await.unwrap();
    let p = report.stored_state.unwrap().proposals[&id].clone();
    let second = |reason: &str| ControlCommand::Second {
        proposal: id.clone(),
        digest: p.digest.clone(),
        reason: reason.into(),
        request_id: new_request_id(),
    };
    let own = guest.run(second("mine")).await.unwrap_err().to_string();
    assert!(own.contains("proposer can't second"), "{own}");
    let report = guest.run(reload()).await.unwrap();
    assert!(
        report.replicas.iter().all(|r| !r.accepted),
        "a proposal approves nothing"
    );
    let s = h.settings.clone();
    let bob_op = command_poller::control::operator::Operator::new(
        &s,
        &node(&bob.url()),
        Duration::from_millis(1500),
    );
    bob_op.run(second("read PM-7")).await.unwrap();
    let report = guest.run(reload()).await.unwrap();
    for r in &report.replicas {
        assert!(r.accepted, "{r:?}");
        assert_eq!(r.policy_sha256, digest_of(SHIPPED));
    }
    h.send(&check("loose-2")).await;
    assert_eq!(h.result("loose-2").await.status, Status::Success);

    // The approval is that file's only: another looser one is refused again.
    let allow_refresh = SHIPPED.replacen(
        "[commands.REFRESH_TOKEN]\naction = \"JUDGE\"",
        "[commands.REFRESH_TOKEN]\naction = \"ALLOW\"",
        1,
    );
    assert_ne!(allow_refresh, SHIPPED);
    policy.write(&allow_refresh);
    let report = guest.run(reload()).await.unwrap();
    for r in &report.replicas {
        assert!(!r.accepted, "{r:?}");
        assert_eq!(r.policy_sha256, digest_of(SHIPPED));
    }
    r1.stop().await;
    r2.stop().await;
}
