//! The guarantees under attack: what a hostile or buggy agent, a careless operator or bad luck
//! would try, each against the real broker, the real poller and the bridge simulator. Each
//! test names the finding it closes (docs/RELIABILITY.md, "Hostile inputs and abuse").

use crate::common::*;
use command_poller::outcome::Status;

/// Finding 1a: agent B plants a status check under the id agent A is about to use for a token
/// refresh. A's refresh used to be answered SUCCESS with B's cached status check, and the
/// token endpoint was never called.
#[tokio::test]
async fn another_agents_id_never_answers_this_agents_action() {
    let h = Harness::start(Options::default()).await;
    let b = BrokerUser::create();
    let id = "token-refresh-google-456";
    b.send(&h, &cmd(id, "CHECK_INTEGRATION_STATUS", "google", "LOW"))
        .await;
    let rb = h.result_of(&b.0, id).await;
    assert_eq!(rb.status, Status::Success);
    assert_eq!(
        rb.tool_result.as_ref().unwrap()["integration_status"],
        "CONNECTED"
    );
    h.send(&cmd(id, "REFRESH_TOKEN", "google", "MEDIUM")).await;
    let ra = h.result_of("guest", id).await;
    assert_eq!(ra.status, Status::Success, "{ra:?}");
    assert_eq!(
        ra.tool_result.as_ref().unwrap()["message"],
        "Token for google refreshed successfully.",
        "A got another request's answer: {ra:?}"
    );
    assert_eq!(h.sim.executions(id), 2, "both actions ran, each once");
}

/// Finding 1b: B plants a non-retryable bridge error under A's id, so that A's action fails.
#[tokio::test]
async fn another_agent_cant_plant_a_failure_under_this_agents_id() {
    let h = Harness::start(Options::default()).await;
    let b = BrokerUser::create();
    let id = "refresh-planted-1";
    // ALLOW goes straight to the bridge, which refuses an unconfigured service for good.
    b.send(
        &h,
        &cmd(id, "CHECK_INTEGRATION_STATUS", "salesforce", "LOW"),
    )
    .await;
    assert_eq!(h.result_of(&b.0, id).await.status, Status::Failed);
    h.send(&cmd(id, "REFRESH_TOKEN", "google", "MEDIUM")).await;
    let ra = h.result_of("guest", id).await;
    assert_eq!(ra.status, Status::Success, "{ra:?}");
}

/// Finding 1c: B reuses an id A already ran, to read A's bridge answer without acting.
#[tokio::test]
async fn another_agent_cant_read_this_agents_bridge_answer() {
    let h = Harness::start(Options::default()).await;
    let b = BrokerUser::create();
    let id = "status-read-1";
    h.send(&cmd(id, "CHECK_INTEGRATION_STATUS", "meta", "LOW"))
        .await;
    let ra = h.result_of("guest", id).await;
    assert_eq!(ra.status, Status::Success);
    b.send(&h, &cmd(id, "CHECK_INTEGRATION_STATUS", "meta", "LOW"))
        .await;
    let rb = h.result_of(&b.0, id).await;
    assert_eq!(rb.status, Status::Success);
    assert!(!rb.replay, "B's command is its own, not a replay of A's");
    assert_eq!(
        h.sim.executions(id),
        2,
        "B's request was executed for B, not answered from A's"
    );
}

/// Low finding: the same agent reuses an action_id for a different command. The stored result
/// of the first used to be replayed as SUCCESS for the second.
#[tokio::test]
async fn a_reused_id_with_a_different_command_is_rejected_naming_the_reuse() {
    let h = Harness::start(Options::default()).await;
    let id = "reused-1";
    h.send(&cmd(id, "CHECK_INTEGRATION_STATUS", "google", "LOW"))
        .await;
    assert_eq!(h.result(id).await.status, Status::Success);
    h.send(&cmd(id, "REFRESH_TOKEN", "google", "MEDIUM")).await;
    let second = h
        .wait_until(
            "the second result",
            std::time::Duration::from_secs(20),
            |i| {
                i.results
                    .iter()
                    .filter(|(_, r)| r.action_id.as_deref() == Some(id))
                    .nth(1)
                    .map(|(_, r)| r.clone())
            },
        )
        .await;
    assert_eq!(second.status, Status::Rejected, "{second:?}");
    assert_eq!(second.error_field.as_deref(), Some("action_id"));
    assert!(
        second.rationale.contains("already used") && second.rationale.contains("different command"),
        "{}",
        second.rationale
    );
    assert_eq!(
        h.sim.executions(id),
        1,
        "the refresh never reached the bridge"
    );
    // The same command again is still a plain replay.
    h.send(&cmd(id, "CHECK_INTEGRATION_STATUS", "google", "LOW"))
        .await;
    let third = h
        .wait_until(
            "the third result",
            std::time::Duration::from_secs(20),
            |i| {
                i.results
                    .iter()
                    .filter(|(_, r)| r.action_id.as_deref() == Some(id))
                    .nth(2)
                    .map(|(_, r)| r.clone())
            },
        )
        .await;
    assert_eq!(third.status, Status::Success);
    assert!(third.replay);
}

/// Finding 11: with `allow_unverified_agents` on, a claimed `agent_id` shared the verified
/// agent's key space: an unverified sender read a verified agent's stored results and pre-empted
/// its ids, and refreshes under invented names passed 2 of 3 although security denied.
#[tokio::test]
async fn unverified_agents_are_kept_apart() {
    let h = Harness::start(Options {
        tweak: Box::new(|s| s.intake.allow_unverified_agents = true),
        ..Default::default()
    })
    .await;
    let id = "kept-apart-1";
    // The verified agent (guest) runs a check; an unverified sender claiming "guest" sends the
    // same id and gets its own, separate action, not guest's stored result.
    h.send(&cmd(id, "CHECK_INTEGRATION_STATUS", "google", "LOW"))
        .await;
    assert_eq!(h.result(id).await.status, Status::Success);
    let mut claimed = cmd(id, "CHECK_INTEGRATION_STATUS", "google", "LOW");
    claimed["agent_id"] = "guest".into();
    h.publish(
        claimed.to_string().as_bytes(),
        lapin::BasicProperties::default().with_content_type("application/json".into()),
    )
    .await;
    let second = h
        .wait_until(
            "the unverified result",
            std::time::Duration::from_secs(20),
            |i| {
                i.results
                    .iter()
                    .find(|(_, r)| {
                        r.action_id.as_deref() == Some(id)
                            && r.agent.as_ref().is_some_and(|a| !a.verified)
                    })
                    .map(|(_, r)| r.clone())
            },
        )
        .await;
    assert!(
        !second.replay,
        "read the verified agent's stored result: {second:?}"
    );
    assert_eq!(h.sim.executions(id), 2);

    // Pre-empting: an unverified sender goes first with a refresh under the verified agent's
    // next id; the verified agent's refresh still runs as its own.
    let next = "kept-apart-2";
    let mut pre = cmd(next, "REFRESH_TOKEN", "google", "MEDIUM");
    pre["agent_id"] = "guest".into();
    h.publish(
        pre.to_string().as_bytes(),
        lapin::BasicProperties::default().with_content_type("application/json".into()),
    )
    .await;
    let r = h.result(next).await;
    // "Unverified" vetoes REFRESH_TOKEN (the security judge's require_verified_agent).
    assert_eq!(r.status, Status::NeedsApproval, "{r:?}");
    assert!(
        r.rationale.contains("require_verified_agent"),
        "{}",
        r.rationale
    );
    h.send(&cmd(next, "REFRESH_TOKEN", "google", "MEDIUM"))
        .await;
    let verified = h
        .wait_until(
            "the verified refresh",
            std::time::Duration::from_secs(20),
            |i| {
                i.results
                    .iter()
                    .find(|(_, r)| {
                        r.action_id.as_deref() == Some(next)
                            && r.agent.as_ref().is_some_and(|a| a.verified)
                    })
                    .map(|(_, r)| r.clone())
            },
        )
        .await;
    assert_eq!(verified.status, Status::Success, "{verified:?}");
    assert!(!verified.replay);
}

/// Finding 12: with the audit queue gone (the audit-sink user could delete it), every command
/// produced 6 results and 6 alerts and was then dead-lettered, and a HALT's shut-off alerts were
/// never sent: alerts waited on the audit publish.
#[tokio::test]
async fn alerts_and_results_dont_wait_on_the_audit() {
    use command_poller::control::{operator::new_request_id, ControlCommand};
    use lapin::options::QueueDeleteOptions;
    let h = Harness::start(Options::default()).await;
    // After the poller declared its topology, so the queue stays gone.
    eventually(
        "the poller connected",
        std::time::Duration::from_secs(15),
        || {
            h.poller_state
                .connected
                .load(std::sync::atomic::Ordering::SeqCst)
        },
    )
    .await;
    let ch = h.agent_conn.create_channel().await.unwrap();
    ch.queue_delete(
        h.settings.audit.queue.as_str().into(),
        QueueDeleteOptions::default(),
    )
    .await
    .unwrap();
    h.send(&cmd(
        "connect-no-audit",
        "CONNECT_INTEGRATION",
        "salesforce",
        "HIGH",
    ))
    .await;
    assert_eq!(h.result("connect-no-audit").await.status, Status::Blocked);
    // Its audit record is dead-lettered on its own, with the reason.
    let dead = h
        .wait_until(
            "the audit record dead-lettered",
            std::time::Duration::from_secs(10),
            |i| {
                i.dead
                    .iter()
                    .find(|d| {
                        d.header("x-poller-reason")
                            .is_some_and(|r| r.contains("audit record"))
                    })
                    .cloned()
            },
        )
        .await;
    let record: serde_json::Value = serde_json::from_slice(&dead.body).unwrap();
    assert_eq!(record["action_id"], "connect-no-audit");
    h.send(&cmd(
        "check-no-audit",
        "CHECK_INTEGRATION_STATUS",
        "google",
        "LOW",
    ))
    .await;
    assert_eq!(h.result("check-no-audit").await.status, Status::Success);
    settle().await;
    assert_eq!(h.results_for("connect-no-audit"), 1);
    assert_eq!(
        h.alerts_for("connect-no-audit").len(),
        2,
        "security and engineering, once"
    );
    assert_eq!(h.results_for("check-no-audit"), 1);
    assert!(
        h.inbox
            .lock()
            .unwrap()
            .dead
            .iter()
            .all(|d| d.header("x-poller-reason").is_some()),
        "no command was dead-lettered by the delivery limit"
    );
    // A halt's shut-off alerts go out although its audit record can't.
    h.operator()
        .run(ControlCommand::Halt {
            reason: "E02 drill without an audit queue".into(),
            request_id: new_request_id(),
        })
        .await
        .unwrap();
    h.wait_until(
        "both shut-off alerts",
        std::time::Duration::from_secs(10),
        |i| {
            let n = i
                .alerts
                .iter()
                .filter(|(_, a)| a.summary.contains("MASTER SHUT-OFF"))
                .count();
            (n == 2).then_some(())
        },
    )
    .await;
}

/// Finding 8: `reject-publish` without a length limit never refused anything, so one agent's
/// flood grew until the broker's memory alarm blocked every publisher, the operator's `halt`
/// included. Now the commands queue is bounded: the flood is refused at publish time (a nack),
/// and the levers, on their own exchange and queues, still go through.
#[tokio::test]
async fn a_flood_is_refused_at_publish_and_the_levers_still_work() {
    use command_poller::control::{operator::new_request_id, ControlCommand, Mode};
    let h = Harness::start(Options {
        start_poller: false,
        tweak: Box::new(|s| {
            s.topology.max_length = 20;
            s.topology.max_length_bytes = 1_000_000;
        }),
        ..Default::default()
    })
    .await;
    let replica = h.spawn_replica("flooded", None);
    // Paused, so the flood stays queued.
    h.operator()
        .run(ControlCommand::Pause {
            reason: "flood drill".into(),
            request_id: new_request_id(),
        })
        .await
        .unwrap();
    eventually("paused", std::time::Duration::from_secs(10), || {
        replica.mode() == Mode::Paused
    })
    .await;
    let flooder = BrokerUser::create();
    let conn = lapin::Connection::connect(&flooder.url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let (mut acked, mut nacked) = (0, 0);
    for i in 0..30 {
        let body = cmd(
            &format!("flood-{i}"),
            "CHECK_INTEGRATION_STATUS",
            "google",
            "LOW",
        );
        let confirm = ch
            .basic_publish(
                h.settings.topology.commands_exchange.as_str().into(),
                "command.check_integration_status".into(),
                Default::default(),
                body.to_string().as_bytes(),
                lapin::BasicProperties::default().with_user_id(flooder.0.as_str().into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        match confirm {
            lapin::Confirmation::Ack(None) => acked += 1,
            lapin::Confirmation::Nack(_) => nacked += 1,
            other => panic!("{other:?}"),
        }
    }
    // A quorum queue applies the limit as it commits, so one publish past it can slip in.
    assert!(
        (20..=21).contains(&acked) && acked + nacked == 30,
        "the queue holds about 20 and refuses the rest: {acked} acked, {nacked} nacked"
    );
    assert_eq!(h.queue_depth().await, acked);
    // The levers go through while the commands queue is full.
    let report = h
        .operator()
        .run(ControlCommand::Halt {
            reason: "E02 during a flood".into(),
            request_id: new_request_id(),
        })
        .await
        .unwrap();
    assert!(report
        .replicas
        .iter()
        .all(|r| r.accepted && r.state.mode == Mode::Halted));
    let _ = conn.close(200, "done".into()).await;
    replica.stop().await;
}
