//! Step 2 of both emergencies against the real broker: `revoke` and `disconnect` stored first,
//! carried out once by the fleet through the bridge, the service's refreshes refused until an
//! operator records it reconnected; and nobody but an operator can pull them.

use crate::common::*;
use command_poller::control::operator::new_request_id;
use command_poller::control::{ControlCommand, Mode};
use command_poller::outcome::Status;
use std::time::Duration;

fn revoke(service: &str) -> ControlCommand {
    ControlCommand::Revoke {
        service: service.into(),
        reason: "E01: repeated unapproved refreshes".into(),
        request_id: new_request_id(),
    }
}

fn reconnected(service: &str) -> ControlCommand {
    ControlCommand::Reconnected {
        service: service.into(),
        reason: "SOP-INT-03 review SEC-42 done".into(),
        request_id: new_request_id(),
    }
}

async fn two_replicas(h: &Harness) -> (ReplicaHandle, ReplicaHandle) {
    let (a, b) = (h.spawn_replica("c1", None), h.spawn_replica("c2", None));
    eventually("both replicas connected", Duration::from_secs(15), || {
        a.connected() && b.connected()
    })
    .await;
    (a, b)
}

#[tokio::test]
async fn a_revoke_is_carried_out_once_by_the_fleet_and_refuses_the_services_refresh_until_reconnected(
) {
    let h = Harness::start(Options {
        start_poller: false,
        ..Default::default()
    })
    .await;
    let (a, b) = two_replicas(&h).await;
    // E01 step 1, then step 2 while paused.
    let op = h.operator();
    op.run(ControlCommand::Pause {
        reason: "E01".into(),
        request_id: new_request_id(),
    })
    .await
    .unwrap();
    let lever = revoke("google");
    let report = op.run(lever.clone()).await.unwrap();
    assert_eq!(report.replicas.len(), 2, "{report:?}");
    assert!(report.replicas.iter().all(|r| r.accepted), "{report:?}");
    // One replica carried it out; another may answer from its stored report (it asked after
    // the first had finished), naming the same replica.
    let cuts: Vec<_> = report
        .replicas
        .iter()
        .filter_map(|r| r.cut.clone())
        .collect();
    assert!(!cuts.is_empty(), "{report:?}");
    assert!(cuts.iter().all(|c| c == &cuts[0]), "one report: {cuts:?}");
    let cut = &cuts[0];
    assert!(cut.error.is_none(), "{cut:?}");
    assert_eq!(
        cut.credentials(),
        vec![
            "GOOGLE_REFRESH_TOKEN: revoked at provider",
            "GOOGLE_ACCESS_TOKEN: revoked at provider"
        ]
    );
    assert!([&a.instance, &b.instance].contains(&&cut.carried_out_by));
    assert_eq!(h.sim.posts(lever.request_id()), 1, "one POST for the fleet");
    let stored = report.stored_state.expect("stored");
    assert_eq!(stored.revoked["google"].by, "guest");
    assert_eq!(stored.mode, Mode::Paused, "a cut changes no mode");
    let alert = h
        .wait_until("the security alert", Duration::from_secs(10), |i| {
            i.alerts
                .iter()
                .find(|(_, a)| a.summary.contains("Service google revoked by guest"))
                .cloned()
        })
        .await;
    assert_eq!(alert.0.routing_key, "security.high");
    assert!(alert
        .1
        .summary
        .contains("GOOGLE_REFRESH_TOKEN: revoked at provider"));
    settle().await;
    let announced = h
        .inbox
        .lock()
        .unwrap()
        .alerts
        .iter()
        .filter(|(_, a)| a.summary.contains("Service google revoked by guest"))
        .count();
    assert_eq!(
        announced, 1,
        "announced once, by the replica that carried it out"
    );
    assert!(alert
        .1
        .action_required
        .contains("command-poller reconnected google"));

    // The same lever again (a retry, a redelivery): answered from the stored report.
    let again = op.run(lever.clone()).await.unwrap();
    assert!(
        again.replicas.iter().any(|r| r.cut.as_ref() == Some(cut)),
        "{again:?}"
    );
    assert_eq!(h.sim.posts(lever.request_id()), 1, "never a second POST");

    op.run(ControlCommand::Resume {
        reason: "contained".into(),
        lift_halt: false,
        post_mortem: Some("PM-test".into()),
        request_id: new_request_id(),
    })
    .await
    .unwrap();
    h.send(&cmd(
        "refresh-after-revoke",
        "REFRESH_TOKEN",
        "google",
        "MEDIUM",
    ))
    .await;
    let r = h.result("refresh-after-revoke").await;
    assert_eq!(r.status, Status::Rejected, "{r:?}");
    assert!(
        r.rationale.contains("service google was revoked by guest"),
        "{}",
        r.rationale
    );
    assert!(r.rationale.contains("SOP-INT-03"), "{}", r.rationale);
    assert_eq!(h.sim.executions("refresh-after-revoke"), 0);
    // Other services and reads are untouched.
    h.send(&cmd("refresh-meta", "REFRESH_TOKEN", "meta", "MEDIUM"))
        .await;
    assert_eq!(h.result("refresh-meta").await.status, Status::Success);
    h.send(&cmd(
        "check-google",
        "CHECK_INTEGRATION_STATUS",
        "google",
        "LOW",
    ))
    .await;
    let check = h.result("check-google").await;
    assert_eq!(check.status, Status::Success);
    assert_eq!(
        check.tool_result.unwrap()["integration_status"],
        "NOT_CONNECTED",
        "the bridge deleted the tokens"
    );

    // Reconnected by hand and recorded: refreshes are decided again (the refused one was not
    // stored, so the agent's own retry goes through).
    let back = op.run(reconnected("google")).await.unwrap();
    assert!(back.replicas.iter().all(|r| r.accepted), "{back:?}");
    assert!(back.stored_state.unwrap().revoked.is_empty());
    h.wait_until("the reconnection alert", Duration::from_secs(10), |i| {
        i.alerts
            .iter()
            .any(|(_, a)| {
                a.summary
                    .contains("Service google recorded reconnected by guest")
            })
            .then_some(())
    })
    .await;
    h.send(&cmd(
        "refresh-after-revoke",
        "REFRESH_TOKEN",
        "google",
        "MEDIUM",
    ))
    .await;
    h.wait_until("the retry decided afresh", Duration::from_secs(15), |i| {
        i.results
            .iter()
            .any(|(_, r)| {
                r.action_id.as_ref().map(|a| a.as_str()) == Some("refresh-after-revoke")
                    && r.status != Status::Rejected
            })
            .then_some(())
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_disconnect_works_while_halted_and_a_bridge_that_cannot_is_reported_not_hidden() {
    let h = Harness::start(Options {
        start_poller: false,
        ..Default::default()
    })
    .await;
    let r = h.spawn_replica("halted", None);
    eventually("connected", Duration::from_secs(15), || r.connected()).await;
    let op = h.operator();
    op.run(ControlCommand::Halt {
        reason: "E02".into(),
        request_id: new_request_id(),
    })
    .await
    .unwrap();
    let disconnect = |service: &str| ControlCommand::Disconnect {
        service: service.into(),
        reason: "E02: integration nobody approved".into(),
        request_id: new_request_id(),
    };
    let report = op.run(disconnect("meta")).await.unwrap();
    let cut = report.replicas[0]
        .cut
        .clone()
        .expect("carried out while halted");
    assert_eq!(
        cut.answer.as_ref().unwrap()["integration_status"],
        "DISCONNECTED"
    );
    assert_eq!(
        cut.credentials(),
        vec![
            "META_ACCESS_TOKEN: revoked at provider",
            "META_APP_SECRET: deleted locally, revoke by hand at https://developers.facebook.com/apps/"
        ]
    );
    assert_eq!(r.mode(), Mode::Halted, "still halted");
    // A service the bridge has no credentials for: stored anyway, the failure said plainly.
    let report = op.run(disconnect("salesforce")).await.unwrap();
    let cut = report.replicas[0].cut.clone().expect("reported");
    assert!(
        cut.error
            .as_deref()
            .unwrap_or("")
            .contains("not configured"),
        "{cut:?}"
    );
    assert!(report
        .stored_state
        .unwrap()
        .revoked
        .contains_key("salesforce"));
    let alert = h
        .wait_until("the failure's alert", Duration::from_secs(10), |i| {
            i.alerts
                .iter()
                .find(|(_, a)| a.summary.contains("Service salesforce disconnected"))
                .cloned()
        })
        .await;
    assert!(
        alert.1.summary.contains("the bridge call failed"),
        "{}",
        alert.1.summary
    );
    assert!(
        alert.1.action_required.contains("by hand"),
        "{}",
        alert.1.action_required
    );
    r.stop().await;
}

#[tokio::test]
async fn an_agent_can_never_pull_a_cut_nor_record_a_reconnection() {
    let h = Harness::start(Options {
        start_poller: false,
        ..Default::default()
    })
    .await;
    let r = h.spawn_replica("guarded", None);
    eventually("connected", Duration::from_secs(15), || r.connected()).await;
    // As a command on the commands queue: refused at intake, never sent to the bridge.
    for (id, t) in [
        ("agent-revoke", "REVOKE_CREDENTIALS"),
        ("agent-disconnect", "DISCONNECT_INTEGRATION"),
    ] {
        h.send(&cmd(id, t, "google", "HIGH")).await;
        let res = h.result(id).await;
        assert_eq!(res.status, Status::Rejected);
        assert!(
            res.rationale.contains("operator lever"),
            "{}",
            res.rationale
        );
        assert_eq!(h.sim.posts(id), 0);
        // Security hears of it: an agent reaching for an operator lever is an incident's sign.
        let (rx, alert) = h
            .wait_until("security's alert", Duration::from_secs(10), |i| {
                i.alerts
                    .iter()
                    .find(|(_, a)| a.action_id.as_ref().is_some_and(|a| a.as_str() == id))
                    .cloned()
            })
            .await;
        assert_eq!(rx.routing_key, "security.high");
        assert!(
            alert
                .summary
                .contains(&format!("sent {t}, an operator lever")),
            "{}",
            alert.summary
        );
        assert!(alert.summary.contains("agent guest"), "{}", alert.summary);
    }
    // As a control message from an agent's broker user: refused and alerted; nothing stored.
    let operator = h.operator();
    operator.run(revoke("google")).await.unwrap();
    let agent = tokio::task::spawn_blocking(BrokerUser::create)
        .await
        .unwrap();
    let back = reconnected("google");
    let conn = lapin::Connection::connect(&agent.url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        h.settings.control.exchange.as_str().into(),
        back.routing_key().into(),
        Default::default(),
        &serde_json::to_vec(&back).unwrap(),
        lapin::BasicProperties::default().with_user_id(agent.0.as_str().into()),
    )
    .await
    .unwrap();
    h.wait_until("the refusal's alert", Duration::from_secs(10), |i| {
        i.alerts
            .iter()
            .any(|(_, a)| {
                a.summary.contains("Refused a control message") && a.summary.contains(&agent.0)
            })
            .then_some(())
    })
    .await;
    let _ = conn.close(200, "ok".into()).await;
    // The CLI as that user is refused before anything is sent.
    let s = h.settings.clone();
    let as_agent = command_poller::control::operator::Operator::new(
        &s,
        &node(&agent.url()),
        Duration::from_millis(500),
    );
    assert!(as_agent.run(reconnected("google")).await.is_err());
    assert!(as_agent.run(revoke("meta")).await.is_err());
    let status = h.status().await;
    let stored = status.stored_state.unwrap();
    assert!(stored.revoked.contains_key("google"), "still cut");
    assert!(!stored.revoked.contains_key("meta"));
    h.send(&cmd("still-refused", "REFRESH_TOKEN", "google", "MEDIUM"))
        .await;
    assert_eq!(h.result("still-refused").await.status, Status::Rejected);
    r.stop().await;
}

/// `revoke_on_trip`: the E01 trip pauses the fleet and, as its step 2, revokes the services the
/// unapproved refreshes were for, once, announced like an operator's revoke.
#[tokio::test]
async fn the_e01_trip_with_revoke_on_trip_pauses_and_revokes_what_was_attempted() {
    let h = Harness::start(Options {
        start_poller: false,
        tweak: Box::new(|s| {
            for t in &mut s.control.trips {
                if t.command_type == command_poller::intake::CommandType::RefreshToken {
                    t.revoke_on_trip = true;
                }
            }
        }),
        ..Default::default()
    })
    .await;
    let deny = || {
        command_poller::testing::scripted_panel(
            vec![("no", command_poller::testing::Script::Deny, 0)],
            Duration::from_secs(2),
            1,
        )
    };
    let (a, b) = (
        h.spawn_replica("t1", Some(deny())),
        h.spawn_replica("t2", Some(deny())),
    );
    eventually("both replicas connected", Duration::from_secs(15), || {
        a.connected() && b.connected()
    })
    .await;
    for i in 1..=3 {
        let id = format!("rt-{i}");
        h.send(&cmd(&id, "REFRESH_TOKEN", "google", "MEDIUM")).await;
        assert_eq!(h.result(&id).await.status, Status::NeedsApproval);
    }
    eventually("both replicas paused", Duration::from_secs(10), || {
        a.mode() == Mode::Paused && b.mode() == Mode::Paused
    })
    .await;
    let alert = h
        .wait_until("the revoke's alert", Duration::from_secs(15), |i| {
            i.alerts
                .iter()
                .find(|(_, a)| a.summary.contains("Service google revoked by"))
                .cloned()
        })
        .await;
    assert!(
        alert
            .1
            .summary
            .contains("GOOGLE_REFRESH_TOKEN: revoked at provider"),
        "{}",
        alert.1.summary
    );
    let status = h.status().await;
    let stored = status.stored_state.unwrap();
    let cut = &stored.revoked["google"];
    assert!(cut.reason.contains("automatic trip"), "{}", cut.reason);
    assert_eq!(cut.by, h.settings.poller_user());
    let calls = h.sim.calls();
    assert_eq!(
        calls.posts.get(&cut.request_id),
        Some(&1),
        "one POST: {calls:?}"
    );
    // Resumed without reconnecting: the service's refresh stays refused.
    h.operator()
        .run(ControlCommand::Resume {
            reason: "agent fixed".into(),
            lift_halt: false,
            post_mortem: Some("PM-test".into()),
            request_id: new_request_id(),
        })
        .await
        .unwrap();
    h.send(&cmd("rt-after", "REFRESH_TOKEN", "google", "MEDIUM"))
        .await;
    let r = h.result("rt-after").await;
    assert_eq!(r.status, Status::Rejected);
    assert!(r.rationale.contains("automatic trip"), "{}", r.rationale);
    a.stop().await;
    b.stop().await;
}

/// A harness whose bridge answers every POST 503 (retryable, for 30 s of retries), with
/// `command` sent and seen failing twice: it sits in the bridge client's retry loop.
async fn stuck_in_retries(command: &serde_json::Value) -> Harness {
    stuck_in_retries_after(command, None, None).await
}

/// As [`stuck_in_retries`], the poller judging with `panel` (the configured one when `None`),
/// and `lever` pulled before the command is sent.
pub(crate) async fn stuck_in_retries_after(
    command: &serde_json::Value,
    panel: Option<command_poller::judging::Panel>,
    lever: Option<ControlCommand>,
) -> Harness {
    let h = Harness::start(Options {
        tweak: Box::new(|s| {
            s.bridge.min_backoff = Duration::from_millis(100);
            s.bridge.max_backoff = Duration::from_millis(200);
            s.bridge.retry_budget = Duration::from_secs(30);
        }),
        panel,
        ..Default::default()
    })
    .await;
    if let Some(lever) = lever {
        let report = h.operator().run(lever).await.unwrap();
        assert!(report.replicas.iter().all(|r| r.accepted), "{report:?}");
    }
    h.sim.fail_next_posts(
        std::iter::repeat_n(
            command_poller::bridge::simulator::Fault::Status { code: 503 },
            1000,
        )
        .collect::<Vec<_>>(),
    );
    h.send(command).await;
    let id = command["action_id"].as_str().unwrap();
    eventually("two failed POSTs", Duration::from_secs(10), || {
        h.sim.posts(id) >= 2
    })
    .await;
    h
}

/// After a lever stopped a command in its retries: its POSTs went out (failing before running),
/// so its redelivery asks the bridge what came of them before it is refused. Waits for that
/// question (the first lookup, still failing), then lets the bridge answer: it remembers
/// nothing, so the refusal stands.
pub(crate) async fn bridge_back_once_asked(h: &Harness, id: &str) {
    eventually(
        "the redelivery asks the bridge",
        Duration::from_secs(20),
        || h.sim.lookups(id) >= 1,
    )
    .await;
    h.sim.heal();
}

/// A revoke pulled while a refresh of that service is in the bridge client's retry loop stops
/// its next POST (the gate was asked only about the mode between retries, so the refresh could
/// still reach the provider after the revoke was acknowledged); the command goes back to the
/// queue and its redelivery ends REJECTED.
#[tokio::test]
async fn a_revoke_during_a_refreshs_retries_stops_its_next_post() {
    let h = stuck_in_retries(&cmd("revoke-retry-1", "REFRESH_TOKEN", "google", "MEDIUM")).await;
    // The cut's own bridge call fails too (every POST does here): don't wait for its report.
    let s = h.settings.clone();
    let mut op = command_poller::control::operator::Operator::new(
        &s,
        &node(AMQP),
        Duration::from_millis(1500),
    );
    op.cut_wait = Duration::from_millis(100);
    let ack = op.run(revoke("google")).await.unwrap();
    assert!(ack.replicas.iter().all(|r| r.accepted), "{ack:?}");
    let posts_at_ack = h.sim.posts("revoke-retry-1");
    bridge_back_once_asked(&h, "revoke-retry-1").await;
    let r = h.result("revoke-retry-1").await;
    assert_eq!(r.status, Status::Rejected, "{r:?}");
    assert!(r.rationale.contains("revoked by guest"), "{}", r.rationale);
    assert!(
        h.sim.posts("revoke-retry-1") <= posts_at_ack + 1,
        "a POST after the revoke was acknowledged: {posts_at_ack} at the ack, {} now",
        h.sim.posts("revoke-retry-1")
    );
    assert_eq!(h.sim.executions("revoke-retry-1"), 0);
}

/// Quarantines the test agent, every replica accepting.
async fn quarantine_guest(h: &Harness) {
    let ack = h
        .operator()
        .run(ControlCommand::Quarantine {
            agent: "guest".into(),
            reason: "looping".into(),
            request_id: new_request_id(),
        })
        .await
        .unwrap();
    assert!(ack.replicas.iter().all(|r| r.accepted), "{ack:?}");
}

/// The same for a quarantine: the agent's command in its bridge retries sends no further POST
/// once the quarantine is acknowledged.
#[tokio::test]
async fn a_quarantine_during_a_commands_retries_stops_its_next_post() {
    let h = stuck_in_retries(&cmd(
        "quarantine-retry-1",
        "CHECK_INTEGRATION_STATUS",
        "meta",
        "LOW",
    ))
    .await;
    quarantine_guest(&h).await;
    let posts_at_ack = h.sim.posts("quarantine-retry-1");
    bridge_back_once_asked(&h, "quarantine-retry-1").await;
    let r = h.result("quarantine-retry-1").await;
    assert_eq!(r.status, Status::Rejected, "{r:?}");
    assert!(r.rationale.contains("quarantine"), "{}", r.rationale);
    assert!(
        h.sim.posts("quarantine-retry-1") <= posts_at_ack + 1,
        "a POST after the quarantine was acknowledged: {posts_at_ack} at the ack, {} now",
        h.sim.posts("quarantine-retry-1")
    );
}

/// The chaos soak's violation, against the real broker, bridge simulator and store: a replica
/// ran an action at the bridge and died before its result was stored (its slot's mark of the
/// call stays, its claim runs out); meanwhile the agent is quarantined. The command taken over
/// must report what ran (asked of the bridge with a lookup, never sent again), not REJECTED.
#[tokio::test]
async fn an_action_run_by_a_replica_that_died_is_reported_run_despite_a_later_quarantine() {
    use command_poller::bridge::{AlwaysAdmit, BridgeParams, BridgeRequest};
    let h = Harness::start(Options::default()).await;
    let id = "died-after-call-1";
    let key = format!("guest/{id}");
    // The dead replica: its claim, a bridge slot (marking the call), the call itself.
    let claim_ttl = Duration::from_secs(2);
    assert_eq!(
        h.store
            .hold(&key, "dead-replica#1", claim_ttl)
            .await
            .unwrap(),
        command_poller::store::Claim::Mine
    );
    let slot = h
        .stores
        .slots
        .try_take(
            "dead-replica/1",
            25,
            Duration::from_secs(15),
            &key,
            Duration::from_secs(600),
        )
        .await
        .unwrap()
        .expect("a free slot");
    assert!(!slot.earlier);
    let bridge = bridge_client(&h.settings, &h.sim, h.secret.clone());
    let ran = bridge
        .execute(
            &BridgeRequest {
                action_id: id.into(),
                command_type: command_poller::intake::CommandType::CheckIntegrationStatus.into(),
                params: BridgeParams {
                    service: "meta".into(),
                },
                agent: "guest".into(),
                agent_verified: true,
                requested_at: "2026-12-07T00:00:00Z".into(),
                lookup: false,
            },
            &AlwaysAdmit,
        )
        .await
        .expect("the dead replica's call ran");
    assert_eq!(h.sim.executions(id), 1);
    // Killed here: nothing stored, nothing published. Then the agent is quarantined.
    quarantine_guest(&h).await;
    // The command reaches the live replica (it waits out the dead claim).
    h.send(&cmd(id, "CHECK_INTEGRATION_STATUS", "meta", "LOW"))
        .await;
    let r = h.result(id).await;
    assert_eq!(r.status, Status::Success, "{r:?}");
    assert_eq!(
        r.tool_result,
        Some(ran.tool_result),
        "the answer it ran with"
    );
    assert!(r.rationale.contains("earlier attempt"), "{}", r.rationale);
    let b = r.bridge.as_ref().expect("the lookup");
    assert!(b.looked_up && !b.repost, "{b:?}");
    assert!(r.rationale.contains("quarantine"), "{}", r.rationale);
    assert_eq!(h.sim.executions(id), 1, "never run twice");
    assert_eq!(h.sim.lookups(id), 1, "asked with a lookup");
    // Stored: a copy is answered from the store, still SUCCESS, quarantine or not.
    h.send(&cmd(id, "CHECK_INTEGRATION_STATUS", "meta", "LOW"))
        .await;
    eventually(
        "the copy's replayed result",
        Duration::from_secs(10),
        || h.results_for(id) >= 2,
    )
    .await;
    let statuses: Vec<_> = h
        .inbox
        .lock()
        .unwrap()
        .results
        .iter()
        .filter(|(_, r)| r.action_id.as_deref() == Some(id))
        .map(|(_, r)| (r.status, r.replay))
        .collect();
    assert_eq!(
        statuses,
        vec![(Status::Success, false), (Status::Success, true)]
    );
    assert_eq!(h.sim.posts(id), 1, "the copy sent nothing either");
}
