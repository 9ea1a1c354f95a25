//! Operator control with two replicas against the real broker: pause, resume, halt, the stored
//! state, who may pull the levers, and the automatic trip of Emergency-INT-E01.

use crate::common::*;
use command_poller::control::operator::new_request_id;
use command_poller::control::{ControlCommand, Mode};
use command_poller::judging::{Judge, Panel};
use command_poller::outcome::{Priority, Status};
use command_poller::testing::Script;
use futures::StreamExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

fn check(id: &str) -> serde_json::Value {
    cmd(id, "CHECK_INTEGRATION_STATUS", "mailchimp", "LOW")
}

async fn both_ready(a: &ReplicaHandle, b: &ReplicaHandle) {
    eventually("both replicas connected", Duration::from_secs(15), || {
        a.connected() && b.connected()
    })
    .await;
}

fn pause(reason: &str) -> ControlCommand {
    ControlCommand::Pause {
        reason: reason.into(),
        request_id: new_request_id(),
    }
}

fn resume(lift_halt: bool) -> ControlCommand {
    ControlCommand::Resume {
        reason: "incident over".into(),
        lift_halt,
        post_mortem: Some("PM-test".into()),
        request_id: new_request_id(),
    }
}

#[tokio::test]
async fn pause_stops_bridge_calls_on_both_replicas_and_resume_drains_everything_once() {
    let h = Harness::start(Options {
        start_poller: false,
        sim_latency: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let r1 = h.spawn_replica("r1", None);
    let r2 = h.spawn_replica("r2", None);
    both_ready(&r1, &r2).await;
    for i in 0..20 {
        h.send(&check(&format!("pr-{i}"))).await;
    }
    h.wait_until("some results", Duration::from_secs(20), |i| {
        (i.results.len() >= 4).then_some(())
    })
    .await;

    let report = h
        .operator()
        .run(pause("Emergency-INT-E01 drill"))
        .await
        .unwrap();
    assert_eq!(report.replicas.len(), 2, "{report:?}");
    assert!(report
        .replicas
        .iter()
        .all(|r| r.accepted && r.state.mode == Mode::Paused));
    assert_eq!(report.stored_state.as_ref().unwrap().mode, Mode::Paused);
    assert_eq!(report.stored_state.as_ref().unwrap().by, "guest");
    // Calls admitted before the acknowledgement finish; after that, none starts.
    eventually(
        "calls at the bridge to finish",
        Duration::from_secs(10),
        || r1.state.gate.at_bridge() == 0 && r2.state.gate.at_bridge() == 0,
    )
    .await;
    let posts_at_pause = h.sim.calls().posts.values().sum::<u32>();
    for i in 20..30 {
        h.send(&check(&format!("pr-{i}"))).await;
    }
    settle().await;
    settle().await;
    assert_eq!(
        h.sim.calls().posts.values().sum::<u32>(),
        posts_at_pause,
        "a bridge call started after the pause"
    );
    let done = h.inbox.lock().unwrap().results.len();
    assert!(
        h.queue_depth().await as usize >= 30 - done - 2,
        "commands stay queued"
    );
    assert!(done < 30);

    let report = h.operator().run(resume(false)).await.unwrap();
    assert!(report
        .replicas
        .iter()
        .all(|r| r.accepted && r.state.mode == Mode::Running));
    h.wait_until("all 30 results", Duration::from_secs(30), |i| {
        (i.results.len() >= 30).then_some(())
    })
    .await;
    settle().await;
    for i in 0..30 {
        let id = format!("pr-{i}");
        assert_eq!(h.results_for(&id), 1, "{id}");
        assert_eq!(h.sim.executions(&id), 1, "{id}");
        // Held by the pause after taking a bridge slot, before any POST: not a re-POST.
        let r = h.result(&id).await;
        assert!(
            !r.bridge.is_some_and(|b| b.repost),
            "{id} counted as a re-POST"
        );
    }
    assert_eq!(h.queue_depth().await, 0);
    r1.stop().await;
    r2.stop().await;
}

#[tokio::test]
async fn a_replica_started_while_paused_consumes_nothing() {
    let h = Harness::start(Options {
        start_poller: false,
        ..Default::default()
    })
    .await;
    // Nobody is running: the pause is stored for replicas that start later.
    let report = h.operator().run(pause("maintenance")).await.unwrap();
    assert!(report.replicas.is_empty());
    assert!(report.note.unwrap().contains("no live replica"));
    let r = h.spawn_replica("late", None);
    eventually("the replica to connect", Duration::from_secs(15), || {
        r.connected()
    })
    .await;
    assert_eq!(r.mode(), Mode::Paused);
    for i in 0..3 {
        h.send(&check(&format!("late-{i}"))).await;
    }
    settle().await;
    assert_eq!(h.queue_depth().await, 3);
    assert!(h.inbox.lock().unwrap().results.is_empty());
    let status = h.status().await;
    assert_eq!(status.replicas.len(), 1);
    let s = &status.replicas[0];
    assert_eq!(s.state.mode, Mode::Paused);
    assert_eq!(s.state.reason, "maintenance");
    assert_eq!(s.state.by, "guest");
    assert_eq!(status.queue_depth, Some(3));
    h.operator().run(resume(false)).await.unwrap();
    for i in 0..3 {
        assert_eq!(h.result(&format!("late-{i}")).await.status, Status::Success);
    }
    let status = h.status().await;
    assert_eq!(status.replicas[0].recent_results.len(), 3);
    r.stop().await;
}

#[tokio::test]
async fn halt_stops_judges_and_bridge_alerts_and_needs_the_confirmation_to_lift() {
    let h = Harness::start(Options {
        start_poller: false,
        ..Default::default()
    })
    .await;
    let judge =
        command_poller::testing::ScriptedJudge::new("counting", Script::Approve, Duration::ZERO);
    let calls = judge.calls.clone();
    let panel = Panel::new(
        vec![(Arc::new(judge) as Arc<dyn Judge>, Duration::from_secs(2))],
        1,
    );
    let r = h.spawn_replica("h", Some(panel));
    eventually("connected", Duration::from_secs(15), || r.connected()).await;

    let report = h
        .operator()
        .run(ControlCommand::Halt {
            reason: "policy bypass suspected".into(),
            request_id: new_request_id(),
        })
        .await
        .unwrap();
    assert_eq!(report.replicas[0].state.mode, Mode::Halted);
    let alerts = h
        .wait_until("halt alerts", Duration::from_secs(10), |i| {
            let a: Vec<_> = i
                .alerts
                .iter()
                .filter(|(_, a)| a.summary.contains("MASTER SHUT-OFF"))
                .cloned()
                .collect();
            (a.len() >= 2).then_some(a)
        })
        .await;
    let mut keys: Vec<_> = alerts
        .iter()
        .map(|(rx, _)| rx.routing_key.clone())
        .collect();
    keys.sort();
    assert_eq!(keys, ["engineering.high", "security.high"]);
    assert!(alerts
        .iter()
        .all(|(_, a)| a.priority == Priority::High && a.status.is_none()));

    h.send(&cmd("halted-1", "REFRESH_TOKEN", "google", "MEDIUM"))
        .await;
    settle().await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "a judge was consulted while halted"
    );
    assert_eq!(h.sim.calls().posts.len(), 0);

    // A plain resume is refused, by the CLI and by the replica.
    let err = h.operator().run(resume(false)).await.unwrap_err();
    assert!(err.to_string().contains("lift-halt"), "{err}");
    let raw = serde_json::to_vec(&resume(false)).unwrap();
    publish_control(&h, AMQP, "guest", "control.resume", &raw).await;
    settle().await;
    assert_eq!(r.mode(), Mode::Halted);

    let report = h.operator().run(resume(true)).await.unwrap();
    assert_eq!(report.replicas[0].state.mode, Mode::Running);
    assert_eq!(h.result("halted-1").await.status, Status::Success);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    r.stop().await;
}

async fn publish_control(h: &Harness, url: &str, user: &str, key: &str, body: &[u8]) {
    let conn = lapin::Connection::connect(url, Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    ch.basic_publish(
        h.settings.control.exchange.as_str().into(),
        key.into(),
        Default::default(),
        body,
        lapin::BasicProperties::default().with_user_id(user.into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let _ = conn.close(200, "ok".into()).await;
}

/// Publishes `cmd` as the operator `guest` (a lever as the CLI sends it, but without storing
/// the change first) and returns the replica's answer.
async fn raw_lever(
    h: &Harness,
    cmd: &ControlCommand,
) -> command_poller::control::replica::ReplicaReply {
    let conn = lapin::Connection::connect(AMQP, Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut replies = command_poller::broker::consume_direct_replies(&ch)
        .await
        .unwrap();
    ch.basic_publish(
        h.settings.control.exchange.as_str().into(),
        cmd.routing_key().into(),
        Default::default(),
        &serde_json::to_vec(cmd).unwrap(),
        lapin::BasicProperties::default()
            .with_user_id("guest".into())
            .with_reply_to("amq.rabbitmq.reply-to".into()),
    )
    .await
    .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .expect("the replica answers within 10 s")
        .unwrap()
        .unwrap();
    let _ = conn.close(200, "ok".into()).await;
    serde_json::from_slice(&d.data).unwrap()
}

/// The stored state is the one path by which control state reaches a replica: an operator's
/// lever whose change was never stored pauses nothing (it used to flip the gate by itself, so
/// two replicas could enforce different states), and is answered with why.
#[tokio::test]
async fn a_lever_whose_change_was_never_stored_changes_nothing() {
    let h = Harness::start(Options {
        start_poller: false,
        ..Default::default()
    })
    .await;
    let r = h.spawn_replica("one-path", None);
    eventually("connected", Duration::from_secs(15), || r.connected()).await;
    let lever = pause("not stored");
    let answer = raw_lever(&h, &lever).await;
    assert_eq!(answer.request_id, lever.request_id());
    assert!(!answer.accepted, "{answer:?}");
    let why = answer.refusal.unwrap_or_default();
    assert!(why.contains("stored control state does not show"), "{why}");
    assert_eq!(answer.state.mode, Mode::Running);
    assert_eq!(r.mode(), Mode::Running, "a lever alone paused the replica");
    h.send(&check("after-raw-lever")).await;
    assert_eq!(h.result("after-raw-lever").await.status, Status::Success);
    // Stored first (as the CLI does), the same lever is answered once the replica enforces it.
    let report = h.operator().run(pause("stored")).await.unwrap();
    assert!(report.replicas.iter().all(|a| a.accepted), "{report:?}");
    assert_eq!(r.mode(), Mode::Paused);
    r.stop().await;
}

#[tokio::test]
async fn a_control_message_from_a_non_operator_is_refused_and_alerted() {
    let h = Harness::start(Options {
        start_poller: false,
        ..Default::default()
    })
    .await;
    let r = h.spawn_replica("x", None);
    eventually("connected", Duration::from_secs(15), || r.connected()).await;
    h.operator().run(pause("investigating")).await.unwrap();
    let agent = tokio::task::spawn_blocking(BrokerUser::create)
        .await
        .unwrap();
    // The agent tries to resume the paused poller with a well-formed control message.
    let body = serde_json::to_vec(&resume(true)).unwrap();
    publish_control(&h, &agent.url(), &agent.0, "control.resume", &body).await;
    let alert = h
        .wait_until("security alert", Duration::from_secs(10), |i| {
            i.alerts
                .iter()
                .find(|(_, a)| a.summary.contains("Refused a control message"))
                .cloned()
        })
        .await;
    assert_eq!(alert.0.routing_key, "security.high");
    assert!(alert.1.summary.contains(&agent.0), "{}", alert.1.summary);
    assert!(alert.1.summary.contains("not an operator"));
    assert_eq!(r.mode(), Mode::Paused, "an agent resumed the poller");
    // The CLI as that user is refused too, before anything is sent.
    let s = h.settings.clone();
    let url = agent.url();
    let op = command_poller::control::operator::Operator::new(
        &s,
        &node(&url),
        Duration::from_millis(500),
    );
    assert!(op.run(resume(false)).await.is_err());
    assert_eq!(r.mode(), Mode::Paused);
    r.stop().await;
}

#[tokio::test]
async fn the_automatic_trip_fires_on_the_nth_unapproved_refresh_and_not_before() {
    let h = Harness::start(Options {
        start_poller: false,
        ..Default::default()
    })
    .await;
    let r1 = h.spawn_replica("t1", None);
    let r2 = h.spawn_replica("t2", None);
    both_ready(&r1, &r2).await;
    // salesforce is not an approved integration: every refresh is NEEDS_APPROVAL.
    for i in 1..=2 {
        let id = format!("trip-{i}");
        h.send(&cmd(&id, "REFRESH_TOKEN", "salesforce", "MEDIUM"))
            .await;
        assert_eq!(h.result(&id).await.status, Status::NeedsApproval);
    }
    settle().await;
    assert_eq!(
        (r1.mode(), r2.mode()),
        (Mode::Running, Mode::Running),
        "tripped before the third attempt"
    );
    h.send(&cmd("trip-3", "REFRESH_TOKEN", "salesforce", "MEDIUM"))
        .await;
    assert_eq!(h.result("trip-3").await.status, Status::NeedsApproval);
    eventually("both replicas paused", Duration::from_secs(10), || {
        r1.mode() == Mode::Paused && r2.mode() == Mode::Paused
    })
    .await;
    let alert = h
        .wait_until("trip alert", Duration::from_secs(10), |i| {
            i.alerts
                .iter()
                .find(|(_, a)| a.summary.contains("paused automatically"))
                .cloned()
        })
        .await;
    assert_eq!(alert.0.routing_key, "security.high");
    for needle in ["agent guest", "trip-1", "trip-2", "trip-3", "REFRESH_TOKEN"] {
        assert!(
            alert.1.summary.contains(needle),
            "{needle} missing from: {}",
            alert.1.summary
        );
    }
    // Exactly one replica tripped, so one alert.
    settle().await;
    let trips = h
        .inbox
        .lock()
        .unwrap()
        .alerts
        .iter()
        .filter(|(_, a)| a.summary.contains("paused automatically"))
        .count();
    assert_eq!(trips, 1);
    // Recorded: the stored state says why, and new commands wait.
    let status = h.status().await;
    let stored = status.stored_state.unwrap();
    assert_eq!(stored.mode, Mode::Paused);
    assert!(
        stored.reason.contains("automatic trip"),
        "{}",
        stored.reason
    );
    h.send(&check("after-trip-1")).await;
    settle().await;
    assert_eq!(h.results_for("after-trip-1"), 0);
    assert_eq!(h.queue_depth().await, 1);

    // Re-armed: after the operator resumes, three more unapproved attempts in the same window
    // trip again (the old wire tripped only at exactly the Nth and never after).
    h.operator().run(resume(false)).await.unwrap();
    assert_eq!(h.result("after-trip-1").await.status, Status::Success);
    for i in 4..=6 {
        let id = format!("trip-{i}");
        h.send(&cmd(&id, "REFRESH_TOKEN", "salesforce", "MEDIUM"))
            .await;
        assert_eq!(h.result(&id).await.status, Status::NeedsApproval);
    }
    eventually(
        "both replicas paused again",
        Duration::from_secs(10),
        || r1.mode() == Mode::Paused && r2.mode() == Mode::Paused,
    )
    .await;
    h.wait_until("a second trip alert", Duration::from_secs(10), |i| {
        let n = i
            .alerts
            .iter()
            .filter(|(_, a)| a.summary.contains("paused automatically"))
            .count();
        (n == 2).then_some(())
    })
    .await;
    r1.stop().await;
    r2.stop().await;
}

#[tokio::test]
async fn a_halt_during_bridge_retries_stops_the_next_post() {
    // The bridge fails with 503 (retryable) over and over: the command sits in the client's
    // retry loop. The gate used to be asked once, before the first POST, so an action could run
    // seconds after its replica acknowledged a HALT.
    let h = Harness::start(Options {
        tweak: Box::new(|s| {
            s.bridge.min_backoff = Duration::from_millis(100);
            s.bridge.max_backoff = Duration::from_millis(200);
            s.bridge.retry_budget = Duration::from_secs(30);
        }),
        ..Default::default()
    })
    .await;
    h.sim.fail_next_posts(
        std::iter::repeat_n(
            command_poller::bridge::simulator::Fault::Status { code: 503 },
            1000,
        )
        .collect::<Vec<_>>(),
    );
    h.send(&check("halt-retry-1")).await;
    eventually("two failed POSTs", Duration::from_secs(10), || {
        h.sim.posts("halt-retry-1") >= 2
    })
    .await;
    let ack = h
        .operator()
        .run(ControlCommand::Halt {
            reason: "E02 drill".into(),
            request_id: new_request_id(),
        })
        .await
        .unwrap();
    assert!(ack.replicas.iter().all(|r| r.accepted), "{ack:?}");
    let acked_at_ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as u64 / 1_000_000;
    let posts_at_ack = h.sim.posts("halt-retry-1");
    // The command goes back to the queue, unfinished and unexecuted; no result is published.
    eventually("in flight drops to 0", Duration::from_secs(10), || {
        h.poller_state
            .in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
            == 0
    })
    .await;
    assert_eq!(h.queue_depth().await, 1);
    let calls = h.sim.calls();
    assert!(
        h.sim.posts("halt-retry-1") <= posts_at_ack + 1
            && calls.last_post_at_ms <= acked_at_ms + 5,
        "a POST after the halt was acknowledged: {} POSTs at the ack, {} now; last POST at {} ms, ack at {} ms",
        posts_at_ack,
        h.sim.posts("halt-retry-1"),
        calls.last_post_at_ms,
        acked_at_ms
    );
    assert_eq!(h.sim.executions("halt-retry-1"), 0);
    assert_eq!(h.results_for("halt-retry-1"), 0);
}

fn halt(reason: &str) -> ControlCommand {
    ControlCommand::Halt {
        reason: reason.into(),
        request_id: new_request_id(),
    }
}

#[tokio::test]
async fn a_replica_started_while_someone_holds_the_stored_state_still_comes_up_halted() {
    // Finding 3: every reader did get-then-requeue on a length-1 queue, so a replica starting
    // while another reader held the message (an operator user can hold it on purpose) read an
    // empty queue as RUNNING and executed commands during a HALT.
    let h = Harness::start(Options {
        start_poller: false,
        ..Default::default()
    })
    .await;
    h.operator().run(halt("E02: policy bypass")).await.unwrap();
    // Someone consumes the stored state and never acks what they got.
    let holder = lapin::Connection::connect(AMQP, Default::default())
        .await
        .unwrap();
    let ch = holder.create_channel().await.unwrap();
    ch.basic_qos(10, Default::default()).await.unwrap();
    let _held = ch
        .basic_consume(
            h.settings.control.state_queue.as_str().into(),
            "holder".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    settle().await;
    let r = h.spawn_replica("while-held", None);
    eventually("the replica to connect", Duration::from_secs(15), || {
        r.connected()
    })
    .await;
    assert_eq!(r.mode(), Mode::Halted);
    h.send(&check("during-halt-1")).await;
    settle().await;
    assert_eq!(h.results_for("during-halt-1"), 0);
    assert_eq!(h.queue_depth().await, 1);
    let _ = holder.close(200, "done".into()).await;
    r.stop().await;
}

#[tokio::test]
async fn an_unreadable_stored_state_brings_a_replica_up_paused_and_alerts() {
    let h = Harness::start(Options {
        start_poller: false,
        ..Default::default()
    })
    .await;
    // An operator's tooling writes garbage into the state stream.
    append_state(&h, b"{\"kind\":\"state\",\"oops\":1}").await;
    let r = h.spawn_replica("garbage", None);
    eventually("the replica to connect", Duration::from_secs(15), || {
        r.connected()
    })
    .await;
    assert_eq!(r.mode(), Mode::Paused);
    let alert = h
        .wait_until("the fail-closed alert", Duration::from_secs(10), |i| {
            i.alerts
                .iter()
                .find(|(_, a)| a.summary.contains("untrusted"))
                .cloned()
        })
        .await;
    assert_eq!(alert.0.routing_key, "security.high");
    h.send(&check("while-untrusted-1")).await;
    settle().await;
    assert_eq!(h.results_for("while-untrusted-1"), 0);
    // An operator decides: the replica follows.
    h.operator().run(resume(false)).await.unwrap();
    assert_eq!(h.result("while-untrusted-1").await.status, Status::Success);
    assert_eq!(r.mode(), Mode::Running);
    r.stop().await;
}

#[tokio::test]
async fn a_pause_decided_before_a_halt_never_downgrades_it() {
    // Low finding: a trip's PAUSED written just after an operator's HALTED replaced it (last
    // writer wins), and a plain `resume` then lifted the halt.
    let h = Harness::start(Options::default()).await;
    let before = h.status().await;
    let base = before.stored_state.map_or(0, |s| s.seq);
    h.operator().run(halt("E02")).await.unwrap();
    // The stale pause, decided on the state before the halt.
    let stale = command_poller::control::state_log::Entry {
        after: None,
        change: command_poller::control::state_log::Change::Mode { base },
        state: command_poller::control::ControlState {
            mode: Mode::Paused,
            reason: "automatic trip".into(),
            seq: base + 1,
            ..command_poller::control::ControlState::initial()
        },
    };
    append_state(&h, &serde_json::to_vec(&stale).unwrap()).await;
    let status = h.status().await;
    assert_eq!(status.stored_state.unwrap().mode, Mode::Halted);
    assert!(status.replicas.iter().all(|r| r.state.mode == Mode::Halted));
    let e = h.operator().run(resume(false)).await.unwrap_err();
    assert!(e.to_string().contains("lift-halt"), "{e}");
}

/// The supervisor's one health view: every component the replica hosts is reported, the
/// consumer says it waits while paused, and an orderly stop reports each one stopped.
#[tokio::test]
async fn one_view_reports_every_component_and_follows_a_pause_and_the_stop() {
    use command_poller::settle::state::{Component, Health};
    let mut h = Harness::start(Options::default()).await;
    let components = h.poller_state.components.clone();
    let hosted = [
        Component::Consumer,
        Component::ControlReplica,
        Component::ApprovalDesk,
        Component::ApprovalSweeper,
        Component::StoreProbe,
    ];
    eventually("every component running", Duration::from_secs(15), || {
        let v = components.snapshot();
        hosted.iter().all(|c| v.get(c) == Some(&Health::Running))
    })
    .await;
    h.operator().run(pause("view drill")).await.unwrap();
    eventually("the consumer waiting", Duration::from_secs(10), || {
        matches!(
            components.snapshot().get(&Component::Consumer),
            Some(Health::Waiting { why }) if why.contains("paused")
        )
    })
    .await;
    // The rest keep running while paused (the desk takes approvals, the sweeper sweeps).
    let v = components.snapshot();
    assert_eq!(v[&Component::ApprovalDesk], Health::Running);
    assert_eq!(v[&Component::ControlReplica], Health::Running);
    h.stop().await;
    let v = components.snapshot();
    for c in hosted {
        assert_eq!(v.get(&c), Some(&Health::Stopped), "{c:?}: {v:?}");
    }
}
