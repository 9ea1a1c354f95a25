//! The desk on a store in memory: abuse, the per-approver budget, redelivered decisions.

use super::*;
use poller_core::approval::test_util::parked;

fn desk(store: Arc<dyn ResultStore>) -> Desk {
    let root = crate::testing::repo_root();
    let mut s = crate::settings::Settings::load_isolated(&root.join("config"), "local")
        .expect("config loads");
    s.policy.file = root.join(&s.policy.file);
    let policy = crate::policy::Policy::load(&s.policy.file).expect("policy loads");
    Desk {
        settings: ApprovalSettings {
            approvers: vec!["alice".into(), "bob".into()],
            ..s.approval.clone()
        },
        names: Names {
            control_exchange: "ctl".into(),
            alerts_exchange: "alerts".into(),
            audit_exchange: "audit".into(),
            dead_letter_exchange: "dlx".into(),
            instance: "i-1".into(),
            poller_user: "poller".into(),
            replication: crate::testing::REPLICATION,
        },
        store,
        store_key: Secret::new("k"),
        policy: Arc::new(crate::policy::shared::SharedPolicy::fixed(Arc::new(policy))),
        policy_file: s.policy.file.clone(),
        state: Arc::new(crate::settle::state::PollerState::default()),
        grant_uses: Arc::new(crate::store::local::MemWindows::default()),
        wake: Arc::new(Notify::new()),
        audit_exchange: "audit".into(),
        budget: Default::default(),
    }
}

fn decision(by: &str, body: serde_json::Value, redelivered: bool) -> Inbound {
    Inbound {
        body: body.to_string().into_bytes(),
        user_id: Some(by.into()),
        reply_to: None,
        correlation_id: None,
        redelivered,
    }
}

/// A desk on a store in memory holding one parked command that one approval decides, under the
/// policy in force; and alice's approval of it.
async fn parked_for_one_approval() -> (Arc<dyn ResultStore>, Desk, Parked, serde_json::Value) {
    let store: Arc<dyn ResultStore> = Arc::new(crate::testing::MemStore::default());
    let d = desk(store.clone());
    let mut rec = parked();
    rec.required = 1;
    rec.policy_digest = d.policy.digest();
    rec.digest = poller_core::approval::digest(&rec.command_digest, &rec.policy_digest);
    rec.expires_at = crate::clock::unix_now() + 600;
    store
        .park(
            &rec.approval_id,
            &rec.seal(&d.store_key),
            std::time::Duration::from_secs(600),
        )
        .await
        .unwrap();
    let approve = serde_json::json!({
        "decision": "approve", "approval_id": rec.approval_id, "digest": rec.digest, "reason": "ok"
    });
    (store, d, rec, approve)
}

#[tokio::test]
async fn a_decision_asking_for_an_answer_anywhere_but_direct_reply_to_is_refused_as_abuse() {
    let store: Arc<dyn ResultStore> = Arc::new(crate::testing::MemStore::default());
    let d = desk(store);
    for target in [
        "mcp.control.state.log",
        "mcp.commands",
        "reply.agent-marketing.x",
    ] {
        let mut msg = decision("alice", serde_json::json!({"decision": "list"}), false);
        msg.reply_to = Some(target.into());
        let h = d.handle(&msg).await;
        assert_eq!(h.reply.outcome, ReplyOutcome::Refused, "{target}");
        assert!(h.abuse, "{target}: security is alerted");
        assert!(
            h.reply.message.contains("direct reply-to"),
            "{}",
            h.reply.message
        );
        // And nothing is published to it.
        let log = crate::testing::Log::default();
        let sink = crate::testing::RecordingPublisher::new(log.clone());
        d.publish(&sink, &msg, &h).await.unwrap();
        let sent = log.lock().unwrap().clone();
        assert!(
            sent.iter().all(|line| !line.contains(target)),
            "{target}: {sent:?}"
        );
        assert!(sent.iter().any(|l| l.contains("security.high")), "{sent:?}");
    }
    let mut msg = decision("alice", serde_json::json!({"decision": "list"}), false);
    msg.reply_to = Some("amq.rabbitmq.reply-to.g1h2AA.abc".into());
    assert_eq!(d.handle(&msg).await.reply.outcome, ReplyOutcome::Listed);
}

#[tokio::test]
async fn decisions_per_approver_are_capped_and_alerted_once_a_minute() {
    let store: Arc<dyn ResultStore> = Arc::new(crate::testing::MemStore::default());
    let mut d = desk(store);
    d.settings.max_decisions_per_minute = 5;
    let list = || decision("alice", serde_json::json!({"decision": "list"}), false);
    let mut outcomes = Vec::new();
    for _ in 0..8 {
        let h = d.handle(&list()).await;
        outcomes.push((h.reply.outcome, h.abuse));
    }
    assert!(outcomes[..5]
        .iter()
        .all(|o| *o == (ReplyOutcome::Listed, false)));
    assert_eq!(outcomes[5], (ReplyOutcome::Refused, true), "the first over");
    assert!(outcomes[6..]
        .iter()
        .all(|o| *o == (ReplyOutcome::Refused, false)));
    // Another approver is not held back by alice.
    let h = d
        .handle(&decision(
            "bob",
            serde_json::json!({"decision": "list"}),
            false,
        ))
        .await;
    assert_eq!(h.reply.outcome, ReplyOutcome::Listed);
    // A new minute, a new budget.
    assert_eq!(d.budget.take("alice", 60 * 1_000_000, 5), Budget::Within);
}

#[tokio::test]
async fn a_redelivered_decision_already_stored_is_answered_as_decided_not_refused() {
    let (store, d, rec, approve) = parked_for_one_approval().await;
    let first = d.handle(&decision("alice", approve.clone(), false)).await;
    assert_eq!(
        first.reply.outcome,
        ReplyOutcome::Approved,
        "{:?}",
        first.reply
    );
    // The replica died before acking: the broker redelivers the same decision.
    let again = d.handle(&decision("alice", approve.clone(), true)).await;
    assert_eq!(
        again.reply.outcome,
        ReplyOutcome::Approved,
        "{:?}",
        again.reply
    );
    assert_eq!(again.event.outcome, "approved");
    // Not a redelivery, or another approver, or another reason: refused as before.
    let fresh = d.handle(&decision("alice", approve.clone(), false)).await;
    assert_eq!(fresh.reply.outcome, ReplyOutcome::Refused);
    let bob = d.handle(&decision("bob", approve, true)).await;
    assert_eq!(bob.reply.outcome, ReplyOutcome::Refused);
    let stored = Parked::unseal(
        &d.store_key,
        &store.record(&rec.approval_id).await.unwrap().unwrap(),
    )
    .unwrap();
    assert_eq!(stored.approvals.len(), 1, "counted once");
}

/// A decision redelivered after its replica lost the session before acking is published again
/// (its event and audit record may not have gone out), but it is one decision: the metric
/// counts it once.
#[tokio::test]
async fn a_redelivered_decision_is_counted_once_in_the_metrics() {
    let (_, d, _, approve) = parked_for_one_approval().await;
    let sink = crate::testing::RecordingPublisher::new(crate::testing::Log::default());
    for redelivered in [false, true] {
        let msg = decision("alice", approve.clone(), redelivered);
        let h = d.handle(&msg).await;
        assert_eq!(h.reply.outcome, ReplyOutcome::Approved, "{:?}", h.reply);
        d.publish(&sink, &msg, &h).await.unwrap();
    }
    let metrics = d
        .state
        .metrics
        .render(0, poller_core::control::Mode::Running);
    let approved: Vec<_> = metrics
        .lines()
        .filter(|l| l.starts_with("command_poller_approval_decisions_total{outcome=\"approved\"}"))
        .collect();
    assert_eq!(
        approved,
        ["command_poller_approval_decisions_total{outcome=\"approved\"} 1"],
        "{metrics}"
    );
}
