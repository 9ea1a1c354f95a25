//! An incident end to end on the real broker: the E01 trip opens it, the operator's revoke and
//! resume join its timeline with the attempts that tripped it, the audit file gives it back,
//! and its bundle verifies on its own and fails when anything in it is changed.

use crate::common::*;
use command_poller::audit::incident::{self, Bundle};
use command_poller::control::operator::new_request_id;
use command_poller::control::{ControlCommand, Mode};
use command_poller::outcome::Status;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_command-poller");

fn control_kinds(file: &Path) -> Vec<String> {
    let Ok(lines) = command_poller::audit::chain::lines(file) else {
        return Vec::new();
    };
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["record"]["events"][0]["kind"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn the_e01_trip_opens_an_incident_whose_bundle_verifies_and_catches_any_change() {
    let h = Harness::start(Options {
        start_poller: false,
        ..Default::default()
    })
    .await;
    let file = std::env::temp_dir().join(format!("incident-{}.jsonl", suffix()));
    let stop = CancellationToken::new();
    let sink = spawn_sink(&h.settings, &file, stop.clone());
    let deny = command_poller::testing::scripted_panel(
        vec![("no", command_poller::testing::Script::Deny, 0)],
        Duration::from_secs(2),
        1,
    );
    let r = h.spawn_replica("inc", Some(deny));
    eventually("connected", Duration::from_secs(15), || r.connected()).await;
    h.send(&cmd(
        "before-1",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    ))
    .await;
    assert_eq!(h.result("before-1").await.status, Status::Success);
    for i in 1..=3 {
        let id = format!("inc-rt-{i}");
        h.send(&cmd(&id, "REFRESH_TOKEN", "google", "MEDIUM")).await;
        assert_eq!(h.result(&id).await.status, Status::NeedsApproval);
    }
    eventually("paused by the trip", Duration::from_secs(10), || {
        r.mode() == Mode::Paused
    })
    .await;
    // The trip is counted for the dashboards and alert rules (deploy/monitoring).
    let text = r.state.metrics.render(0, Mode::Paused);
    assert!(
        text.contains("command_poller_trips_total{scope=\"fleet\"} 1"),
        "{text}"
    );
    let op = h.operator();
    op.run(ControlCommand::Revoke {
        service: "google".into(),
        reason: "E01 step 2".into(),
        request_id: new_request_id(),
    })
    .await
    .unwrap();
    op.run(ControlCommand::Resume {
        reason: "agent fixed, SEC-7".into(),
        lift_halt: false,
        post_mortem: Some("PM-test".into()),
        request_id: new_request_id(),
    })
    .await
    .unwrap();
    h.send(&cmd(
        "after-1",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    ))
    .await;
    assert_eq!(h.result("after-1").await.status, Status::Success);
    eventually(
        "the resume in the audit file",
        Duration::from_secs(20),
        || control_kinds(&file).iter().any(|k| k == "running"),
    )
    .await;

    let all = incident::read(&file, None).unwrap();
    let trip = all
        .iter()
        .find(|i| i.opener == command_poller::incident::Opener::Trip)
        .unwrap_or_else(|| panic!("no trip incident in {all:?}"));
    let closed = trip.closed.as_ref().expect("the resume closed it");
    assert_eq!(closed.by, "guest");
    assert_eq!(
        trip.by_agent["guest"],
        vec!["inc-rt-1", "inc-rt-2", "inc-rt-3"],
        "the attempts that tripped it, and nothing before or after: {trip:?}"
    );
    assert_eq!(trip.by_service["google"].len(), 3);
    assert!(trip
        .affected
        .iter()
        .all(|a| a.status.as_deref() == Some("NEEDS_APPROVAL")));
    assert!(
        trip.timeline
            .iter()
            .any(|e| e.what.starts_with("revoked by guest")),
        "{:?}",
        trip.timeline
    );
    // Who was told what: the control alerts are entries of their own (the cut's to security).
    assert!(
        trip.timeline
            .iter()
            .any(|e| e.what.starts_with("alert_sent by") && e.what.contains(": security ")),
        "{:?}",
        trip.timeline
    );
    assert_eq!(trip.policy_sha256.len(), 1);

    // The bundle verifies on its own, and any change to it is caught.
    let b = incident::export(&file, None, &trip.id, Some("AKfy-v42".into())).unwrap();
    assert_eq!(b.bridge_version.as_deref(), Some("AKfy-v42"));
    let ok = incident::verify_bundle(&b, None);
    assert!(ok.ok(), "{ok:?}");
    assert_eq!(
        ok.linked_runs, 1,
        "the attempts lead straight into the trip: one run"
    );
    let mut edited = b.clone();
    edited.incident.reason = "nothing to see".into();
    assert!(!incident::verify_bundle(&edited, None).ok());
    let mut dropped = b.clone();
    let gone = dropped
        .lines
        .iter()
        .position(|l| l.contains("inc-rt-2"))
        .unwrap();
    dropped.lines.remove(gone);
    assert!(
        !incident::verify_bundle(&dropped, None).ok(),
        "a dropped line"
    );
    let mut altered = b.clone();
    altered.lines[0] = altered.lines[0].replace("NEEDS_APPROVAL", "SUCCESS");
    let why = incident::verify_bundle(&altered, None).first_bad.unwrap();
    assert!(why.contains("altered"), "{why}");
    let key = command_poller::bridge::signing::Secret::new("k");
    assert!(!incident::verify_bundle(&b, Some(&key)).ok(), "not keyed");

    // The same from the command line, on a machine without the config folder.
    let outside = std::env::temp_dir().join(format!("incident-cli-{}", suffix()));
    std::fs::create_dir_all(&outside).unwrap();
    let run = |args: &[&str]| {
        let out = isolated(BIN)
            .args(args)
            .current_dir(&outside)
            .env_remove("AUDIT_CHAIN_KEY")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let f = file.to_str().unwrap();
    let (ok, listed) = run(&["incident", "list", f]);
    assert!(ok && listed.contains(&trip.id), "{listed}");
    let (ok, shown) = run(&["incident", "show", &trip.id, f]);
    assert!(
        ok && shown.contains("inc-rt-1, inc-rt-2, inc-rt-3"),
        "{shown}"
    );
    let out = outside.join("bundle.json");
    let (ok, _) = run(&[
        "audit",
        "export",
        f,
        "--incident",
        &trip.id,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok);
    let (ok, report) = run(&["audit", "verify-bundle", out.to_str().unwrap()]);
    assert!(ok, "{report}");
    let mut written: Bundle = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    written.incident.affected.pop();
    std::fs::write(&out, serde_json::to_string(&written).unwrap()).unwrap();
    let (ok, _) = run(&["audit", "verify-bundle", out.to_str().unwrap()]);
    assert!(!ok, "an edited bundle fails");

    stop.cancel();
    let _ = sink.await;
    r.stop().await;
    let _ = std::fs::remove_dir_all(&outside);
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(command_poller::audit::chain::head_path(&file));
}

#[tokio::test]
async fn an_operator_opens_and_closes_an_incident_by_hand() {
    let h = Harness::start(Options {
        start_poller: false,
        ..Default::default()
    })
    .await;
    let file = std::env::temp_dir().join(format!("incident-manual-{}.jsonl", suffix()));
    let stop = CancellationToken::new();
    let sink = spawn_sink(&h.settings, &file, stop.clone());
    let (a, b) = (h.spawn_replica("m1", None), h.spawn_replica("m2", None));
    eventually("connected", Duration::from_secs(15), || {
        a.connected() && b.connected()
    })
    .await;
    let open = ControlCommand::OpenIncident {
        reason: "odd logins on the bridge account".into(),
        request_id: new_request_id(),
    };
    let report = h.operator().run(open.clone()).await.unwrap();
    assert!(report.replicas.iter().all(|r| r.accepted), "{report:?}");
    assert!(h
        .operator()
        .run(ControlCommand::OpenIncident {
            reason: " ".into(),
            request_id: new_request_id(),
        })
        .await
        .is_err());
    h.send(&cmd("during-1", "CHECK_INTEGRATION_STATUS", "meta", "LOW"))
        .await;
    assert_eq!(h.result("during-1").await.status, Status::Success);
    h.operator()
        .run(ControlCommand::CloseIncident {
            incident: open.request_id().into(),
            reason: "false alarm: a new team member".into(),
            request_id: new_request_id(),
        })
        .await
        .unwrap();
    eventually(
        "both replicas' close records",
        Duration::from_secs(20),
        || {
            control_kinds(&file)
                .iter()
                .filter(|k| *k == "incident_closed")
                .count()
                == 2
        },
    )
    .await;
    let all = incident::read(&file, None).unwrap();
    assert_eq!(
        all.len(),
        1,
        "two replicas' records are one incident: {all:?}"
    );
    let i = &all[0];
    assert_eq!(i.id, open.request_id());
    assert_eq!(i.reason, "odd logins on the bridge account");
    assert!(i.closed.as_ref().unwrap().reason.contains("false alarm"));
    assert_eq!(i.by_service["meta"], vec!["during-1"]);
    assert_eq!(
        i.timeline
            .iter()
            .filter(|e| e.what.starts_with("incident_opened"))
            .count(),
        1
    );
    stop.cancel();
    let _ = sink.await;
    a.stop().await;
    b.stop().await;
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(command_poller::audit::chain::head_path(&file));
}
