//! Bad input against the real broker: every refusal is a REJECTED result naming the field
//! (when an action_id can be read) and a dead-letter copy with the reason; nothing is lost.

use sha2::Digest;

use crate::common::*;
use command_poller::outcome::Status;
use lapin::BasicProperties;
use std::time::Duration;

fn json_props() -> BasicProperties {
    BasicProperties::default()
        .with_user_id("guest".into())
        .with_content_type("application/json".into())
}

#[tokio::test]
async fn each_invalid_payload_is_rejected_dead_lettered_and_acked() {
    let h = Harness::start(Options::default()).await;
    let cases: Vec<(&str, String, &str)> = vec![
        ("bad-type-1", r#"{"action_id":"bad-type-1","command_type":"DROP_DATABASE","params":{"service":"google"},"severity":"LOW"}"#.into(), "command_type"),
        ("bad-service-1", r#"{"action_id":"bad-service-1","command_type":"REFRESH_TOKEN","params":{"service":"Google Ads"},"severity":"MEDIUM"}"#.into(), "params.service"),
        ("bad-severity-1", r#"{"action_id":"bad-severity-1","command_type":"REFRESH_TOKEN","params":{"service":"google"},"severity":"CRITICAL"}"#.into(), "severity"),
        ("unknown-field-1", r#"{"action_id":"unknown-field-1","command_type":"REFRESH_TOKEN","params":{"service":"google"},"severity":"MEDIUM","force":true}"#.into(), "force"),
        ("unknown-param-1", r#"{"action_id":"unknown-param-1","command_type":"REFRESH_TOKEN","params":{"service":"google","scope":"admin"},"severity":"MEDIUM"}"#.into(), "params.scope"),
        ("no-service-1", r#"{"action_id":"no-service-1","command_type":"REFRESH_TOKEN","params":{},"severity":"MEDIUM"}"#.into(), "params.service"),
        ("dup-key-1", r#"{"action_id":"dup-key-1","command_type":"CHECK_INTEGRATION_STATUS","command_type":"CONNECT_INTEGRATION","params":{"service":"google"},"severity":"LOW"}"#.into(), "command_type"),
        ("long-service-1", format!(r#"{{"action_id":"long-service-1","command_type":"REFRESH_TOKEN","params":{{"service":"{}"}},"severity":"MEDIUM"}}"#, "a".repeat(65)), "params.service"),
    ];
    for (_, payload, _) in &cases {
        h.publish(payload.as_bytes(), json_props()).await;
    }
    for (id, payload, field) in &cases {
        let r = h.result(id).await;
        assert_eq!(r.status, Status::Rejected, "{id}");
        assert_eq!(
            r.error_field.as_deref(),
            Some(*field),
            "{id}: {}",
            r.rationale
        );
        assert!(r.rationale.contains(field), "{id}: {}", r.rationale);
        let dead = h
            .wait_until(
                &format!("dead letter of {id}"),
                Duration::from_secs(10),
                |i| {
                    i.dead
                        .iter()
                        .find(|d| d.body == payload.as_bytes())
                        .cloned()
                },
            )
            .await;
        assert_eq!(dead.header("x-poller-field").as_deref(), Some(*field));
        assert!(dead.header("x-poller-reason").unwrap().starts_with(field));
        assert_eq!(dead.header("x-original-user-id").as_deref(), Some("guest"));
    }
    // Invalid action_ids can't be correlated: dead letter only.
    let bad_id = r#"{"action_id":"has spaces","command_type":"REFRESH_TOKEN","params":{"service":"google"},"severity":"MEDIUM"}"#;
    h.publish(bad_id.as_bytes(), json_props()).await;
    let dead = h
        .wait_until(
            "dead letter of a bad action_id",
            Duration::from_secs(10),
            |i| i.dead.iter().find(|d| d.body == bad_id.as_bytes()).cloned(),
        )
        .await;
    assert_eq!(dead.header("x-poller-field").as_deref(), Some("action_id"));
    assert_eq!(h.sim.calls().posts.len(), 0);
    assert_eq!(h.queue_depth().await, 0, "every refused message was acked");
}

#[tokio::test]
async fn oversized_non_json_and_wrong_content_type_end_in_the_dead_letter_queue() {
    let h = Harness::start(Options::default()).await;
    let big = format!(
        r#"{{"action_id":"big-1","command_type":"REFRESH_TOKEN","params":{{"service":"google"}},"severity":"MEDIUM","agent_id":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    h.publish(big.as_bytes(), json_props()).await;
    h.publish(b"\xff\xfe not utf-8", json_props()).await;
    h.publish(b"hello, poller", json_props()).await;
    let good_json_wrong_type =
        cmd("ctype-1", "CHECK_INTEGRATION_STATUS", "mailchimp", "LOW").to_string();
    h.publish(
        good_json_wrong_type.as_bytes(),
        BasicProperties::default()
            .with_user_id("guest".into())
            .with_content_type("text/plain".into()),
    )
    .await;

    let dead = h
        .wait_until("4 dead letters", Duration::from_secs(10), |i| {
            (i.dead.len() >= 4).then(|| i.dead.clone())
        })
        .await;
    let fields: Vec<_> = dead
        .iter()
        .map(|d| d.header("x-poller-field").unwrap())
        .collect();
    assert_eq!(
        fields.iter().filter(|f| *f == "payload").count(),
        3,
        "{fields:?}"
    );
    assert!(fields.contains(&"content_type".to_string()));
    // The oversized body is not re-published: its digest and size are.
    let big_dead = dead
        .iter()
        .find(|d| d.header("x-poller-payload-sha256").is_some())
        .unwrap();
    assert!(big_dead.body.is_empty());
    assert!(big_dead
        .header("x-poller-reason")
        .unwrap()
        .contains("exceeds the limit"));
    assert_eq!(
        big_dead.header("x-poller-payload-sha256").unwrap(),
        hex::encode(sha2::Sha256::digest(big.as_bytes()))
    );
    assert_eq!(
        big_dead.header("x-poller-payload-bytes").unwrap(),
        format!("LongLongInt({})", big.len())
    );
    // An oversized payload is not parsed at all, so it gets no result; the wrong content type
    // still names its action.
    let r = h.result("ctype-1").await;
    assert_eq!(r.status, Status::Rejected);
    assert_eq!(r.error_field.as_deref(), Some("content_type"));
    assert_eq!(h.results_for("big-1"), 0);
    // Still running and responsive afterwards.
    h.send(&cmd(
        "after-junk-1",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    ))
    .await;
    assert_eq!(h.result("after-junk-1").await.status, Status::Success);
}

#[tokio::test]
async fn reply_to_direct_reply_to_gets_the_result_and_foreign_queues_are_refused() {
    use futures::StreamExt;
    use lapin::options::*;
    let h = Harness::start(Options::default()).await;
    let ch = h.agent_conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut replies = crate::common::consume_all(&ch, "amq.rabbitmq.reply-to").await;
    let c = cmd("reply-1", "CHECK_INTEGRATION_STATUS", "mailchimp", "LOW").to_string();
    ch.basic_publish(
        h.settings.topology.commands_exchange.as_str().into(),
        "command.check_integration_status".into(),
        Default::default(),
        c.as_bytes(),
        json_props().with_reply_to("amq.rabbitmq.reply-to".into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .expect("reply in time")
        .unwrap()
        .unwrap();
    let r: command_poller::outcome::ResultMessage = serde_json::from_slice(&d.data).unwrap();
    assert_eq!(r.action_id.as_deref(), Some("reply-1"));
    assert_eq!(r.status, Status::Success);
    assert_eq!(
        d.properties
            .correlation_id()
            .as_ref()
            .map(|c| c.to_string())
            .as_deref(),
        Some("reply-1")
    );

    // A reply_to naming another agent's queue (or any queue of the agent's choosing) is refused.
    for (id, rt) in [
        ("reply-2", "reply.other-agent.inbox"),
        ("reply-3", &h.settings.topology.commands_queue as &str),
    ] {
        let c = cmd(id, "CHECK_INTEGRATION_STATUS", "mailchimp", "LOW").to_string();
        h.publish(c.as_bytes(), json_props().with_reply_to(rt.into()))
            .await;
        let r = h.result(id).await;
        assert_eq!(r.status, Status::Rejected, "{id}");
        assert_eq!(r.error_field.as_deref(), Some("reply_to"));
        assert!(r.rationale.contains("reply_to"));
        assert_eq!(h.sim.executions(id), 0);
    }
    assert_eq!(
        h.queue_depth().await,
        0,
        "nothing was written back into the commands queue"
    );
}

#[tokio::test]
async fn reply_to_the_agents_own_queue_is_delivered() {
    use futures::StreamExt;
    use lapin::options::*;
    let h = Harness::start(Options::default()).await;
    let queue = format!("reply.guest.{}", suffix());
    let ch = h.agent_conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap();
    let mut c = crate::common::consume_all(&ch, &queue).await;
    h.publish(
        cmd("own-reply-1", "CONNECT_INTEGRATION", "hubspot", "HIGH")
            .to_string()
            .as_bytes(),
        json_props().with_reply_to(queue.as_str().into()),
    )
    .await;
    let d = tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let r: command_poller::outcome::ResultMessage = serde_json::from_slice(&d.data).unwrap();
    assert_eq!(r.status, Status::Blocked);
}
