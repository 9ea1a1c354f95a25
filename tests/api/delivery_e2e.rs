//! Delivery guarantees against the real broker: concurrency, ack after confirmed publish,
//! reconnect after the broker drops the poller's connections, drain on shutdown, and a command
//! whose result can't be published ending in the dead-letter queue instead of cycling forever.

use crate::common::*;
use command_poller::outcome::Status;
use std::time::{Duration, Instant};

#[tokio::test]
async fn commands_are_processed_concurrently_up_to_max_in_flight() {
    let h = Harness::start(Options {
        sim_latency: Duration::from_millis(300),
        tweak: Box::new(|s| s.processing.max_in_flight = 8),
        ..Default::default()
    })
    .await;
    let t0 = Instant::now();
    for i in 0..16 {
        h.send(&cmd(
            &format!("conc-{i}"),
            "CHECK_INTEGRATION_STATUS",
            "mailchimp",
            "LOW",
        ))
        .await;
    }
    h.wait_until("16 results", Duration::from_secs(20), |i| {
        (i.results.len() >= 16).then_some(())
    })
    .await;
    let calls = h.sim.calls();
    assert!(calls.max_concurrent > 1, "processed one by one");
    assert!(
        calls.max_concurrent <= 8,
        "more in flight than max_in_flight: {}",
        calls.max_concurrent
    );
    // One by one would take 16 x 300 ms.
    assert!(t0.elapsed() < Duration::from_millis(16 * 300));
    for i in 0..16 {
        assert_eq!(h.results_for(&format!("conc-{i}")), 1);
    }
}

#[tokio::test]
async fn the_poller_reconnects_after_the_broker_drops_its_connections() {
    let h = Harness::start(Options::default()).await;
    h.send(&cmd(
        "before-drop-1",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    ))
    .await;
    assert_eq!(h.result("before-drop-1").await.status, Status::Success);
    let name = h.settings.amqp.connection_name.clone();
    let closed = tokio::task::spawn_blocking(move || close_connections(&name))
        .await
        .unwrap();
    assert_eq!(closed, 2, "consume and publish connections");
    // Commands sent while it is down wait in the queue and are processed after the reconnect.
    for i in 0..5 {
        h.send(&cmd(
            &format!("after-drop-{i}"),
            "CHECK_INTEGRATION_STATUS",
            "mailchimp",
            "LOW",
        ))
        .await;
    }
    for i in 0..5 {
        assert_eq!(
            h.result(&format!("after-drop-{i}")).await.status,
            Status::Success
        );
    }
    assert!(h
        .poller_state
        .connected
        .load(std::sync::atomic::Ordering::SeqCst));
}

#[tokio::test]
async fn commands_at_the_bridge_when_the_connection_drops_finish_and_are_not_redone() {
    // Claims that outlive the test: a command whose claim were orphaned by the lost session
    // would wait minutes for it to expire, and this test would time out.
    let h = Harness::start(Options {
        sim_latency: Duration::from_millis(4000),
        tweak: Box::new(|s| {
            s.idempotency.claim_ttl = Duration::from_secs(300);
            s.idempotency.wait_for_in_flight = Duration::from_millis(301_000);
            s.bridge.request_timeout = Duration::from_secs(10);
            s.bridge.retry_budget = Duration::from_secs(20);
        }),
        ..Default::default()
    })
    .await;
    let ids: Vec<String> = (0..3).map(|i| format!("at-bridge-{i}")).collect();
    for id in &ids {
        h.send(&cmd(id, "CHECK_INTEGRATION_STATUS", "mailchimp", "LOW"))
            .await;
    }
    h.wait_until("the bridge calls to start", Duration::from_secs(10), |_| {
        ids.iter().all(|id| h.sim.posts(id) == 1).then_some(())
    })
    .await;
    let name = h.settings.amqp.connection_name.clone();
    let closed = tokio::task::spawn_blocking(move || close_connections(&name))
        .await
        .unwrap();
    assert_eq!(closed, 2, "consume and publish connections");
    // The calls finish on the old session; the redelivered copies find their stored outcome.
    for id in &ids {
        assert_eq!(h.result(id).await.status, Status::Success);
    }
    eventually("the reconnect", Duration::from_secs(20), || {
        h.poller_state
            .connected
            .load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    for id in &ids {
        assert_eq!(h.sim.posts(id), 1, "{id} reached the bridge once");
        assert_eq!(h.sim.executions(id), 1, "{id} executed once");
    }
}

#[tokio::test]
async fn a_slow_bridge_call_across_a_connection_drop_still_ends_with_one_result() {
    // Finding 10: the connection drops during a long bridge call. The redelivered copy waits on
    // the live claim and goes back to the queue until its delivery limit dead-letters it; the
    // original then finishes but could not publish on its closed channel: no result, ever. (These
    // timings are ones check-config now refuses; the original must publish on the new session.)
    let h = Harness::start(Options {
        sim_latency: Duration::from_millis(6000),
        tweak: Box::new(|s| {
            s.topology.delivery_limit = 2;
            s.idempotency.claim_ttl = Duration::from_secs(300);
            s.idempotency.wait_for_in_flight = Duration::from_millis(1000);
            s.bridge.request_timeout = Duration::from_secs(20);
            s.bridge.retry_budget = Duration::from_secs(20);
        }),
        ..Default::default()
    })
    .await;
    let id = "slow-across-drop-1";
    h.send(&cmd(id, "CHECK_INTEGRATION_STATUS", "mailchimp", "LOW"))
        .await;
    h.wait_until("the bridge call to start", Duration::from_secs(10), |_| {
        (h.sim.posts(id) == 1).then_some(())
    })
    .await;
    let name = h.settings.amqp.connection_name.clone();
    let closed = tokio::task::spawn_blocking(move || close_connections(&name))
        .await
        .unwrap();
    assert_eq!(closed, 2, "consume and publish connections");
    let r = h.result(id).await;
    assert_eq!(r.status, Status::Success);
    assert_eq!(h.sim.executions(id), 1);
}

#[tokio::test]
async fn shutdown_drains_in_flight_commands() {
    let mut h = Harness::start(Options {
        sim_latency: Duration::from_millis(1500),
        ..Default::default()
    })
    .await;
    h.send(&cmd(
        "drain-1",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    ))
    .await;
    h.wait_until("the bridge call to start", Duration::from_secs(10), |_| {
        (h.sim.posts("drain-1") == 1).then_some(())
    })
    .await;
    h.stop().await;
    // It finished and published before the poller returned, and the command was acked.
    let r = h.result("drain-1").await;
    assert_eq!(r.status, Status::Success);
    assert_eq!(h.queue_depth().await, 0);
}

#[tokio::test]
async fn commands_arriving_after_shutdown_stay_queued() {
    let mut h = Harness::start(Options::default()).await;
    h.stop().await;
    h.send(&cmd(
        "after-stop-1",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    ))
    .await;
    settle().await;
    assert_eq!(h.queue_depth().await, 1);
    assert_eq!(h.results_for("after-stop-1"), 0);
}

#[tokio::test]
async fn an_unpublishable_result_dead_letters_the_command_after_the_delivery_limit() {
    // No queue takes results: every mandatory publish is returned, the command is never acked
    // as done, and after the delivery limit the broker dead-letters it with the reason.
    let h = Harness::start(Options {
        tweak: Box::new(|s| {
            s.topology.delivery_limit = 2;
        }),
        ..Default::default()
    })
    .await;
    // The poller binds at connect: unbind after that.
    h.wait_connected().await;
    let ch = h.agent_conn.create_channel().await.unwrap();
    ch.queue_unbind(
        h.settings.topology.results_queue.as_str().into(),
        h.settings.topology.results_exchange.as_str().into(),
        "result.#".into(),
        Default::default(),
    )
    .await
    .unwrap();
    let c = cmd(
        "unroutable-1",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    );
    h.send(&c).await;
    let dead = h
        .wait_until(
            "the command in the dead-letter queue",
            Duration::from_secs(30),
            |i| {
                i.dead
                    .iter()
                    .find(|d| d.body == c.to_string().as_bytes())
                    .cloned()
            },
        )
        .await;
    assert_eq!(
        dead.header("x-first-death-reason").as_deref(),
        Some("delivery_limit")
    );
    assert_eq!(h.queue_depth().await, 0);
    // Bridge dedup: the action ran once however often it was redelivered.
    assert_eq!(h.sim.executions("unroutable-1"), 1);
}

#[tokio::test]
async fn a_result_the_broker_nacks_for_a_while_goes_out_without_spending_deliveries() {
    // A quorum queue nacks what it can't take now: no leader during an election, or full
    // under reject-publish. Each nack requeued the command, spending one of its deliveries:
    // a result refused for a few seconds dead-lettered a command that had run, and its agent
    // never heard (the cluster suite's rolling restart lost 2 of 600 this way).
    let h = Harness::start(Options {
        tweak: Box::new(|s| {
            s.topology.delivery_limit = 2;
            s.processing.publish_failure_pause = Duration::from_millis(100);
        }),
        ..Default::default()
    })
    .await;
    h.wait_connected().await;
    // A full queue that refuses more (reject-publish), bound to the results exchange: every
    // result is nacked (it still reaches the results queue).
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let ch = h.agent_conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let full = format!("{}.full", h.settings.topology.results_queue);
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(
        full.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    ch.queue_bind(
        full.as_str().into(),
        h.settings.topology.results_exchange.as_str().into(),
        "result.#".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // Filled until it refuses.
    let mut refused = false;
    for _ in 0..10 {
        let c = ch
            .basic_publish(
                "".into(),
                full.as_str().into(),
                BasicPublishOptions::default(),
                b"filler",
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        if c.is_nack() {
            refused = true;
            break;
        }
    }
    assert!(refused, "the full queue refuses publishes");
    let id = "nacked-result-1";
    h.send(&cmd(id, "CHECK_INTEGRATION_STATUS", "mailchimp", "LOW"))
        .await;
    h.wait_until("the bridge call", Duration::from_secs(10), |_| {
        (h.sim.executions(id) == 1).then_some(())
    })
    .await;
    // The refusal lasts 3 s (the fault's length, not a wait for an event): long enough for
    // the old code to requeue twice and dead-letter the command.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ch.queue_delete(full.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let r = h.result(id).await;
    assert_eq!(r.status, Status::Success);
    assert!(!r.replay, "the first delivery published it: {r:?}");
    assert_eq!(h.sim.executions(id), 1);
    let inbox = h.inbox.lock().unwrap();
    assert!(
        inbox
            .dead
            .iter()
            .all(|d| !d.body.windows(id.len()).any(|w| w == id.as_bytes())),
        "the command was dead-lettered"
    );
    // Every copy the nacks left in the results queue is one message: one message_id.
    let ids: std::collections::BTreeSet<_> = inbox
        .results
        .iter()
        .filter(|(_, r)| r.action_id.as_deref() == Some(id))
        .map(|(m, _)| m.message_id.clone())
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "copies of one result carry one message_id: {ids:?}"
    );
}

#[tokio::test]
async fn bridge_connection_refused_is_retried_then_failed() {
    // Point the poller at a port nobody listens on.
    let mut h = Harness::start(Options {
        start_poller: false,
        tweak: Box::new(|s| s.bridge.retry_budget = Duration::from_secs(1)),
        ..Default::default()
    })
    .await;
    let policy =
        std::sync::Arc::new(command_poller::policy::Policy::load(&h.settings.policy.file).unwrap());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url =
        url::Url::parse(&format!("http://{}/exec", listener.local_addr().unwrap())).unwrap();
    drop(listener);
    let bridge = std::sync::Arc::new(
        command_poller::bridge::AppsScriptBridge::new(command_poller::bridge::BridgeClientConfig {
            url: dead_url,
            secret: h.secret.clone(),
            request_timeout: Duration::from_secs(2),
            retry_budget: Duration::from_secs(1),
            min_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
        })
        .unwrap(),
    );
    let poller = command_poller::worker::Poller::new(
        h.settings.clone(),
        policy,
        command_poller::compose::build_panel(
            &h.settings.panel,
            &h.settings.secrets.judge_api_keys,
            h.stores.windows.clone(),
        )
        .unwrap(),
        bridge,
        h.stores.clone(),
        None,
    );
    let token = h.shutdown.clone();
    h.poller_task = Some(tokio::spawn(async move { poller.run(token).await }));
    h.send(&cmd(
        "refused-1",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    ))
    .await;
    let r = h.result("refused-1").await;
    assert_eq!(r.status, Status::Failed);
    let b = r.bridge.unwrap();
    assert!(b.attempts > 1);
    assert!(b.error.unwrap().contains("transport error on the POST leg"));
}

/// `amqp.urls`: a first node that refuses connections is skipped; the poller works on the next
/// and `/status` (the poller's state) names it, password masked.
#[tokio::test]
async fn a_dead_first_node_is_skipped_and_the_node_in_use_is_shown() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let h = Harness::start(Options {
        tweak: Box::new(move |s| {
            s.amqp.urls = vec![
                format!("amqp://guest:guest@127.0.0.1:{dead_port}/%2f"),
                AMQP.to_owned(),
            ]
        }),
        ..Default::default()
    })
    .await;
    h.send(&cmd(
        "urls-1",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    ))
    .await;
    assert_eq!(h.result("urls-1").await.status, Status::Success);
    let node = h.poller_state.broker_node.lock().unwrap().clone();
    assert_eq!(
        node.as_deref(),
        Some("amqp://guest:***@127.0.0.1:5672/%2f"),
        "the live node, password masked"
    );
}
