//! Idempotency, the same tests against each store: embedded (redb), Redis and PostgreSQL (the
//! private instances `scripts/ensure-stores.sh` starts).

use crate::common::*;
use command_poller::outcome::Status;
use command_poller::store::{self, Backend, Claim, IdempotencySettings, ResultStore, StoreError};
use std::sync::Arc;
use std::time::Duration;

fn settings(backend: Backend) -> IdempotencySettings {
    let sfx = suffix();
    IdempotencySettings {
        backend,
        path: std::env::temp_dir().join(format!("idem-{sfx}.redb")),
        url: match backend {
            Backend::Embedded => String::new(),
            Backend::Redis => REDIS.into(),
            Backend::Postgres => POSTGRES.into(),
        },
        key_prefix: format!("t-{sfx}"),
        ca_file: None,
        pool_size: 4,
        key_env: "POLLER_STORE_KEY_UNSET_IN_TESTS".into(),
        allow_embedded_in_production: false,
        retention: Duration::from_secs(60),
        claim_ttl: Duration::from_secs(120),
        wait_for_in_flight: Duration::from_millis(10_000),
        max_waiting_duplicates_per_agent: 2,
    }
}

async fn store(backend: Backend) -> (Arc<dyn ResultStore>, IdempotencySettings) {
    let s = settings(backend);
    (
        store::open(&s)
            .await
            .unwrap_or_else(|e| panic!("{backend:?}: {e}")),
        s,
    )
}

const ALL: [Backend; 3] = [Backend::Embedded, Backend::Redis, Backend::Postgres];

#[tokio::test]
async fn the_approval_records_contract_holds_for_every_backend() {
    for backend in ALL {
        let (s, _) = store(backend).await;
        let (other, _) = store(backend).await;
        let ttl = Duration::from_secs(60);
        // Parking is insert-if-absent: a second park returns the first record.
        assert_eq!(
            s.park("ap-1", "v1", ttl).await.unwrap(),
            "v1",
            "{backend:?}"
        );
        assert_eq!(
            s.park("ap-1", "v2", ttl).await.unwrap(),
            "v1",
            "{backend:?}"
        );
        assert_eq!(s.record("ap-1").await.unwrap().as_deref(), Some("v1"));
        assert_eq!(s.record("ap-none").await.unwrap(), None);
        // Compare-and-set: only from the value that is there.
        assert!(
            !s.swap("ap-1", "stale", "v3", true).await.unwrap(),
            "{backend:?}"
        );
        assert!(
            s.swap("ap-1", "v1", "v3", true).await.unwrap(),
            "{backend:?}"
        );
        assert!(
            !s.swap("ap-1", "v1", "v4", true).await.unwrap(),
            "{backend:?}: twice"
        );
        assert!(!s.swap("ap-none", "", "v", true).await.unwrap());
        s.park("ap-2", "w1", ttl).await.unwrap();
        let mut open = s.open_records().await.unwrap();
        open.sort();
        assert_eq!(open, ["v3", "w1"], "{backend:?}");
        // Closed: no longer listed, still readable.
        assert!(s.swap("ap-1", "v3", "v5", false).await.unwrap());
        assert_eq!(s.open_records().await.unwrap(), ["w1"], "{backend:?}");
        assert_eq!(s.record("ap-1").await.unwrap().as_deref(), Some("v5"));
        // Another prefix (another system sharing the store) sees none of it.
        assert!(
            other.open_records().await.unwrap().is_empty(),
            "{backend:?}"
        );
        assert_eq!(other.record("ap-1").await.unwrap(), None, "{backend:?}");
        // The stored result reads back without a claim.
        s.claim("agent/r1", "o", ttl).await.unwrap();
        assert_eq!(s.result("agent/r1").await.unwrap(), None);
        s.complete(
            "agent/r1",
            "o",
            "{}",
            ttl,
            command_poller::store::Durability::Synced,
            command_poller::store::ClaimAfter::Ended,
        )
        .await
        .unwrap();
        assert_eq!(s.result("agent/r1").await.unwrap().as_deref(), Some("{}"));
    }
}

#[tokio::test]
async fn the_store_contract_holds_for_every_backend() {
    for backend in ALL {
        let (s, cfg) = store(backend).await;
        let ttl = Duration::from_secs(60);
        assert_eq!(
            s.claim("agent/a1", "r1", ttl).await.unwrap(),
            Claim::Mine,
            "{backend:?}"
        );
        assert_eq!(
            s.claim("agent/a1", "r1", ttl).await.unwrap(),
            Claim::Mine,
            "{backend:?}: own claim again"
        );
        assert_eq!(
            s.claim("agent/a1", "r2", ttl).await.unwrap(),
            Claim::Busy("r1".into()),
            "{backend:?}"
        );
        // Another agent's same action_id is a different key.
        assert_eq!(
            s.claim("other/a1", "r2", ttl).await.unwrap(),
            Claim::Mine,
            "{backend:?}"
        );
        // Releasing someone else's claim does nothing; one's own frees it.
        s.release("agent/a1", "r2").await.unwrap();
        assert_eq!(
            s.claim("agent/a1", "r2", ttl).await.unwrap(),
            Claim::Busy("r1".into()),
            "{backend:?}"
        );
        s.release("agent/a1", "r1").await.unwrap();
        assert_eq!(
            s.claim("agent/a1", "r2", ttl).await.unwrap(),
            Claim::Mine,
            "{backend:?}"
        );
        s.complete(
            "agent/a1",
            "r2",
            r#"{"status":"SUCCESS"}"#,
            Duration::from_secs(60),
            command_poller::store::Durability::Synced,
            command_poller::store::ClaimAfter::Ended,
        )
        .await
        .unwrap();
        assert_eq!(
            s.claim("agent/a1", "r3", ttl).await.unwrap(),
            Claim::Done(r#"{"status":"SUCCESS"}"#.into()),
            "{backend:?}"
        );
        // A crashed replica's claim expires.
        assert_eq!(
            s.claim("agent/a2", "dead", Duration::from_millis(200))
                .await
                .unwrap(),
            Claim::Mine
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            s.claim("agent/a2", "r1", ttl).await.unwrap(),
            Claim::Mine,
            "{backend:?}: expired claim"
        );
        // Results expire after the retention.
        s.claim("agent/a3", "r1", ttl).await.unwrap();
        s.complete(
            "agent/a3",
            "r1",
            "{}",
            Duration::from_secs(1),
            command_poller::store::Durability::Synced,
            command_poller::store::ClaimAfter::Ended,
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(
            s.claim("agent/a3", "r1", ttl).await.unwrap(),
            Claim::Mine,
            "{backend:?}: retention"
        );
        let _ = std::fs::remove_file(&cfg.path);
    }
}

/// A stale owner (its claim expired and someone else took it, or nobody holds it any more) can
/// neither store a result nor end the new holder's claim; the holder can, keeping or dropping
/// its claim.
#[tokio::test]
async fn every_backend_refuses_a_complete_from_a_stale_owner() {
    for backend in ALL {
        let (s, cfg) = store(backend).await;
        let ttl = Duration::from_secs(60);
        let keep = Duration::from_secs(60);
        assert_eq!(
            s.claim("agent/s1", "old", Duration::from_millis(200))
                .await
                .unwrap(),
            Claim::Mine
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        // Expired and nobody else holds it: still not the old owner's to complete.
        let refused = s
            .complete(
                "agent/s1",
                "old",
                "{\"by\":\"old\"}",
                keep,
                command_poller::store::Durability::Synced,
                command_poller::store::ClaimAfter::Ended,
            )
            .await;
        assert!(
            matches!(refused, Err(StoreError::NotOwner)),
            "{backend:?}: {refused:?}"
        );
        assert_eq!(
            s.claim("agent/s1", "new", ttl).await.unwrap(),
            Claim::Mine,
            "{backend:?}"
        );
        let refused = s
            .complete(
                "agent/s1",
                "old",
                "{\"by\":\"old\"}",
                keep,
                command_poller::store::Durability::Synced,
                command_poller::store::ClaimAfter::Ended,
            )
            .await;
        assert!(
            matches!(refused, Err(StoreError::NotOwner)),
            "{backend:?}: {refused:?}"
        );
        assert_eq!(
            s.claim("agent/s1", "third", ttl).await.unwrap(),
            Claim::Busy("new".into()),
            "{backend:?}: the stale complete neither stored a result nor ended the new claim"
        );
        // The holder stores and keeps its claim (before publishing), then completes.
        s.complete(
            "agent/s1",
            "new",
            "{\"by\":\"new\",\"published\":false}",
            keep,
            command_poller::store::Durability::Synced,
            command_poller::store::ClaimAfter::Kept,
        )
        .await
        .unwrap();
        assert_eq!(
            s.hold("agent/s1", "third", ttl).await.unwrap(),
            Claim::Busy("new".into()),
            "{backend:?}: the claim was kept"
        );
        s.complete(
            "agent/s1",
            "new",
            "{\"by\":\"new\"}",
            keep,
            command_poller::store::Durability::Buffered,
            command_poller::store::ClaimAfter::Ended,
        )
        .await
        .unwrap();
        assert_eq!(
            s.claim("agent/s1", "third", ttl).await.unwrap(),
            Claim::Done("{\"by\":\"new\"}".into()),
            "{backend:?}"
        );
        // Done, but the claim is gone: a stale second complete is refused too.
        let refused = s
            .complete(
                "agent/s1",
                "new",
                "{}",
                keep,
                command_poller::store::Durability::Buffered,
                command_poller::store::ClaimAfter::Ended,
            )
            .await;
        assert!(
            matches!(refused, Err(StoreError::NotOwner)),
            "{backend:?}: {refused:?}"
        );
        // `hold` takes a free key whatever is stored (to republish an unconfirmed outcome).
        assert_eq!(
            s.hold("agent/s1", "third", ttl).await.unwrap(),
            Claim::Mine,
            "{backend:?}"
        );
        let _ = std::fs::remove_file(&cfg.path);
    }
}

#[tokio::test]
async fn the_embedded_store_survives_a_restart() {
    let cfg = settings(Backend::Embedded);
    {
        let s = store::open(&cfg).await.unwrap();
        s.claim("agent/x", "old-process", Duration::from_secs(600))
            .await
            .unwrap();
        s.claim("agent/y", "old-process", Duration::from_secs(600))
            .await
            .unwrap();
        s.complete(
            "agent/y",
            "old-process",
            r#"{"kept":true}"#,
            Duration::from_secs(60),
            command_poller::store::Durability::Synced,
            command_poller::store::ClaimAfter::Ended,
        )
        .await
        .unwrap();
    }
    let s = store::open(&cfg).await.unwrap();
    assert_eq!(
        s.claim("agent/y", "new", Duration::from_secs(60))
            .await
            .unwrap(),
        Claim::Done(r#"{"kept":true}"#.into())
    );
    // The dead process's claim does not block the redelivery.
    assert_eq!(
        s.claim("agent/x", "new", Duration::from_secs(60))
            .await
            .unwrap(),
        Claim::Mine
    );
    let _ = std::fs::remove_file(&cfg.path);
}

#[tokio::test]
async fn a_concluded_action_is_replayed_not_redone_with_every_backend() {
    for backend in ALL {
        let (s, cfg) = store(backend).await;
        let h = Harness::start(Options {
            store: Some(s),
            ..Default::default()
        })
        .await;
        h.send(&cmd("idem-1", "REFRESH_TOKEN", "google", "MEDIUM"))
            .await;
        let first = h.result("idem-1").await;
        assert_eq!(first.status, Status::Success);
        assert!(!first.replay);
        h.send(&cmd("idem-1", "REFRESH_TOKEN", "google", "MEDIUM"))
            .await;
        h.wait_until("the replay", Duration::from_secs(15), |i| {
            (i.results
                .iter()
                .filter(|(_, r)| r.action_id.as_deref() == Some("idem-1"))
                .count()
                == 2)
                .then_some(())
        })
        .await;
        let all: Vec<_> = h
            .inbox
            .lock()
            .unwrap()
            .results
            .iter()
            .filter(|(_, r)| r.action_id.as_deref() == Some("idem-1"))
            .map(|(_, r)| r.clone())
            .collect();
        let replay = all.iter().find(|r| r.replay).expect("a replay");
        assert_eq!(replay.status, Status::Success, "{backend:?}");
        assert_eq!(replay.tool_result, first.tool_result);
        assert_eq!(
            h.sim.posts("idem-1"),
            1,
            "{backend:?}: judged and executed once"
        );
        // Not alerted twice, and the queue is empty (the duplicate was acked).
        assert_eq!(h.queue_depth().await, 0);
        let _ = std::fs::remove_file(&cfg.path);
    }
}

#[tokio::test]
async fn a_duplicate_in_flight_waits_and_never_runs_in_parallel_with_every_backend() {
    for backend in ALL {
        let (s, cfg) = store(backend).await;
        let h = Harness::start(Options {
            store: Some(s),
            start_poller: false,
            sim_latency: Duration::from_millis(600),
            ..Default::default()
        })
        .await;
        let r1 = h.spawn_replica("a", None);
        let r2 = h.spawn_replica("b", None);
        eventually("replicas", Duration::from_secs(15), || {
            r1.connected() && r2.connected()
        })
        .await;
        // Each copy is its own delivery with its own claim, whichever replica takes it.
        h.send(&cmd(
            "twin-1",
            "CHECK_INTEGRATION_STATUS",
            "mailchimp",
            "LOW",
        ))
        .await;
        h.send(&cmd(
            "twin-1",
            "CHECK_INTEGRATION_STATUS",
            "mailchimp",
            "LOW",
        ))
        .await;
        h.wait_until("two results", Duration::from_secs(20), |i| {
            (i.results
                .iter()
                .filter(|(_, r)| r.action_id.as_deref() == Some("twin-1"))
                .count()
                == 2)
                .then_some(())
        })
        .await;
        let replays = h
            .inbox
            .lock()
            .unwrap()
            .results
            .iter()
            .filter(|(_, r)| r.replay)
            .count();
        assert_eq!(replays, 1, "{backend:?}");
        let calls = h.sim.calls();
        assert_eq!(
            calls.posts.get("twin-1"),
            Some(&1),
            "{backend:?}: the duplicate never reached the bridge"
        );
        assert_eq!(calls.max_concurrent, 1);
        r1.stop().await;
        r2.stop().await;
        let _ = std::fs::remove_file(&cfg.path);
    }
}

#[tokio::test]
async fn a_slow_command_keeps_its_claim_past_the_ttl_with_every_backend() {
    for backend in ALL {
        let (s, cfg) = store(backend).await;
        // The bridge takes more than twice the claim TTL: only renewals keep the duplicate out.
        let h = Harness::start(Options {
            store: Some(s),
            start_poller: false,
            sim_latency: Duration::from_millis(7000),
            tweak: Box::new(|s| {
                s.idempotency.claim_ttl = Duration::from_secs(3);
                s.idempotency.wait_for_in_flight = Duration::from_millis(3500);
                s.bridge.request_timeout = Duration::from_secs(15);
                s.bridge.retry_budget = Duration::from_secs(20);
            }),
            ..Default::default()
        })
        .await;
        let r1 = h.spawn_replica("a", None);
        let r2 = h.spawn_replica("b", None);
        eventually("replicas", Duration::from_secs(15), || {
            r1.connected() && r2.connected()
        })
        .await;
        let twin = cmd("slow-twin", "CHECK_INTEGRATION_STATUS", "mailchimp", "LOW");
        h.send(&twin).await;
        h.wait_until("the bridge call", Duration::from_secs(10), |_| {
            (h.sim.posts("slow-twin") == 1).then_some(())
        })
        .await;
        h.send(&twin).await;
        h.wait_until("two results", Duration::from_secs(30), |i| {
            (i.results
                .iter()
                .filter(|(_, r)| r.action_id.as_deref() == Some("slow-twin"))
                .count()
                == 2)
                .then_some(())
        })
        .await;
        let calls = h.sim.calls();
        assert_eq!(
            calls.posts.get("slow-twin"),
            Some(&1),
            "{backend:?}: the duplicate waited for the renewed claim"
        );
        assert_eq!(calls.max_concurrent, 1, "{backend:?}");
        let replays = h
            .inbox
            .lock()
            .unwrap()
            .results
            .iter()
            .filter(|(_, r)| r.replay)
            .count();
        assert_eq!(replays, 1, "{backend:?}");
        r1.stop().await;
        r2.stop().await;
        let _ = std::fs::remove_file(&cfg.path);
    }
}

#[tokio::test]
async fn a_value_planted_in_the_store_is_refused_not_replayed_with_every_backend() {
    // Low finding: whoever could write to Redis or PostgreSQL could plant a "result" that was
    // replayed to the agent as the outcome of its action. Stored outcomes are now sealed (HMAC).
    for backend in ALL {
        let (store, _) = store(backend).await;
        let h = Harness::start(Options {
            store: Some(store.clone()),
            ..Default::default()
        })
        .await;
        let id = "planted-1";
        let planted = serde_json::json!({
            "published": true,
            "result": {
                "action_id": id, "command_type": "REFRESH_TOKEN", "service": "google",
                "agent": {"id": "guest", "verified": true}, "status": "SUCCESS",
                "rationale": "planted", "tool_result": {"status": "success", "message": "planted"},
                "received_at": "x", "completed_at": "x", "poller_instance": "attacker"
            }
        })
        .to_string();
        let key = format!("guest/{id}");
        assert_eq!(
            store
                .claim(&key, "attacker", Duration::from_secs(60))
                .await
                .unwrap(),
            Claim::Mine
        );
        store
            .complete(
                &key,
                "attacker",
                &planted,
                Duration::from_secs(60),
                command_poller::store::Durability::Synced,
                command_poller::store::ClaimAfter::Ended,
            )
            .await
            .unwrap();
        h.send(&cmd(id, "REFRESH_TOKEN", "google", "MEDIUM")).await;
        let r = h.result(id).await;
        assert_eq!(r.status, Status::UnknownOutcome, "{backend:?}: {r:?}");
        assert!(r.rationale.contains("integrity"), "{}", r.rationale);
        assert_ne!(r.rationale, "planted");
        assert_eq!(h.sim.executions(id), 0, "{backend:?}: not executed either");
        let alerts = h
            .wait_until("the alerts", Duration::from_secs(10), |i| {
                let a: Vec<_> = i
                    .alerts
                    .iter()
                    .filter(|(_, a)| a.action_id.as_deref() == Some(id))
                    .map(|(rk, _)| rk.routing_key.clone())
                    .collect();
                (a.len() == 2).then_some(a)
            })
            .await;
        assert!(alerts.contains(&"security.high".to_string()), "{alerts:?}");
        // A genuine outcome still replays.
        h.send(&cmd(
            "genuine-1",
            "CHECK_INTEGRATION_STATUS",
            "google",
            "LOW",
        ))
        .await;
        assert_eq!(h.result("genuine-1").await.status, Status::Success);
        h.send(&cmd(
            "genuine-1",
            "CHECK_INTEGRATION_STATUS",
            "google",
            "LOW",
        ))
        .await;
        let replay = h
            .wait_until("the replay", Duration::from_secs(10), |i| {
                i.results
                    .iter()
                    .filter(|(_, r)| r.action_id.as_deref() == Some("genuine-1"))
                    .nth(1)
                    .map(|(_, r)| r.clone())
            })
            .await;
        assert!(replay.replay, "{backend:?}");
        assert_eq!(h.sim.executions("genuine-1"), 1);
    }
}

#[tokio::test]
async fn readyz_says_not_ready_while_the_store_is_unreachable() {
    let relay = Relay::start(crate::common::REDIS_PORT).await;
    let mut s = settings(Backend::Redis);
    s.url = format!("redis://127.0.0.1:{}", relay.port);
    let store = store::open(&s).await.unwrap();
    let h = Harness::start(Options {
        store: Some(store),
        // The sweeper's calls every 200 ms (the failed reconnect they trigger during the outage
        // used to hold the store down for a minute after it came back).
        ..Default::default()
    })
    .await;
    let stop = tokio_util::sync::CancellationToken::new();
    let addr = command_poller::health::serve(
        ([127, 0, 0, 1], 0).into(),
        h.poller_state.clone(),
        "r".into(),
        stop.clone(),
    )
    .await
    .unwrap();
    command_poller::tls::ensure_crypto_provider();
    let readyz = || async move {
        reqwest::get(format!("http://{addr}/readyz"))
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    let wait_for = |want: u16| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let got = readyz().await;
            if got == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "readyz {got}, wanted {want}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    wait_for(200).await;
    relay.set(false);
    wait_for(503).await;
    relay.set(true);
    wait_for(200).await;
    stop.cancel();
}

/// Item 5 of the levers issue: copies of one slow action used to park in delivery slots
/// waiting for it (admission counts an action_id once), so every other command waited for the
/// slow one. Now at most `max_waiting_duplicates_per_agent` copies wait; the rest go to the
/// dead-letter queue at once, naming the original, and other commands flow meanwhile.
#[tokio::test]
async fn copies_of_a_slow_action_wait_a_few_at_a_time_and_never_starve_other_commands() {
    let h = Harness::start(Options {
        tweak: Box::new(|s| {
            s.processing.max_in_flight = 4;
            s.idempotency.max_waiting_duplicates_per_agent = 2;
        }),
        ..Default::default()
    })
    .await;
    let slow = cmd("slow-1", "CHECK_INTEGRATION_STATUS", "mailchimp", "LOW");
    h.sim
        .fail_next_posts([command_poller::bridge::simulator::Fault::Delay { ms: 3_000 }]);
    h.send(&slow).await;
    h.wait_until(
        "the original at the bridge",
        Duration::from_secs(10),
        |_| (h.sim.posts("slow-1") == 1).then_some(()),
    )
    .await;
    for _ in 0..10 {
        h.send(&slow).await;
    }
    h.send(&cmd(
        "other-1",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    ))
    .await;
    let copies = h
        .wait_until("8 copies dead-lettered", Duration::from_secs(10), |i| {
            let d: Vec<_> = i
                .dead
                .iter()
                .filter(|d| d.header("x-poller-field").as_deref() == Some("action_id"))
                .cloned()
                .collect();
            (d.len() >= 8).then_some(d)
        })
        .await;
    for d in &copies {
        let why = d.header("x-poller-reason").unwrap();
        assert!(why.contains("a copy of action slow-1"), "{why}");
    }
    let other = h.result("other-1").await;
    assert_eq!(other.status, Status::Success, "{other:?}");
    assert!(
        h.inbox
            .lock()
            .unwrap()
            .results
            .iter()
            .all(|(_, r)| r.action_id.as_deref() != Some("slow-1")),
        "another agent's command waited for the slow action (its result came first)"
    );
    // The original concludes once; the two copies that waited replay it.
    h.wait_until(
        "the original and two replays",
        Duration::from_secs(20),
        |i| {
            let n = i
                .results
                .iter()
                .filter(|(_, r)| r.action_id.as_deref() == Some("slow-1"))
                .count();
            (n == 3).then_some(())
        },
    )
    .await;
    settle().await;
    let results = h.inbox.lock().unwrap().results.clone();
    let slow: Vec<_> = results
        .iter()
        .filter(|(_, r)| r.action_id.as_deref() == Some("slow-1"))
        .collect();
    assert_eq!(slow.len(), 3, "{slow:?}");
    assert!(
        slow.iter().all(|(_, r)| r.status == Status::Success),
        "{slow:?}"
    );
    assert_eq!(slow.iter().filter(|(_, r)| r.replay).count(), 2);
    assert_eq!(h.sim.posts("slow-1"), 1);
    assert_eq!(
        h.inbox.lock().unwrap().dead.len(),
        8,
        "only the copies beyond the cap are dead-lettered"
    );
}
