//! Scoped grants on the real broker and a shared Redis: a grant lets an agent's refreshes the
//! judges don't approve through, at most N times for the whole fleet, and nothing else: not
//! before a second operator puts it in force, not for another agent, service or type, not past a
//! rule judge's veto, not after it expires or is withdrawn, never for CONNECT_INTEGRATION.

use crate::common::*;
use command_poller::approval::approver::Approver;
use command_poller::approval::wire::{Reply, Request};
use command_poller::control::operator::{new_request_id, Operator};
use command_poller::control::{ControlCommand, Grant};
use command_poller::intake::CommandType;
use command_poller::judging::rules::{RuleJudge, RuleSet};
use command_poller::judging::{Judge, Panel};
use command_poller::outcome::{ResultMessage, Status};
use command_poller::store::Backend;
use std::sync::Arc;
use std::time::Duration;

fn grant(agent: &str, t: CommandType, service: &str, uses: u32, for_secs: u64) -> ControlCommand {
    ControlCommand::Grant {
        agent: agent.into(),
        command_type: t,
        service: service.into(),
        uses,
        for_secs,
        reason: "routine weekly refreshes, CHG-7".into(),
        request_id: new_request_id(),
    }
}

fn ungrant(id: &str) -> ControlCommand {
    ControlCommand::Ungrant {
        grant: id.into(),
        reason: "the change window closed".into(),
        request_id: new_request_id(),
    }
}

/// A rule judge (it vetoes `denied`) and a model that never approves: nothing is approved by
/// the judges, and only `denied` is vetoed.
fn panel(windows: Arc<dyn command_poller::store::RateWindows>, denied: &str) -> Panel {
    let rules = RuleSet {
        denied_agents: vec![denied.to_owned()],
        ..Default::default()
    };
    let judges: Vec<(Arc<dyn Judge>, Duration)> = vec![
        (
            Arc::new(RuleJudge::new("compliance", rules, windows)),
            Duration::from_secs(2),
        ),
        (
            Arc::new(command_poller::testing::ScriptedJudge::new(
                "small-model",
                command_poller::testing::Script::Deny,
                Duration::ZERO,
            )),
            Duration::from_secs(2),
        ),
    ];
    Panel::new(judges, 2)
}

/// Two replicas, each with its own connections to one Redis (the grants' uses counted there),
/// `approvals` operators to loosen (guest and, for two, bob).
async fn fleet(
    approvals: usize,
    denied: &str,
) -> (Harness, Vec<ReplicaHandle>, Option<BrokerUser>) {
    let bob = if approvals > 1 {
        Some(
            tokio::task::spawn_blocking(BrokerUser::create)
                .await
                .unwrap(),
        )
    } else {
        None
    };
    let bob_name = bob.as_ref().map(|b| b.0.clone());
    let prefix = format!("grants-{}", suffix());
    let h = Harness::start(Options {
        start_poller: false,
        tweak: Box::new(move |s| {
            s.idempotency.backend = Backend::Redis;
            s.idempotency.url = REDIS.into();
            s.idempotency.key_prefix = prefix;
            s.secrets.store_key = Some(command_poller::bridge::signing::Secret::new(String::from(
                "grants-test-store-key-with-enough-bytes",
            )));
            // One broker user sends everything here: the trips would pause the fleet.
            s.control.trips.clear();
            s.control.operators.extend(bob_name);
            s.control.loosening_approvals = approvals;
        }),
        ..Default::default()
    })
    .await;
    let mut replicas = Vec::new();
    for name in ["g1", "g2"] {
        let stores = command_poller::store::open_all(&h.settings.idempotency)
            .await
            .expect("redis opens");
        let p = panel(stores.windows.clone(), denied);
        replicas.push(h.spawn_replica_with(name, Some(p), stores));
    }
    eventually("both replicas connected", Duration::from_secs(15), || {
        replicas.iter().all(|r| r.connected())
    })
    .await;
    (h, replicas, bob)
}

async fn list(h: &Harness) -> Reply {
    Approver {
        settings: &h.settings.approval,
        endpoints: node(AMQP),
        wait: Duration::from_secs(10),
    }
    .send(&Request::List)
    .await
    .expect("a replica answers")
}

fn refresh(id: &str, service: &str) -> serde_json::Value {
    cmd(id, "REFRESH_TOKEN", service, "MEDIUM")
}

fn needs_approval(r: &ResultMessage) {
    assert_eq!(r.status, Status::NeedsApproval, "{r:?}");
    assert!(r.grant.is_none(), "{r:?}");
}

#[tokio::test]
async fn a_grant_lets_through_at_most_its_uses_across_two_replicas_and_only_its_scope() {
    let (h, replicas, bob) = fleet(2, "nobody").await;
    let bob = bob.unwrap();
    let guest = h.operator();
    let s = h.settings.clone();
    let bob_op = Operator::new(&s, &node(&bob.url()), Duration::from_millis(1500));

    // Never for CONNECT_INTEGRATION: refused before anything is stored.
    let e = guest
        .run(grant(
            "guest",
            CommandType::ConnectIntegration,
            "google",
            1,
            600,
        ))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("never for CONNECT_INTEGRATION"), "{e}");

    // Proposed: parked until another operator seconds it; nothing is let through meanwhile.
    let lever = grant("guest", CommandType::RefreshToken, "google", 3, 600);
    let id = lever.request_id().to_owned();
    let report = guest.run(lever).await.unwrap();
    let p = report.stored_state.as_ref().unwrap().proposals[&id].clone();
    assert!(report.stored_state.as_ref().unwrap().grants.is_empty());
    h.send(&refresh("before-second", "google")).await;
    needs_approval(&h.result("before-second").await);
    let listed = list(&h).await;
    assert!(
        listed
            .grants
            .iter()
            .any(|g| g.grant_id == id && g.state == "proposed"),
        "{listed:?}"
    );
    let second = |by: &str| ControlCommand::Second {
        proposal: id.clone(),
        digest: p.digest.clone(),
        reason: format!("{by} read CHG-7"),
        request_id: new_request_id(),
    };
    let own = guest.run(second("guest")).await.unwrap_err().to_string();
    assert!(own.contains("proposer can't second"), "{own}");
    let report = bob_op.run(second("bob")).await.unwrap();
    assert!(report.replicas.iter().all(|r| r.accepted), "{report:?}");
    let g: Grant = report.stored_state.unwrap().grants[&id].clone();
    assert_eq!((g.uses, g.by.as_str()), (3, "guest"));
    assert!(g.seconded_by.contains(&bob.0));
    h.wait_until("the grant's alert", Duration::from_secs(10), |i| {
        i.alerts
            .iter()
            .any(|(_, a)| a.summary.contains(&format!("Grant {id} in force")))
            .then_some(())
    })
    .await;

    // Eight refreshes at once, taken by both replicas: exactly three go through.
    const SENT: usize = 8;
    for i in 0..SENT {
        h.send(&refresh(&format!("rt-{i}"), "google")).await;
    }
    let mut through = Vec::new();
    let mut instances = std::collections::BTreeSet::new();
    for i in 0..SENT {
        let aid = format!("rt-{i}");
        let r = h.result(&aid).await;
        instances.insert(r.poller_instance.clone());
        match r.status {
            Status::Success => {
                let used = r.grant.clone().expect("a success here is the grant's");
                assert_eq!(used.grant_id, id);
                assert!(
                    r.rationale.contains("Let through by grant"),
                    "{}",
                    r.rationale
                );
                assert!(r.rationale.contains(&bob.0), "{}", r.rationale);
                assert_eq!(h.sim.executions(&aid), 1);
                through.push(used.use_no);
            }
            Status::NeedsApproval => {
                assert!(r.rationale.contains("used up"), "{}", r.rationale);
                assert_eq!(h.sim.executions(&aid), 0, "{aid} was executed");
            }
            other => panic!("{aid}: {other:?}"),
        }
    }
    through.sort_unstable();
    assert_eq!(through, vec![1, 2, 3], "the uses, counted for the fleet");
    assert_eq!(
        instances.len(),
        2,
        "both replicas took commands: {instances:?}"
    );

    // Its scope and nothing else: another service, another type, another agent.
    h.send(&refresh("other-service", "meta")).await;
    needs_approval(&h.result("other-service").await);
    let other = tokio::task::spawn_blocking(BrokerUser::create)
        .await
        .unwrap();
    other.send(&h, &refresh("other-agent", "google")).await;
    needs_approval(&h.result_of(&other.0, "other-agent").await);

    let listed = list(&h).await;
    let shown = listed
        .grants
        .iter()
        .find(|g| g.grant_id == id)
        .expect("listed");
    assert_eq!(
        (shown.state.as_str(), shown.used, shown.uses),
        ("in_force", Some(3), 3)
    );
    for r in replicas {
        r.stop().await;
    }
}

#[tokio::test]
async fn a_grant_never_passes_a_veto_nor_its_expiry_nor_its_withdrawal() {
    let vetoed = tokio::task::spawn_blocking(BrokerUser::create)
        .await
        .unwrap();
    let (h, replicas, _) = fleet(1, &vetoed.0).await;
    let op = h.operator();

    // A rule judge's veto stands, whatever a grant says.
    op.run(grant(
        &vetoed.0,
        CommandType::RefreshToken,
        "google",
        10,
        600,
    ))
    .await
    .unwrap();
    vetoed.send(&h, &refresh("vetoed-1", "google")).await;
    let r = h.result_of(&vetoed.0, "vetoed-1").await;
    needs_approval(&r);
    assert!(
        r.rationale.contains("never overrides the hard rules"),
        "{}",
        r.rationale
    );
    assert!(
        r.rationale.contains("compliance vetoed (denied_agents)"),
        "{}",
        r.rationale
    );
    assert_eq!(h.sim.executions("vetoed-1"), 0);

    // Withdrawn: its next use is refused.
    let lever = grant("guest", CommandType::RefreshToken, "google", 10, 600);
    let id = lever.request_id().to_owned();
    op.run(lever).await.unwrap();
    h.send(&refresh("while-granted", "google")).await;
    assert_eq!(h.result("while-granted").await.status, Status::Success);
    let report = op.run(ungrant(&id)).await.unwrap();
    assert!(report.replicas.iter().all(|r| r.accepted), "{report:?}");
    h.send(&refresh("after-withdrawal", "google")).await;
    needs_approval(&h.result("after-withdrawal").await);
    let e = op.run(ungrant(&id)).await.unwrap_err().to_string();
    assert!(e.contains("no grant"), "{e}");

    // Expired: written by an operator straight into the stream with a short life (the CLI's
    // shortest is a minute), then waited out by the clock.
    let now = command_poller::clock::unix_now();
    let short = Grant {
        agent: "guest".into(),
        command_type: CommandType::RefreshToken,
        service: "google".into(),
        uses: 10,
        from: now,
        // Long enough for the command sent within it to be decided within it on a loaded
        // machine (3 s was not: a CI run with both cores busy decided it after the end).
        until: now + SHORT_LIFE_SECS,
        reason: "a short one".into(),
        by: "guest".into(),
        seconded_by: Default::default(),
    };
    let lever = ControlCommand::Grant {
        agent: "guest".into(),
        command_type: CommandType::RefreshToken,
        service: "google".into(),
        uses: 10,
        for_secs: 60,
        reason: "a short one".into(),
        request_id: "short-grant".into(),
    };
    write_grant(&h, "short-grant", short.clone()).await;
    let shown = op.run(lever).await.unwrap();
    assert!(shown.replicas.iter().all(|r| r.accepted), "{shown:?}");
    h.send(&refresh("within-its-life", "google")).await;
    let r = h.result("within-its-life").await;
    assert_eq!(r.status, Status::Success, "{r:?}");
    eventually(
        "the grant's end",
        Duration::from_secs(SHORT_LIFE_SECS + 10),
        || command_poller::clock::unix_now() >= short.until,
    )
    .await;
    h.send(&refresh("after-expiry", "google")).await;
    needs_approval(&h.result("after-expiry").await);
    for r in replicas {
        r.stop().await;
    }
}

/// The life of the grant that expires within the test.
const SHORT_LIFE_SECS: u64 = 15;

/// Writes grant `id` into the state stream as the operator guest (where one operator may
/// grant), as a hand-made client would.
async fn write_grant(h: &Harness, id: &str, g: Grant) {
    use command_poller::control::state_log::{self, Change};
    let (mut state, after) = crate::loosening_e2e::stored(h).await;
    let conn = lapin::Connection::connect(AMQP, Default::default())
        .await
        .unwrap();
    state.grants.insert(id.to_owned(), g.clone());
    let publisher = command_poller::broker::Publisher::open(&conn)
        .await
        .unwrap();
    let change = Change::Grant {
        id: id.to_owned(),
        grant: Some(g),
    };
    state_log::write(
        &publisher,
        &h.settings.control,
        after,
        change,
        &state,
        "guest",
    )
    .await
    .unwrap();
    let _ = conn.close(200, "ok".into()).await;
}

/// A grant withdrawn while a command it let through is in the bridge client's retry loop stops
/// its next POST; the command goes back to the queue, and its redelivery, judged again without
/// the grant, waits for approvers.
#[tokio::test]
async fn a_withdrawal_during_a_granted_commands_retries_stops_its_next_post() {
    let lever = grant("guest", CommandType::RefreshToken, "google", 5, 600);
    let id = lever.request_id().to_owned();
    let h = crate::cuts_e2e::stuck_in_retries_after(
        &refresh("granted-retry-1", "google"),
        Some(panel(
            Arc::new(command_poller::store::local::MemWindows::default()),
            "nobody",
        )),
        Some(lever),
    )
    .await;
    let ack = h.operator().run(ungrant(&id)).await.unwrap();
    assert!(ack.replicas.iter().all(|r| r.accepted), "{ack:?}");
    let posts_at_ack = h.sim.posts("granted-retry-1");
    crate::cuts_e2e::bridge_back_once_asked(&h, "granted-retry-1").await;
    let r = h.result("granted-retry-1").await;
    needs_approval(&r);
    assert!(
        h.sim.posts("granted-retry-1") <= posts_at_ack + 1,
        "a POST after the withdrawal was acknowledged: {posts_at_ack} at the ack, {} now",
        h.sim.posts("granted-retry-1")
    );
    assert_eq!(h.sim.executions("granted-retry-1"), 0);
}
