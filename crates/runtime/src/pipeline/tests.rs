//! Every way a command can leave the pipeline, on in-memory doubles of the store, the judges
//! and the bridge: no broker, store or network.

use super::*;
use crate::store::local::{LocalSlots, MemWindows};
use crate::store::ResultStore;
use crate::testing::{scripted_panel, MemStore, RecordingBridge, Script};
use poller_core::control::{ControlState, Mode, Quarantined};

const SHIPPED_POLICY: &str = include_str!("../../../../config/policy.toml");

/// The parts a test changes; the rest is the shipped policy, a panel of one judge, a recording
/// bridge and a store in memory.
struct Fixture {
    store: Arc<MemStore>,
    bridge: Arc<RecordingBridge>,
    /// The fleet's bridge slots and marks of sent actions (shared by a fixture's replicas).
    slots: Arc<LocalSlots>,
    gate: Arc<Gate>,
    judge: Script,
    /// How long the judge takes.
    judge_ms: u64,
    admission: Option<usize>,
    allow_unverified: bool,
    max_payload_bytes: usize,
}

impl Default for Fixture {
    fn default() -> Self {
        Self {
            store: Arc::new(MemStore::default()),
            bridge: Arc::new(RecordingBridge::default()),
            slots: Arc::new(LocalSlots::default()),
            gate: Arc::new(Gate::default()),
            judge: Script::Approve,
            judge_ms: 0,
            admission: None,
            allow_unverified: false,
            max_payload_bytes: 64 * 1024,
        }
    }
}

impl Fixture {
    fn pipeline(&self) -> Pipeline {
        let admission = self.admission.map(|count| Admission {
            windows: Arc::new(MemWindows::default()),
            limit: crate::pipeline::settings::AdmissionLimit {
                count,
                window: Duration::from_secs(60),
            },
        });
        Pipeline::new(
            "test-replica",
            IntakeParts {
                limits: DecodeLimits {
                    max_payload_bytes: self.max_payload_bytes,
                },
                allow_unverified: self.allow_unverified,
                admission,
            },
            Deciders {
                policy: Arc::new(SharedPolicy::fixed(Arc::new(
                    Policy::parse(SHIPPED_POLICY).expect("the shipped policy parses"),
                ))),
                panel: scripted_panel(
                    vec![("judge", self.judge, self.judge_ms)],
                    Duration::from_secs(5),
                    1,
                ),
                grant_uses: Arc::new(MemWindows::default()),
            },
            Execution {
                bridge: self.bridge.clone(),
                gate: self.gate.clone(),
                slots: Slots::new(
                    self.slots.clone(),
                    4,
                    Duration::from_secs(15),
                    Duration::from_secs(60),
                    "test-replica",
                ),
            },
            Keeping {
                store: self.store.clone(),
                store_key: Secret::new("pipeline-unit-test-key"),
                claim_ttl: Duration::from_secs(30),
                wait_for_in_flight: Duration::from_millis(20),
                max_waiting_per_agent: 1,
                retention: Duration::from_secs(600),
            },
        )
    }
}

/// A command from the broker-verified `agent-1`.
fn command(action_id: &str, command_type: &str) -> Inbound {
    Inbound {
        payload: serde_json::json!({
            "action_id": action_id,
            "command_type": command_type,
            "params": {"service": "mailchimp"},
            "severity": "LOW",
        })
        .to_string()
        .into_bytes(),
        user_id: Some("agent-1".into()),
        reply_to: None,
        content_type: Some("application/json".into()),
        routing_key: format!("command.{}", command_type.to_ascii_lowercase()),
        redelivered: false,
        message_type: Some(crate::broker::names::message_type::COMMAND.into()),
    }
}

/// The status and error field of a concluded command; panics on any other disposition.
fn concluded(d: &Disposition) -> (Status, Option<&str>, bool) {
    match d {
        Disposition::Conclude { outcome, claim } => (
            outcome.result.status,
            outcome.result.error_field.as_deref(),
            claim.is_some(),
        ),
        other => panic!("expected a conclusion, got {other:?}"),
    }
}

#[tokio::test]
async fn an_oversized_payload_is_dead_lettered_by_its_digest_alone() {
    let f = Fixture {
        max_payload_bytes: 64,
        ..Fixture::default()
    };
    let d = f
        .pipeline()
        .process(&command("a-1", "CHECK_INTEGRATION_STATUS"))
        .await;
    match d {
        Disposition::DeadLetter { letter, result, .. } => {
            assert_eq!(letter.field, "payload");
            assert!(matches!(letter.body, DeadLetterBody::Withheld { .. }));
            assert!(result.is_none(), "nothing of an oversized body is read");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(f.bridge.calls(), 0);
}

#[tokio::test]
async fn an_undecodable_command_is_dead_lettered_with_a_rejection_when_its_id_is_readable() {
    let f = Fixture::default();
    let mut msg = command("a-1", "CHECK_INTEGRATION_STATUS");
    msg.payload = br#"{"action_id":"a-1","command_type":"DELETE_EVERYTHING"}"#.to_vec();
    match f.pipeline().process(&msg).await {
        Disposition::DeadLetter { letter, result, .. } => {
            assert_eq!(letter.field, "command_type");
            assert!(matches!(letter.body, DeadLetterBody::Original));
            let r = result.expect("the action_id was readable");
            assert_eq!(r.status, Status::Rejected);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_unverified_sender_is_rejected_without_a_claim() {
    let f = Fixture::default();
    let mut msg = command("a-1", "CHECK_INTEGRATION_STATUS");
    msg.user_id = None;
    let d = f.pipeline().process(&msg).await;
    let (status, _, claimed) = concluded(&d);
    assert_eq!(status, Status::Rejected);
    assert!(!claimed);
    assert_eq!(f.store.result("agent-1/a-1").await.unwrap(), None);
}

#[tokio::test]
async fn a_reply_to_another_agents_queue_is_rejected() {
    let f = Fixture::default();
    let mut msg = command("a-1", "CHECK_INTEGRATION_STATUS");
    msg.reply_to = Some("agent.agent-2.replies".into());
    let d = f.pipeline().process(&msg).await;
    assert_eq!(concluded(&d), (Status::Rejected, Some("reply_to"), false));
}

#[tokio::test]
async fn an_agent_over_its_admission_limit_is_rejected_before_the_claim() {
    let f = Fixture {
        admission: Some(1),
        ..Fixture::default()
    };
    let p = f.pipeline();
    let first = p.process(&command("a-1", "CHECK_INTEGRATION_STATUS")).await;
    assert_eq!(concluded(&first).0, Status::Success);
    let second = p.process(&command("a-2", "CHECK_INTEGRATION_STATUS")).await;
    assert_eq!(
        concluded(&second),
        (Status::Rejected, Some("rate_limited"), false)
    );
    assert_eq!(f.bridge.calls(), 1);
}

#[tokio::test]
async fn a_quarantined_agents_command_is_rejected_and_its_claim_released() {
    let f = Fixture::default();
    quarantine(&f.gate);
    let d = f
        .pipeline()
        .process(&command("a-1", "CHECK_INTEGRATION_STATUS"))
        .await;
    assert_eq!(concluded(&d), (Status::Rejected, Some("agent"), false));
    assert_eq!(
        f.store
            .claim("agent-1/a-1", "other", Duration::from_secs(1))
            .await
            .unwrap(),
        crate::store::Claim::Mine,
        "the claim was released"
    );
    assert_eq!(f.bridge.calls(), 0);
    assert_eq!(f.bridge.lookups(), 0, "nothing was sent before: no lookup");
}

/// A revoke that lands while the refresh is with the judges: the gate refuses the bridge call
/// (the claim stage checked before the cut existed).
#[tokio::test]
async fn a_service_revoked_while_its_refresh_is_judged_never_reaches_the_bridge() {
    let f = Fixture {
        judge_ms: 2_000,
        ..Fixture::default()
    };
    let p = Arc::new(f.pipeline());
    let mut refresh = command("r-1", "REFRESH_TOKEN");
    refresh.payload = String::from_utf8(refresh.payload)
        .unwrap()
        .replace("LOW", "MEDIUM")
        .into_bytes();
    let running = tokio::spawn({
        let p = p.clone();
        async move { p.process(&refresh).await }
    });
    // Claimed (so past the claim stage's check) and with the judge.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while f
        .store
        .claim("agent-1/r-1", "probe", Duration::from_millis(1))
        .await
        .unwrap()
        == crate::store::Claim::Mine
    {
        assert!(std::time::Instant::now() < deadline, "never claimed");
        f.store.release("agent-1/r-1", "probe").await.unwrap();
        tokio::task::yield_now().await;
    }
    let mut state = ControlState::initial();
    state.revoked.insert(
        "mailchimp".into(),
        poller_core::control::Revocation {
            cut: poller_core::control::Cut::Revoked,
            by: "ops".into(),
            reason: "E01".into(),
            since: crate::clock::now_rfc3339(),
            request_id: "v-1".into(),
        },
    );
    f.gate.enforce(|_| (Some(state), ()));
    let d = running.await.unwrap();
    assert_eq!(concluded(&d).0, Status::Rejected);
    assert_eq!(concluded(&d).1, Some("service"));
    assert_eq!(f.bridge.calls(), 0);
}

#[tokio::test]
async fn an_allowed_command_runs_once_and_a_copy_replays_its_result() {
    let f = Fixture::default();
    let p = f.pipeline();
    let d = p.process(&command("a-1", "CHECK_INTEGRATION_STATUS")).await;
    assert_eq!(concluded(&d), (Status::Success, None, true));
    // Settled as the worker does: stored under the claim, then the claim ended.
    let Disposition::Conclude {
        outcome,
        claim: Some(claim),
    } = d
    else {
        unreachable!()
    };
    let stored = crate::store::StoredOutcome {
        result: outcome.result,
        published: true,
        command_digest: outcome.command_digest,
    };
    claim.complete(&stored, p.store_key()).await.unwrap();
    match p.process(&command("a-1", "CHECK_INTEGRATION_STATUS")).await {
        Disposition::Replay { outcome, .. } => {
            assert_eq!(outcome.result.status, Status::Success);
            assert!(outcome.result.replay);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(f.bridge.calls(), 1, "executed once");
}

#[tokio::test]
async fn a_blocked_type_never_reaches_the_judges_or_the_bridge() {
    let f = Fixture::default();
    let d = f
        .pipeline()
        .process(&command("a-1", "CONNECT_INTEGRATION"))
        .await;
    assert_eq!(concluded(&d), (Status::Blocked, None, true));
    assert_eq!(f.bridge.calls(), 0);
}

#[tokio::test]
async fn a_judged_command_the_panel_denies_is_parked_for_approval() {
    let f = Fixture {
        judge: Script::Deny,
        ..Fixture::default()
    };
    let d = f.pipeline().process(&command("a-1", "REFRESH_TOKEN")).await;
    match &d {
        Disposition::Conclude { outcome, claim } => {
            assert_eq!(outcome.result.status, Status::NeedsApproval);
            let ticket = outcome
                .result
                .approval
                .as_ref()
                .expect("an approval ticket");
            assert!(claim.is_some());
            assert!(outcome.unapproved.is_some(), "counted for the trip");
            let parked = f.store.record(&ticket.approval_id).await.unwrap();
            assert!(parked.is_some(), "the record approvers decide on");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(f.bridge.calls(), 0);
}

#[tokio::test]
async fn a_judged_command_the_panel_approves_is_executed() {
    let f = Fixture::default();
    let d = f.pipeline().process(&command("a-1", "REFRESH_TOKEN")).await;
    assert_eq!(concluded(&d).0, Status::Success);
    assert_eq!(f.bridge.calls(), 1);
}

#[tokio::test]
async fn a_paused_system_defers_the_command_with_its_claim_to_release() {
    let f = Fixture::default();
    let paused = ControlState {
        mode: Mode::Paused,
        ..ControlState::initial()
    };
    f.gate.enforce(|_| (Some(paused), ()));
    match f
        .pipeline()
        .process(&command("a-1", "CHECK_INTEGRATION_STATUS"))
        .await
    {
        Disposition::Defer { claim, why, .. } => {
            assert!(claim.is_some(), "released by the settler");
            assert!(why.contains("paused"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(f.bridge.calls(), 0);
}

#[tokio::test]
async fn a_copy_of_an_action_in_flight_waits_then_defers_and_copies_over_the_cap_are_dead_lettered()
{
    let f = Fixture::default();
    let p = Arc::new(f.pipeline());
    // The original is in flight on another replica.
    f.store
        .claim("agent-1/a-1", "elsewhere", Duration::from_secs(30))
        .await
        .unwrap();
    let copy = command("a-1", "CHECK_INTEGRATION_STATUS");
    let (first, second) = tokio::join!(p.process(&copy), async {
        // The first copy takes the one waiting place; this one finds none.
        tokio::task::yield_now().await;
        p.process(&copy).await
    });
    let kinds = [&first, &second].map(|d| match d {
        Disposition::Defer { claim: None, .. } => "defer",
        Disposition::DeadLetter { letter, .. } if letter.field == "action_id" => "dead letter",
        other => panic!("{other:?}"),
    });
    let mut sorted = kinds.to_vec();
    sorted.sort();
    assert_eq!(sorted, ["dead letter", "defer"]);
    assert_eq!(f.bridge.calls(), 0);
}

#[tokio::test]
async fn a_lookup_is_answered_from_the_store_and_claims_nothing() {
    let f = Fixture::default();
    let mut msg = command("a-9", "CHECK_INTEGRATION_STATUS");
    msg.message_type = Some(crate::broker::names::message_type::LOOKUP.into());
    msg.reply_to = Some(crate::broker::names::DIRECT_REPLY_TO.into());
    match f.pipeline().process(&msg).await {
        Disposition::Answer { result, .. } => assert_eq!(result.status, Status::Expired),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        f.store
            .claim("agent-1/a-9", "other", Duration::from_secs(1))
            .await
            .unwrap(),
        crate::store::Claim::Mine,
        "no claim taken"
    );
    assert_eq!(f.bridge.calls(), 0);
}

/// A grant stands in for the human approval a command the judges did not approve would need:
/// the result and its audit events say which grant and which use.
#[tokio::test]
async fn a_command_a_grant_lets_through_says_so_in_its_result_and_audit() {
    let mut state = ControlState::initial();
    let lever = poller_core::control::ControlCommand::Grant {
        agent: "agent-1".into(),
        command_type: crate::intake::CommandType::RefreshToken,
        service: "mailchimp".into(),
        uses: 1,
        for_secs: 600,
        reason: "routine".into(),
        request_id: "g-1".into(),
    };
    state = poller_core::control::grant::add(
        &state,
        &lever,
        "alice",
        std::collections::BTreeSet::from(["bob".to_owned()]),
        crate::clock::unix_now(),
    )
    .unwrap();
    let f = Fixture {
        judge: Script::Deny,
        gate: Arc::new(Gate::new(state)),
        ..Fixture::default()
    };
    let p = f.pipeline();
    let d = p.process(&command("g-a", "REFRESH_TOKEN")).await;
    let Disposition::Conclude { outcome, .. } = &d else {
        panic!("{d:?}");
    };
    assert_eq!(outcome.result.status, Status::Success);
    let used = outcome.result.grant.clone().expect("the grant is named");
    assert_eq!(
        (used.grant_id.as_str(), used.use_no, used.uses),
        ("g-1", 1, 1)
    );
    assert_eq!(used.granted_by, vec!["alice".to_owned(), "bob".to_owned()]);
    assert!(outcome
        .audit
        .iter()
        .any(|e| matches!(e, AuditEvent::GrantUsed { grant, .. } if grant == &used)));
    assert_eq!(f.bridge.calls(), 1);
    // Its one use spent: the next waits for a human, and says why.
    let d = p.process(&command("g-b", "REFRESH_TOKEN")).await;
    let Disposition::Conclude { outcome, .. } = &d else {
        panic!("{d:?}");
    };
    assert_eq!(outcome.result.status, Status::NeedsApproval);
    assert!(outcome.result.rationale.contains("used up (1 of 1 uses)"));
    assert_eq!(f.bridge.calls(), 1);
}

/// The agent `agent-1` in quarantine.
fn quarantine(gate: &Gate) {
    let mut state = ControlState::initial();
    state.quarantined.insert(
        "agent-1".into(),
        Quarantined {
            by: "ops".into(),
            reason: "test".into(),
            since: crate::clock::now_rfc3339(),
            request_id: "r-1".into(),
        },
    );
    gate.enforce(|_| (Some(state), ()));
}

/// A replica that executed `action_id` and died before its result was stored: the bridge ran
/// it and the store marks it sent; its claim runs out (released here, as its TTL would).
async fn executed_then_died(f: &Fixture, action_id: &str, command_type: &str) {
    let d = f
        .pipeline()
        .process(&command(action_id, command_type))
        .await;
    assert_eq!(
        concluded(&d).0,
        Status::Success,
        "the first attempt executed"
    );
    let Disposition::Conclude {
        claim: Some(claim), ..
    } = d
    else {
        unreachable!()
    };
    claim.release().await.unwrap();
}

fn redelivered(action_id: &str, command_type: &str) -> Inbound {
    Inbound {
        redelivered: true,
        ..command(action_id, command_type)
    }
}

/// The soak's violation (`soak-1-3500`): an executed command whose replica died before storing
/// its result, taken over after its agent was quarantined, reported REJECTED. It is reported as
/// what ran, from the bridge's memory (a lookup, never a second call), and stored.
#[tokio::test]
async fn an_action_executed_before_its_replica_died_is_reported_executed_under_a_later_quarantine()
{
    let f = Fixture::default();
    executed_then_died(&f, "a-1", "CHECK_INTEGRATION_STATUS").await;
    quarantine(&f.gate);
    let d = f
        .pipeline()
        .process(&redelivered("a-1", "CHECK_INTEGRATION_STATUS"))
        .await;
    assert_eq!(concluded(&d), (Status::Success, None, true), "{d:?}");
    let Disposition::Conclude { outcome, .. } = &d else {
        unreachable!()
    };
    assert!(outcome.result.tool_result.is_some());
    assert!(
        outcome
            .result
            .rationale
            .contains("would have ended REJECTED"),
        "{}",
        outcome.result.rationale
    );
    assert_eq!(f.bridge.calls(), 1, "never sent again");
    assert_eq!(f.bridge.lookups(), 1, "asked once");
}

/// The same for a panel that now votes otherwise: the copy is not parked for approval.
#[tokio::test]
async fn an_action_executed_before_its_replica_died_is_not_parked_when_the_panel_now_denies() {
    let f = Fixture::default();
    executed_then_died(&f, "a-2", "REFRESH_TOKEN").await;
    let denying = Fixture {
        judge: Script::Deny,
        store: f.store.clone(),
        bridge: f.bridge.clone(),
        slots: f.slots.clone(),
        ..Fixture::default()
    };
    let d = denying
        .pipeline()
        .process(&redelivered("a-2", "REFRESH_TOKEN"))
        .await;
    assert_eq!(concluded(&d).0, Status::Success, "{d:?}");
    let Disposition::Conclude { outcome, .. } = &d else {
        unreachable!()
    };
    assert!(outcome.result.approval.is_none(), "not parked");
    assert!(
        outcome.result.judges.is_empty() && outcome.result.panel.is_none(),
        "this attempt's votes authorized nothing"
    );
    assert!(outcome.result.bridge.as_ref().is_some_and(|b| b.looked_up));
    assert!(outcome.unapproved.is_none(), "not counted as unapproved");
    assert_eq!((f.bridge.calls(), f.bridge.lookups()), (1, 1));
}

/// An earlier attempt sent it and the bridge remembers no answer (its POSTs failed before
/// running): the refusal stands, its claim released, after one lookup.
#[tokio::test]
async fn an_action_sent_before_that_the_bridge_never_answered_is_refused_after_asking() {
    let f = Fixture::default();
    executed_then_died(&f, "a-3", "CHECK_INTEGRATION_STATUS").await;
    f.bridge
        .forgetful
        .store(true, std::sync::atomic::Ordering::SeqCst);
    quarantine(&f.gate);
    let d = f
        .pipeline()
        .process(&redelivered("a-3", "CHECK_INTEGRATION_STATUS"))
        .await;
    assert_eq!(concluded(&d), (Status::Rejected, Some("agent"), false));
    assert_eq!((f.bridge.calls(), f.bridge.lookups()), (1, 1));
}

/// The sweeper's side: an approved command executed by a replica that died before storing its
/// result, taken over after the policy file changed. It was DENIED ("the policy changed before
/// it was executed") although it ran; it is reported as what ran.
#[tokio::test]
async fn an_approved_command_a_dead_replica_ran_is_not_denied_for_a_policy_changed_since() {
    let f = Fixture {
        judge: Script::Deny,
        ..Fixture::default()
    };
    let p = f.pipeline();
    let d = p.process(&command("a-5", "REFRESH_TOKEN")).await;
    let Disposition::Conclude { outcome, .. } = &d else {
        panic!("{d:?}")
    };
    let ticket = outcome.result.approval.clone().expect("parked");
    let sealed = f.store.record(&ticket.approval_id).await.unwrap().unwrap();
    let mut rec = Parked::unseal(p.store_key(), &sealed).unwrap();
    // Approved; one sweeper ran it and died before storing the result.
    let ran = p.approved(&rec).await.expect("executed");
    assert_eq!(ran.status, Status::Success);
    // Taken over after the policy file changed.
    rec.policy_digest = "0".repeat(64);
    let r = f.pipeline().approved(&rec).await.expect("settled");
    assert_eq!(r.status, Status::Success, "{r:?}");
    assert!(r.bridge.as_ref().is_some_and(|b| b.looked_up), "{r:?}");
    assert!(
        r.rationale.contains("would have ended DENIED"),
        "{}",
        r.rationale
    );
    assert_eq!((f.bridge.calls(), f.bridge.lookups()), (1, 1));
}
