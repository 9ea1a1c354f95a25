//! Human approval of NEEDS_APPROVAL commands against the real broker and the real stores: the
//! approvers are throwaway broker users, the agent is guest, the bridge is the simulator.

use crate::common::*;
use command_poller::approval::approver::Approver;
use command_poller::approval::wire::{Reply, ReplyOutcome, Request};
use command_poller::control::operator::new_request_id;
use command_poller::control::ControlCommand;
use command_poller::outcome::{ResultMessage, Status};
use command_poller::store::{self, Backend, ResultStore};
use command_poller::testing::Script;
use futures::StreamExt;
use lapin::options::*;
use lapin::{BasicProperties, Connection};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A command for the judges (the simulator knows google).
fn refresh(id: &str) -> serde_json::Value {
    cmd(id, "REFRESH_TOKEN", "google", "MEDIUM")
}

/// Judges that never approve: every REFRESH_TOKEN ends NEEDS_APPROVAL, with their reasons.
fn refusing_panel() -> command_poller::judging::Panel {
    command_poller::testing::scripted_panel(
        vec![("security", Script::Deny, 0), ("business", Script::Deny, 0)],
        Duration::from_secs(2),
        2,
    )
}

/// A policy file like the shipped one, REFRESH_TOKEN needing `m` approvals within `ttl_secs`.
fn policy(m: u32, ttl_secs: u64) -> PathBuf {
    let text = std::fs::read_to_string("config/policy.toml")
        .unwrap()
        .replace(
            "[commands.REFRESH_TOKEN]\n",
            &format!(
            "[commands.REFRESH_TOKEN]\napprovals_required = {m}\napproval_ttl_secs = {ttl_secs}\n"
        ),
        );
    let path = std::env::temp_dir().join(format!("approval-policy-{}.toml", suffix()));
    std::fs::write(&path, text).unwrap();
    path
}

/// Two approvers and a poller whose approvers are them and guest (the agent), so the rule
/// that a requester never decides its own command is tested with the requester listed.
struct World {
    h: Harness,
    alice: BrokerUser,
    bob: BrokerUser,
    policy: PathBuf,
}

impl World {
    /// Waits until this replica has finished `n` more sweeps (an absence is asserted after
    /// sweeps that could have broken it, not after a guessed time).
    async fn sweeps(&self, n: u64) {
        let m = &self.h.poller_state.metrics;
        let from = m.approval_sweeps();
        eventually(&format!("{n} more sweeps"), Duration::from_secs(20), || {
            m.approval_sweeps() >= from + n
        })
        .await;
    }

    async fn start(m: u32, ttl_secs: u64, store: Option<Arc<dyn ResultStore>>) -> World {
        Self::start_with(m, ttl_secs, store, |_| {}).await
    }

    async fn start_with(
        m: u32,
        ttl_secs: u64,
        store: Option<Arc<dyn ResultStore>>,
        tweak: impl FnOnce(&mut command_poller::settings::Settings) + Send + 'static,
    ) -> World {
        let (alice, bob) = (BrokerUser::create(), BrokerUser::create());
        let policy = policy(m, ttl_secs);
        let approvers = vec![alice.0.clone(), bob.0.clone(), "guest".to_owned()];
        let file = policy.clone();
        let h = Harness::start(Options {
            store,
            panel: Some(refusing_panel()),
            tweak: Box::new(move |s| {
                s.approval.approvers = approvers;
                s.policy.file = file;
                tweak(s);
            }),
            ..Default::default()
        })
        .await;
        World {
            h,
            alice,
            bob,
            policy,
        }
    }

    async fn ask(&self, who: &BrokerUser, req: Request) -> Reply {
        ask(&self.h, &who.url(), req).await
    }

    /// The NEEDS_APPROVAL result of `id`, once published.
    async fn parked(&self, id: &str) -> ResultMessage {
        self.h.send(&refresh(id)).await;
        let r = self.h.result(id).await;
        assert_eq!(r.status, Status::NeedsApproval, "{r:?}");
        r
    }

    /// The final (non-NEEDS_APPROVAL) result of `id`.
    async fn final_result(&self, id: &str, within: Duration) -> ResultMessage {
        self.h
            .wait_until(&format!("final result of {id}"), within, |i| {
                i.results
                    .iter()
                    .find(|(_, r)| {
                        r.action_id.as_deref() == Some(id) && r.status != Status::NeedsApproval
                    })
                    .map(|(_, r)| r.clone())
            })
            .await
    }

    fn finals(&self, id: &str) -> usize {
        self.h
            .inbox
            .lock()
            .unwrap()
            .results
            .iter()
            .filter(|(_, r)| {
                r.action_id.as_deref() == Some(id) && r.status != Status::NeedsApproval && !r.replay
            })
            .count()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.policy);
    }
}

async fn ask(h: &Harness, url: &str, req: Request) -> Reply {
    Approver {
        settings: &h.settings.approval,
        endpoints: node(url),
        wait: Duration::from_secs(10),
    }
    .send(&req)
    .await
    .expect("a replica answers")
}

fn approve(r: &ResultMessage, reason: &str) -> Request {
    let t = r.approval.as_ref().expect("the result names its approval");
    Request::Approve {
        approval_id: t.approval_id.clone(),
        digest: t.digest.clone(),
        reason: reason.into(),
    }
}

fn deny(r: &ResultMessage, reason: &str) -> Request {
    Request::Deny {
        approval_id: r.approval.as_ref().unwrap().approval_id.clone(),
        reason: reason.into(),
    }
}

fn store_settings(backend: Backend) -> store::IdempotencySettings {
    let mut s = test_settings(&suffix()).idempotency;
    s.backend = backend;
    s.key_prefix = format!("t-{}", suffix());
    s.url = match backend {
        Backend::Embedded => String::new(),
        Backend::Redis => REDIS.into(),
        Backend::Postgres => POSTGRES.into(),
    };
    s
}

async fn open(backend: Backend) -> Arc<dyn ResultStore> {
    store::open(&store_settings(backend))
        .await
        .unwrap_or_else(|e| panic!("{backend:?}: {e}"))
}

const ALL: [Backend; 3] = [Backend::Embedded, Backend::Redis, Backend::Postgres];

#[tokio::test]
async fn approved_executes_exactly_once_denied_and_expired_never_on_every_store() {
    for backend in ALL {
        let w = World::start(1, 3, Some(open(backend).await)).await;
        // Approve → SUCCESS, executed once, with the approver.
        let parked = w.parked("ok-1").await;
        let t = parked.approval.clone().unwrap();
        assert_eq!(t.approvals_required, 1);
        assert_eq!(t.digest.len(), 64);
        assert_eq!(w.h.sim.executions("ok-1"), 0, "{backend:?}");
        let reply = w
            .ask(&w.alice, approve(&parked, "customer asked for it"))
            .await;
        assert_eq!(
            reply.outcome,
            ReplyOutcome::Approved,
            "{backend:?}: {reply:?}"
        );
        let done = w.final_result("ok-1", Duration::from_secs(20)).await;
        assert_eq!(done.status, Status::Success, "{backend:?}: {done:?}");
        assert_eq!(done.approvals.len(), 1);
        assert_eq!(done.approvals[0].by, w.alice.0);
        assert_eq!(done.approvals[0].reason, "customer asked for it");
        assert!(done.rationale.contains(&w.alice.0), "{}", done.rationale);
        // Consumed: approving again changes nothing.
        let again = w.ask(&w.bob, approve(&parked, "me too")).await;
        assert_eq!(again.outcome, ReplyOutcome::Refused);
        assert!(again.message.contains("consumed"), "{}", again.message);
        // A duplicate of the command replays the final result, not NEEDS_APPROVAL.
        w.h.send(&refresh("ok-1")).await;
        w.h.wait_until("the replay", Duration::from_secs(10), |i| {
            i.results
                .iter()
                .any(|(_, r)| r.action_id.as_deref() == Some("ok-1") && r.replay)
                .then_some(())
        })
        .await;
        settle().await;
        let replays: Vec<Status> =
            w.h.inbox
                .lock()
                .unwrap()
                .results
                .iter()
                .filter(|(_, r)| r.action_id.as_deref() == Some("ok-1") && r.replay)
                .map(|(_, r)| r.status)
                .collect();
        assert_eq!(replays, [Status::Success], "{backend:?}");
        assert_eq!(w.h.sim.executions("ok-1"), 1, "{backend:?}");
        assert_eq!(w.finals("ok-1"), 1, "{backend:?}: one final result");

        // Deny → DENIED, never executed, alerted to ops.
        let parked = w.parked("no-1").await;
        let reply = w.ask(&w.bob, deny(&parked, "not this account")).await;
        assert_eq!(reply.outcome, ReplyOutcome::Denied);
        let done = w.final_result("no-1", Duration::from_secs(20)).await;
        assert_eq!(done.status, Status::Denied);
        assert_eq!(done.approvals[0].by, w.bob.0);
        assert_eq!(done.approvals[0].decision, "deny");
        let late = w.ask(&w.alice, approve(&parked, "overrule")).await;
        assert_eq!(late.outcome, ReplyOutcome::Refused);
        let alert =
            w.h.wait_until("the DENIED alert", Duration::from_secs(10), |i| {
                i.alerts
                    .iter()
                    .find(|(_, a)| {
                        a.action_id.as_deref() == Some("no-1") && a.status == Some(Status::Denied)
                    })
                    .cloned()
            })
            .await;
        assert_eq!(alert.0.routing_key, "ops.normal");

        // Nobody decides → EXPIRED after 3 s, never executed; a late approval is refused.
        let parked = w.parked("late-1").await;
        let done = w.final_result("late-1", Duration::from_secs(20)).await;
        assert_eq!(done.status, Status::Expired, "{backend:?}");
        assert!(done.approvals.is_empty());
        let late = w.ask(&w.alice, approve(&parked, "sorry, late")).await;
        assert_eq!(late.outcome, ReplyOutcome::Refused);
        assert!(late.message.contains("expired"), "{}", late.message);
        settle().await;
        assert_eq!(w.h.sim.executions("no-1"), 0);
        assert_eq!(w.h.sim.executions("late-1"), 0);
        assert_eq!(w.finals("no-1"), 1);
        assert_eq!(w.finals("late-1"), 1);
    }
}

#[tokio::test]
async fn the_requester_and_non_approvers_are_refused_and_security_is_told() {
    let w = World::start(1, 60, None).await;
    let parked = w.parked("self-1").await;
    // guest sent it, and guest is listed as an approver: still refused.
    let reply = ask(&w.h, AMQP, approve(&parked, "looks fine to me")).await;
    assert_eq!(reply.outcome, ReplyOutcome::Refused);
    assert!(reply.message.contains("requester"), "{}", reply.message);
    let outsider = BrokerUser::create();
    let reply = ask(&w.h, &outsider.url(), approve(&parked, "let me")).await;
    assert_eq!(reply.outcome, ReplyOutcome::Refused);
    assert!(
        reply.message.contains("not an approver"),
        "{}",
        reply.message
    );
    let alerts =
        w.h.wait_until("two security alerts", Duration::from_secs(10), |i| {
            let a: Vec<_> = i
                .alerts
                .iter()
                .filter(|(rx, a)| {
                    rx.routing_key == "security.high"
                        && a.summary.starts_with("Refused approval decision")
                })
                .map(|(_, a)| a.summary.clone())
                .collect();
            (a.len() >= 2).then_some(a)
        })
        .await;
    assert!(alerts.iter().any(|a| a.contains("guest")), "{alerts:?}");
    assert!(alerts.iter().any(|a| a.contains(&outsider.0)), "{alerts:?}");
    // Nothing changed: still pending, and a real approver can still approve it.
    let list = w.ask(&w.alice, Request::List).await;
    assert_eq!(list.pending.len(), 1);
    assert!(list.pending[0].approvals.is_empty());
    assert_eq!(w.h.sim.executions("self-1"), 0);
}

#[tokio::test]
async fn two_of_n_needs_two_distinct_approvers_and_list_shows_what_to_decide() {
    let w = World::start(2, 60, None).await;
    // With the agent's justification: the approvers see it, quoted.
    let mut command = refresh("two-1");
    command["justification"] = "the 09:00 newsletter needs a fresh token".into();
    w.h.send(&command).await;
    let parked = w.h.result("two-1").await;
    assert_eq!(parked.status, Status::NeedsApproval, "{parked:?}");
    let list = w.ask(&w.alice, Request::List).await;
    assert_eq!(list.outcome, ReplyOutcome::Listed);
    let p = &list.pending[0];
    assert_eq!(p.action_id, "two-1");
    assert_eq!(
        p.justification.as_deref(),
        Some("the 09:00 newsletter needs a fresh token")
    );
    assert_eq!(p.agent.id, "guest");
    assert_eq!(p.approvals_required, 2);
    assert_eq!(p.digest, parked.approval.as_ref().unwrap().digest);
    assert!(p.judges.iter().any(|j| !j.reason.is_empty()));
    assert!(p.expires_in_secs > 0 && p.expires_in_secs <= 60);
    let r = w.ask(&w.alice, approve(&parked, "one")).await;
    assert_eq!(r.outcome, ReplyOutcome::Counted, "{r:?}");
    let r = w.ask(&w.alice, approve(&parked, "one again")).await;
    assert_eq!(r.outcome, ReplyOutcome::Refused);
    assert!(r.message.contains("counts once"), "{}", r.message);
    settle().await;
    assert_eq!(w.h.sim.executions("two-1"), 0, "one approver is not two");
    let r = w.ask(&w.bob, approve(&parked, "two")).await;
    assert_eq!(r.outcome, ReplyOutcome::Approved);
    let done = w.final_result("two-1", Duration::from_secs(20)).await;
    assert_eq!(done.status, Status::Success, "{done:?}");
    let by: Vec<&str> = done.approvals.iter().map(|a| a.by.as_str()).collect();
    assert_eq!(by, [w.alice.0.as_str(), w.bob.0.as_str()]);
    assert_eq!(w.h.sim.executions("two-1"), 1);
}

#[tokio::test]
async fn a_changed_policy_file_or_a_wrong_digest_refuses_the_approval() {
    let w = World::start(1, 60, None).await;
    let parked = w.parked("pol-1").await;
    let mut wrong = approve(&parked, "x");
    if let Request::Approve { digest, .. } = &mut wrong {
        *digest = "0".repeat(64);
    }
    let r = w.ask(&w.alice, wrong).await;
    assert_eq!(r.outcome, ReplyOutcome::Refused);
    assert!(r.message.contains("digest mismatch"), "{}", r.message);
    // The policy file changes after parking (one more comment line is a different policy).
    let mut text = std::fs::read_to_string(&w.policy).unwrap();
    text.push_str("\n# edited after the command was parked\n");
    std::fs::write(&w.policy, text).unwrap();
    let r = w.ask(&w.alice, approve(&parked, "ok")).await;
    assert_eq!(r.outcome, ReplyOutcome::Refused);
    assert!(r.message.contains("policy changed"), "{}", r.message);
    let list = w.ask(&w.alice, Request::List).await;
    assert!(list.pending[0].warning.is_some());
    settle().await;
    assert_eq!(w.h.sim.executions("pol-1"), 0);
    assert_eq!(w.finals("pol-1"), 0);
}

#[tokio::test]
async fn an_approval_while_halted_waits_for_the_lift_then_executes_once() {
    let w = World::start(1, 120, None).await;
    let parked = w.parked("halt-1").await;
    halt(&w.h).await;
    let r = w.ask(&w.alice, approve(&parked, "go ahead")).await;
    assert_eq!(r.outcome, ReplyOutcome::Approved, "{r:?}");
    // Five sweeps while halted: nothing executes.
    w.sweeps(5).await;
    assert_eq!(w.h.sim.posts("halt-1"), 0, "an approval bypassed the halt");
    assert_eq!(w.finals("halt-1"), 0);
    lift(&w.h).await;
    let done = w.final_result("halt-1", Duration::from_secs(20)).await;
    assert_eq!(done.status, Status::Success, "{done:?}");
    settle().await;
    assert_eq!(w.h.sim.executions("halt-1"), 1);
    assert_eq!(w.finals("halt-1"), 1);
}

#[tokio::test]
async fn a_poller_restart_between_parking_and_approval_loses_nothing() {
    let mut w = World::start(1, 120, Some(open(Backend::Redis).await)).await;
    let parked = w.parked("restart-1").await;
    w.h.stop().await;
    start_again(&mut w).await;
    let r = w.ask(&w.alice, approve(&parked, "after the restart")).await;
    assert_eq!(r.outcome, ReplyOutcome::Approved, "{r:?}");
    let done = w.final_result("restart-1", Duration::from_secs(20)).await;
    assert_eq!(done.status, Status::Success, "{done:?}");
    assert_eq!(w.h.sim.executions("restart-1"), 1);
}

#[tokio::test]
async fn two_replicas_execute_once_and_expire_once() {
    let w = World::start(1, 2, Some(open(Backend::Postgres).await)).await;
    let a = w.h.spawn_replica("a", Some(refusing_panel()));
    let b = w.h.spawn_replica("b", Some(refusing_panel()));
    eventually("replicas connected", Duration::from_secs(15), || {
        a.connected() && b.connected()
    })
    .await;
    let parked = w.parked("rep-1").await;
    w.h.send(&refresh("rep-exp")).await;
    let r = w.ask(&w.alice, approve(&parked, "once")).await;
    assert_eq!(r.outcome, ReplyOutcome::Approved);
    assert_eq!(
        w.final_result("rep-1", Duration::from_secs(20))
            .await
            .status,
        Status::Success
    );
    assert_eq!(
        w.final_result("rep-exp", Duration::from_secs(20))
            .await
            .status,
        Status::Expired
    );
    // Many sweeps later: still one of each.
    w.sweeps(5).await;
    assert_eq!(w.h.sim.executions("rep-1"), 1);
    assert_eq!(w.finals("rep-1"), 1);
    assert_eq!(w.finals("rep-exp"), 1);
    let expired_events = events(&w.h, "event.approval.expired").await;
    assert_eq!(expired_events, 1, "one expiry event, from one replica");
    a.stop().await;
    b.stop().await;
}

/// How many events with `key` are in the events queue (read without taking them off).
async fn events(h: &Harness, key: &str) -> usize {
    let conn = Connection::connect(AMQP, Default::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut n = 0;
    while let Some(m) = ch
        .basic_get(
            h.settings.control.events_queue.as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()
    {
        if m.delivery.routing_key.as_str() == key {
            n += 1;
        }
    }
    let _ = conn.close(200, "ok".into()).await;
    n
}

/// Publishes raw bytes to the approvals exchange as `url`'s user (with `user_id` when given),
/// and returns the reply.
async fn raw(h: &Harness, url: &str, user_id: Option<&str>, body: &[u8]) -> Reply {
    let conn = Connection::connect(url, Default::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut replies = crate::common::consume_all(&ch, "amq.rabbitmq.reply-to").await;
    let mut props = BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into());
    if let Some(u) = user_id {
        props = props.with_user_id(u.into());
    }
    ch.basic_publish(
        h.settings.approval.exchange.as_str().into(),
        "approval.approve".into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .expect("a reply")
        .unwrap()
        .unwrap();
    let _ = conn.close(200, "ok".into()).await;
    serde_json::from_slice(&d.data).unwrap()
}

#[tokio::test]
async fn bad_decision_messages_are_refused_clearly_and_change_nothing() {
    let w = World::start(1, 60, None).await;
    let parked = w.parked("bad-1").await;
    let t = parked.approval.clone().unwrap();
    let url = w.alice.url();
    let me = Some(w.alice.0.as_str());
    let cases: Vec<(Vec<u8>, Option<&str>, &str)> = vec![
        (b"{not json".to_vec(), me, "not a decision message"),
        (vec![b' '; 20_000], me, "exceeds the limit"),
        (
            serde_json::to_vec(&serde_json::json!({"decision": "approve", "approval_id": "0123456789abcdef01234567", "digest": t.digest, "reason": "x"})).unwrap(),
            me,
            "unknown approval id",
        ),
        (
            serde_json::to_vec(&serde_json::json!({"decision": "approve", "approval_id": t.approval_id, "digest": "abc", "reason": "x"})).unwrap(),
            me,
            "64 hexadecimal",
        ),
        (
            serde_json::to_vec(&serde_json::json!({"decision": "approve", "approval_id": t.approval_id, "digest": t.digest, "reason": "x"})).unwrap(),
            None,
            "no user_id",
        ),
        (
            serde_json::to_vec(&serde_json::json!({"decision": "execute", "approval_id": t.approval_id})).unwrap(),
            me,
            "unknown variant",
        ),
    ];
    for (body, user, want) in cases {
        let r = raw(&w.h, &url, user, &body).await;
        assert_eq!(r.outcome, ReplyOutcome::Refused, "{want}");
        assert!(r.message.contains(want), "{want}: {}", r.message);
    }
    // Nothing changed, nothing lost: it is still pending and can be approved.
    let r = w.ask(&w.alice, approve(&parked, "now properly")).await;
    assert_eq!(r.outcome, ReplyOutcome::Approved);
    assert_eq!(
        w.final_result("bad-1", Duration::from_secs(20))
            .await
            .status,
        Status::Success
    );
    assert!(events(&w.h, "event.approval.refused").await >= 5);
}

#[tokio::test]
async fn the_alert_and_the_webhook_carry_what_an_approver_needs_and_a_reminder_follows() {
    use axum::routing::post;
    let got: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let app = axum::Router::new().route(
        "/hook",
        post({
            let got = got.clone();
            move |body: axum::Json<serde_json::Value>| {
                let got = got.clone();
                async move {
                    let mut g = got.lock().unwrap();
                    g.push(body.0);
                    // The first post fails: notices are retried.
                    if g.len() == 1 {
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        axum::http::StatusCode::OK
                    }
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let w = World::start_with(1, 4, None, move |s| {
        s.secrets.approval_webhook = Some(command_poller::bridge::signing::Secret::new(format!(
            "http://{addr}/hook"
        )));
        s.approval.remind_before = Duration::from_secs(2);
    })
    .await;
    let parked = w.parked("hook-1").await;
    let t = parked.approval.clone().unwrap();
    let alert =
        w.h.wait_until("the NEEDS_APPROVAL alert", Duration::from_secs(10), |i| {
            i.alerts
                .iter()
                .find(|(_, a)| a.action_id.as_deref() == Some("hook-1"))
                .map(|(_, a)| a.clone())
        })
        .await;
    let notice = alert.approval.expect("the alert carries the approval");
    assert_eq!(notice.ticket, t);
    assert!(notice.votes.iter().any(|v| !v.reason.is_empty()));
    assert_eq!(
        notice.approve_command,
        format!(
            "command-poller approve {} --digest {} --reason \"...\"",
            t.approval_id, t.digest
        )
    );
    assert!(notice.deny_command.contains(&t.approval_id));
    let posts =
        w.h.wait_until(
            "the notice and the reminder",
            Duration::from_secs(15),
            |_| {
                let g = got.lock().unwrap();
                (g.len() >= 3).then(|| g.clone())
            },
        )
        .await;
    let texts: Vec<&str> = posts.iter().filter_map(|p| p["text"].as_str()).collect();
    assert!(texts[0].starts_with("Approval needed"), "{texts:?}");
    assert_eq!(texts[0], texts[1], "the failed post was retried");
    assert!(texts[2].starts_with("Reminder"), "{texts:?}");
    assert!(posts[0]
        .to_string()
        .contains(&notice.approve_command.replace('"', "\\\"")));
    assert!(posts[0]["blocks"].is_array());
}

#[tokio::test]
async fn audit_show_tells_the_whole_story_and_the_metrics_count_decisions() {
    let w = World::start(2, 60, None).await;
    let file = std::env::temp_dir().join(format!("approval-audit-{}.jsonl", suffix()));
    let stop = tokio_util::sync::CancellationToken::new();
    let sink = spawn_sink(&w.h.settings, &file, stop.clone());
    let parked = w.parked("story-1").await;
    assert_eq!(
        w.ask(&w.alice, approve(&parked, "first")).await.outcome,
        ReplyOutcome::Counted
    );
    assert_eq!(
        w.ask(&w.alice, approve(&parked, "again")).await.outcome,
        ReplyOutcome::Refused
    );
    assert_eq!(
        w.ask(&w.bob, approve(&parked, "second")).await.outcome,
        ReplyOutcome::Approved
    );
    assert_eq!(
        w.final_result("story-1", Duration::from_secs(20))
            .await
            .status,
        Status::Success
    );
    // receipt and parking, three decisions, the execution and its result.
    let bin = env!("CARGO_BIN_EXE_command-poller");
    let show = || {
        let out = crate::common::isolated(bin)
            .args(["audit", "show"])
            .arg(&file)
            .args(["--action-id", "story-1"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let shown = loop {
        let s = show();
        if s.lines().count() >= 5 || std::time::Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let lines: Vec<serde_json::Value> = shown
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["record"].clone())
        .collect();
    // The desk's records and the commands' are published by different tasks: their relative
    // order in the stream is not fixed, the order within each is.
    let of_kind = |k: &str| -> Vec<serde_json::Value> {
        lines.iter().filter(|r| r["kind"] == k).cloned().collect()
    };
    let (commands, decisions) = (of_kind("command"), of_kind("approval"));
    assert_eq!((commands.len(), decisions.len()), (2, 3), "{shown}");
    assert!(
        commands[0].to_string().contains("approval_parked"),
        "{shown}"
    );
    assert!(
        commands[0].to_string().contains("NEEDS_APPROVAL"),
        "{shown}"
    );
    let event = |i: usize| decisions[i]["events"][0].clone();
    assert_eq!(event(0)["outcome"], "counted");
    assert_eq!(event(0)["by"], w.alice.0.as_str());
    assert_eq!(event(0)["digest"], parked.approval.as_ref().unwrap().digest);
    assert_eq!(event(1)["outcome"], "refused");
    assert_eq!(event(2)["outcome"], "approved");
    assert_eq!(event(2)["by"], w.bob.0.as_str());
    assert_eq!(event(2)["reason"], "second");
    let last = &commands[1];
    assert!(last.to_string().contains("bridge_call"), "{shown}");
    assert_eq!(last["events"][0]["decision"], "finalize", "{shown}");
    assert_eq!(last["events"][0]["outcome"], "success", "{shown}");
    assert!(last.to_string().contains("SUCCESS"), "{shown}");
    assert_eq!(lines.first().unwrap(), &commands[0], "receipt comes first");

    // The metrics: two decisions counted, one refused, one time to decision, none pending (the
    // gauge is as of the last sweep: wait for one after the finalizing sweep).
    let metrics = || {
        w.h.poller_state
            .metrics
            .render(0, command_poller::control::Mode::Running)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !metrics().contains("command_poller_approvals_pending 0") {
        assert!(std::time::Instant::now() < deadline, "{}", metrics());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = metrics();
    for want in [
        "command_poller_approval_decisions_total{outcome=\"counted\"} 1",
        "command_poller_approval_decisions_total{outcome=\"refused\"} 1",
        "command_poller_approval_decisions_total{outcome=\"approved\"} 1",
        "command_poller_approval_time_to_decision_seconds_count 1",
        "command_poller_approvals_pending 0",
    ] {
        assert!(text.contains(want), "{want} not in:\n{text}");
    }
    stop.cancel();
    let _ = sink.await;
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(command_poller::audit::chain::head_path(&file));
}

/// Pulls a lever on every replica (as guest, an operator in config/local.toml).
async fn lever(h: &Harness, cmd: ControlCommand) {
    h.operator().run(cmd).await.unwrap();
}

async fn halt(h: &Harness) {
    lever(
        h,
        ControlCommand::Halt {
            reason: "hold".into(),
            request_id: new_request_id(),
        },
    )
    .await
}

async fn lift(h: &Harness) {
    lever(
        h,
        ControlCommand::Resume {
            reason: "over".into(),
            lift_halt: true,
            post_mortem: Some("PM-test".into()),
            request_id: new_request_id(),
        },
    )
    .await
}

/// Starts a new poller after `w.h.stop()` (its shutdown token renewed).
async fn start_again(w: &mut World) {
    w.h.shutdown = tokio_util::sync::CancellationToken::new();
    let secret = w.h.secret.clone();
    w.h.start_poller(Some(refusing_panel()), secret).await;
}

#[tokio::test]
async fn a_crash_after_approval_neither_loses_nor_repeats_it() {
    let store = open(Backend::Redis).await;
    let mut w = World::start(1, 300, Some(store.clone())).await;
    let lost = w.parked("crash-lost").await;
    let done = w.parked("crash-done").await;
    halt(&w.h).await;
    for (r, why) in [(&lost, "one"), (&done, "two")] {
        let reply = w.ask(&w.alice, approve(r, why)).await;
        assert_eq!(reply.outcome, ReplyOutcome::Approved);
    }
    // The poller dies with both approved and neither executed.
    w.h.stop().await;
    // Bad luck on top: "crash-done" had been executed and its SUCCESS stored, but the crash came
    // before it was published (the store is written first).
    let key = command_poller::store::store_key(&w.h.settings.idempotency, None).unwrap();
    let agent = command_poller::intake::Agent {
        id: command_poller::intake::AgentId::parse("guest").unwrap(),
        verified: true,
    };
    let command = command_poller::intake::decode(
        refresh("crash-done").to_string().as_bytes(),
        None,
        command_poller::intake::DecodeLimits {
            max_payload_bytes: 65536,
        },
    )
    .unwrap();
    let mut executed = done.clone();
    executed.status = Status::Success;
    executed.rationale = "executed just before the crash".into();
    executed.approval = None;
    let outcome = command_poller::store::StoredOutcome {
        published: false,
        result: executed,
        command_digest: Some(command_poller::store::command_digest(&agent, &command)),
    };
    let ttl = Duration::from_secs(60);
    assert_eq!(
        store
            .hold("guest/crash-done", "crashed-replica", ttl)
            .await
            .unwrap(),
        command_poller::store::Claim::Mine
    );
    store
        .complete(
            "guest/crash-done",
            "crashed-replica",
            &outcome.seal(&key),
            ttl,
            command_poller::store::Durability::Synced,
            command_poller::store::ClaimAfter::Ended,
        )
        .await
        .unwrap();
    // A new poller comes up halted (the stored state), then the halt is lifted.
    start_again(&mut w).await;
    lift(&w.h).await;
    let l = w.final_result("crash-lost", Duration::from_secs(20)).await;
    assert_eq!(l.status, Status::Success, "{l:?}");
    let d = w.final_result("crash-done", Duration::from_secs(20)).await;
    assert_eq!(d.status, Status::Success, "{d:?}");
    assert_eq!(d.rationale, "executed just before the crash");
    assert!(
        d.replay,
        "the stored result is republished, marked as a replay"
    );
    settle().await;
    assert_eq!(w.h.sim.executions("crash-lost"), 1, "lost");
    assert_eq!(w.h.sim.posts("crash-done"), 0, "repeated");
    assert_eq!(w.finals("crash-lost"), 1);
}

/// Item 14 of the levers issue: an approved record planted in the shared store (sealed with
/// the real store key, as whoever stole it would) for a command no agent sent is never
/// executed: no NEEDS_APPROVAL result backs it. Its command ends DENIED and security is told.
#[tokio::test]
async fn an_approved_record_planted_without_its_needs_approval_result_is_never_executed() {
    let store = open(Backend::Redis).await;
    let w = World::start(1, 300, Some(store.clone())).await;
    let real = w.parked("genuine").await;
    let key = command_poller::store::store_key(&w.h.settings.idempotency, None).unwrap();
    let ticket = real.approval.clone().unwrap();
    let sealed = store.record(&ticket.approval_id).await.unwrap().unwrap();
    let mut rec = command_poller::approval::Parked::unseal(&key, &sealed).unwrap();
    // The forger's copy: another action, already approved "by alice".
    rec.action_id = command_poller::intake::ActionId::parse("forged").unwrap();
    rec.action_key = "guest/forged".into();
    rec.approval_id = command_poller::approval::approval_id("guest/forged");
    rec.state = command_poller::approval::State::Approved;
    rec.approvals = vec![command_poller::outcome::ApprovalMark {
        by: w.alice.0.clone(),
        at: "2026-12-06T00:00:00Z".into(),
        reason: "looks fine".into(),
        decision: "approve".into(),
    }];
    rec.decided_at = rec.decided_at.or(Some(rec.parked_at));
    store
        .park(&rec.approval_id, &rec.seal(&key), Duration::from_secs(300))
        .await
        .unwrap();
    let done = w.final_result("forged", Duration::from_secs(20)).await;
    assert_eq!(done.status, Status::Denied, "{done:?}");
    assert!(
        done.rationale.contains("no NEEDS_APPROVAL result"),
        "{}",
        done.rationale
    );
    let alert =
        w.h.wait_until("security's alert", Duration::from_secs(10), |i| {
            i.alerts
                .iter()
                .find(|(_, a)| {
                    a.summary
                        .contains("not backed by its NEEDS_APPROVAL result")
                })
                .map(|(r, a)| (r.clone(), a.clone()))
        })
        .await;
    assert_eq!(alert.1.team, "security");
    assert_eq!(alert.0.routing_key, "security.high");
    settle().await;
    assert_eq!(
        w.h.sim.posts("forged"),
        0,
        "a planted approval was executed"
    );
    assert_eq!(w.finals("forged"), 1);
    // The genuine parked command is untouched: still waiting for its approvers.
    assert_eq!(w.finals("genuine"), 0);
}

/// A clean stop while an approved command is at the bridge lets it finish: its one result is
/// published before the poller is gone, and the next poller neither posts it again nor finds
/// its claim held.
#[tokio::test]
async fn a_stop_while_an_approved_command_is_at_the_bridge_finishes_it_once() {
    let store = open(Backend::Redis).await;
    let mut w = World::start(1, 300, Some(store.clone())).await;
    let parked = w.parked("stop-mid").await;
    w.h.sim
        .fail_next_posts([command_poller::bridge::simulator::Fault::Delay { ms: 2_000 }]);
    let reply = w.ask(&w.alice, approve(&parked, "go")).await;
    assert_eq!(reply.outcome, ReplyOutcome::Approved);
    w.h.wait_until(
        "the approved command at the bridge",
        Duration::from_secs(10),
        |_| (w.h.sim.posts("stop-mid") == 1).then_some(()),
    )
    .await;
    w.h.stop().await;
    let done = w.final_result("stop-mid", Duration::from_secs(5)).await;
    assert_eq!(done.status, Status::Success, "{done:?}");
    let after = store
        .claim("guest/stop-mid", "a-later-replica", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        matches!(after, command_poller::store::Claim::Done(_)),
        "the stop left the command unfinished or its claim held: {after:?}"
    );
    start_again(&mut w).await;
    settle().await;
    assert_eq!(
        w.h.sim.posts("stop-mid"),
        1,
        "posted again after the restart"
    );
    assert_eq!(w.finals("stop-mid"), 1);
}

#[tokio::test]
async fn a_policy_changed_between_approval_and_execution_denies_it() {
    let mut w = World::start(1, 300, Some(open(Backend::Postgres).await)).await;
    let parked = w.parked("pol-late").await;
    halt(&w.h).await;
    let r = w.ask(&w.alice, approve(&parked, "fine as it was")).await;
    assert_eq!(r.outcome, ReplyOutcome::Approved);
    // While halted, the policy file changes and the poller restarts on it.
    w.h.stop().await;
    let text = std::fs::read_to_string(&w.policy).unwrap();
    std::fs::write(
        &w.policy,
        format!("{text}\n# tightened during the incident\n"),
    )
    .unwrap();
    start_again(&mut w).await;
    lift(&w.h).await;
    let done = w.final_result("pol-late", Duration::from_secs(20)).await;
    assert_eq!(done.status, Status::Denied, "{done:?}");
    assert!(
        done.rationale.contains("policy changed"),
        "{}",
        done.rationale
    );
    settle().await;
    assert_eq!(
        w.h.sim.posts("pol-late"),
        0,
        "executed under a policy nobody approved it for"
    );
}
