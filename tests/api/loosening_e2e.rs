//! Two people to loosen, on the real broker: lifting a halt and releasing a quarantined agent
//! are parked as proposals until another operator seconds them; the proposer, a wrong digest,
//! a missing post-mortem and a lone operator writing the stream by hand are all refused.

use crate::common::*;
use command_poller::control::operator::{new_request_id, Operator};
use command_poller::control::state_log::{self, Change, StateReader};
use command_poller::control::{ControlCommand, ControlState, Mode};
use command_poller::outcome::Status;
use std::time::Duration;

fn lift(post_mortem: Option<&str>) -> ControlCommand {
    ControlCommand::Resume {
        reason: "back online".into(),
        lift_halt: true,
        post_mortem: post_mortem.map(str::to_owned),
        request_id: new_request_id(),
    }
}

fn second(proposal: &str, digest: &str) -> ControlCommand {
    ControlCommand::Second {
        proposal: proposal.into(),
        digest: digest.into(),
        reason: "post-mortem read".into(),
        request_id: new_request_id(),
    }
}

/// The stored state as an operator reads it, and the offset of its last entry.
pub(crate) async fn stored(h: &Harness) -> (ControlState, Option<u64>) {
    let conn = lapin::Connection::connect(AMQP, Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let classify = command_poller::control::replica::state_writer(
        &h.settings.control.operators,
        &h.settings.poller_user(),
    );
    let reader = StateReader::open(&ch, &h.settings.control, classify)
        .await
        .unwrap();
    let read = (reader.state().effective().unwrap(), reader.position());
    reader.close().await;
    let _ = conn.close(200, "read".into()).await;
    read
}

#[tokio::test]
async fn a_lift_and_a_release_need_a_second_operator_and_nothing_else_loosens() {
    let bob = tokio::task::spawn_blocking(BrokerUser::create)
        .await
        .unwrap();
    let bob_name = bob.0.clone();
    let h = Harness::start(Options {
        start_poller: false,
        tweak: Box::new(move |s| {
            s.control.operators.push(bob_name);
            s.control.loosening_approvals = 2;
        }),
        ..Default::default()
    })
    .await;
    let r = h.spawn_replica("two", None);
    eventually("connected", Duration::from_secs(15), || r.connected()).await;
    let guest = h.operator();
    let s = h.settings.clone();
    let bob_op = Operator::new(&s, &node(&bob.url()), Duration::from_millis(1500));
    guest
        .run(ControlCommand::Halt {
            reason: "E02 drill".into(),
            request_id: new_request_id(),
        })
        .await
        .unwrap();
    eventually("halted", Duration::from_secs(10), || {
        r.mode() == Mode::Halted
    })
    .await;

    // No post-mortem: refused before anything is stored.
    let e = guest.run(lift(None)).await.unwrap_err().to_string();
    assert!(e.contains("post-mortem"), "{e}");
    // Proposed: parked, still halted.
    let proposal = lift(Some("PM-2026-12-07"));
    let report = guest.run(proposal.clone()).await.unwrap();
    let note = report.note.clone().unwrap_or_default();
    assert!(note.contains("parked as proposal"), "{report:?}");
    let id = proposal.request_id().to_owned();
    let p = report.stored_state.as_ref().unwrap().proposals[&id].clone();
    assert_eq!(p.by, "guest");
    assert!(report.replicas.iter().all(|x| x.accepted), "{report:?}");
    settle().await;
    assert_eq!(r.mode(), Mode::Halted, "a proposal lifts nothing");
    h.wait_until("the proposal's alert", Duration::from_secs(10), |i| {
        i.alerts
            .iter()
            .any(|(_, a)| {
                a.summary.contains("proposed a loosening lever") && a.summary.contains(&id)
            })
            .then_some(())
    })
    .await;

    // A lone operator writing the lift straight into the stream (as a hand-made client would):
    // the fold refuses it, and the state it wrote is not trusted.
    let (current, after) = stored(&h).await;
    let lifted = ControlState {
        mode: Mode::Running,
        seq: current.seq + 1,
        proposals: Default::default(),
        ..current.clone()
    };
    let conn = lapin::Connection::connect(AMQP, Default::default())
        .await
        .unwrap();
    let publisher = command_poller::broker::Publisher::open(&conn)
        .await
        .unwrap();
    state_log::write(
        &publisher,
        &h.settings.control,
        after,
        Change::Mode { base: current.seq },
        &lifted,
        "guest",
    )
    .await
    .unwrap();
    let _ = conn.close(200, "ok".into()).await;
    settle().await;
    assert_eq!(r.mode(), Mode::Halted, "a lone operator lifted the halt");
    h.wait_until(
        "the untrusted state's alert",
        Duration::from_secs(10),
        |i| {
            i.alerts
                .iter()
                .any(|(_, a)| a.summary.contains("loosening_approvals"))
                .then_some(())
        },
    )
    .await;

    // The proposer can't second it; a wrong digest is refused; another operator's second
    // applies it. The hand-written lift left the state untrusted: the proposal made on the
    // state before is read again from the stream and still pending.
    let (now, _) = stored(&h).await;
    assert!(now.proposals.contains_key(&id), "{now:?}");
    let e = guest
        .run(second(&id, &p.digest))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("proposer"), "{e}");
    let e = bob_op
        .run(second(&id, &"0".repeat(64)))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("digest"), "{e}");
    let done = bob_op.run(second(&id, &p.digest)).await.unwrap();
    assert!(done.note.unwrap_or_default().contains("is applied"));
    eventually("lifted by two people", Duration::from_secs(10), || {
        r.mode() == Mode::Running
    })
    .await;

    // A release too: the quarantine is instant, its release waits for a second.
    let q = ControlCommand::Quarantine {
        agent: "guest".into(),
        reason: "looping".into(),
        request_id: new_request_id(),
    };
    guest.run(q).await.unwrap();
    let release = ControlCommand::Release {
        agent: "guest".into(),
        reason: "fixed".into(),
        request_id: new_request_id(),
    };
    let parked = guest.run(release.clone()).await.unwrap();
    let rp = parked.stored_state.unwrap().proposals[release.request_id()].clone();
    h.send(&cmd(
        "still-held",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    ))
    .await;
    assert_eq!(h.result("still-held").await.status, Status::Rejected);
    bob_op
        .run(second(release.request_id(), &rp.digest))
        .await
        .unwrap();
    let (after_release, _) = stored(&h).await;
    assert!(after_release.quarantined.is_empty(), "{after_release:?}");
    h.send(&cmd(
        "released",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    ))
    .await;
    assert_eq!(h.result("released").await.status, Status::Success);
    r.stop().await;
}

/// Three people to loosen: the same operator seconding twice counts once (refused the second
/// time); a third person completes it.
#[tokio::test]
async fn the_same_operator_seconding_twice_counts_once() {
    let (bob, carol) = tokio::task::spawn_blocking(|| (BrokerUser::create(), BrokerUser::create()))
        .await
        .unwrap();
    let (b, c) = (bob.0.clone(), carol.0.clone());
    let h = Harness::start(Options {
        start_poller: false,
        tweak: Box::new(move |s| {
            s.control.operators.extend([b, c]);
            s.control.loosening_approvals = 3;
        }),
        ..Default::default()
    })
    .await;
    let r = h.spawn_replica("three", None);
    eventually("connected", Duration::from_secs(15), || r.connected()).await;
    let s = h.settings.clone();
    let as_user = |u: &BrokerUser| Operator::new(&s, &node(&u.url()), Duration::from_millis(1500));
    let lever = ControlCommand::Grant {
        agent: "agent-7".into(),
        command_type: command_poller::intake::CommandType::RefreshToken,
        service: "google".into(),
        uses: 2,
        for_secs: 600,
        reason: "CHG-11".into(),
        request_id: new_request_id(),
    };
    let id = lever.request_id().to_owned();
    let report = h.operator().run(lever).await.unwrap();
    let digest = report.stored_state.unwrap().proposals[&id].digest.clone();
    let seconded = as_user(&bob).run(second(&id, &digest)).await.unwrap();
    let state = seconded.stored_state.unwrap();
    assert!(state.grants.is_empty(), "one second of two");
    assert!(state.proposals[&id].seconds.contains(&bob.0));
    let twice = as_user(&bob)
        .run(second(&id, &digest))
        .await
        .unwrap_err()
        .to_string();
    assert!(twice.contains("already seconded"), "{twice}");
    let done = as_user(&carol).run(second(&id, &digest)).await.unwrap();
    let g = &done.stored_state.unwrap().grants[&id];
    assert_eq!(g.seconded_by.len(), 2, "{g:?}");
    r.stop().await;
}
