//! The runbook's three SOPs end to end against the real broker, plus the identity, severity
//! and reply_to rules of the core issue.

use crate::common::*;
use command_poller::outcome::{Priority, Status, Vote};
use command_poller::testing::{scripted_panel, Script};
use lapin::BasicProperties;
use std::time::Duration;

#[tokio::test]
async fn sop_int_01_check_integration_status_succeeds_silently() {
    let h = Harness::start(Options::default()).await;
    h.send(&cmd(
        "status-check-mailchimp-123",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    ))
    .await;
    let r = h.result("status-check-mailchimp-123").await;
    assert_eq!(r.status, Status::Success);
    let tool = r.tool_result.as_ref().expect("tool_result on success");
    assert_eq!(tool["status"], "success");
    assert_eq!(tool["integration_status"], "CONNECTED");
    assert!(tool["last_checked"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(r.judges.is_empty(), "low-risk check bypasses the judges");
    assert_eq!(r.agent.as_ref().unwrap().id, "guest");
    assert!(r.agent.as_ref().unwrap().verified);
    assert_eq!(r.poller_instance, h.settings.instance_id);
    assert_eq!(h.sim.executions("status-check-mailchimp-123"), 1);
    // Routing, correlation and persistence of the result message.
    let (rx, _) = h.inbox.lock().unwrap().results[0].clone();
    assert_eq!(rx.routing_key, "result.success");
    assert_eq!(
        rx.correlation_id.as_deref(),
        Some("status-check-mailchimp-123")
    );
    assert_eq!(rx.delivery_mode, Some(2));
    // Silent: no alert. Give a stray alert time to show up before asserting none did.
    settle().await;
    assert!(h.alerts_for("status-check-mailchimp-123").is_empty());
    assert_eq!(h.queue_depth().await, 0, "acked");
}

#[tokio::test]
async fn sop_int_02_refresh_token_approved_by_the_judges() {
    let h = Harness::start(Options::default()).await;
    h.send(&cmd(
        "token-refresh-google-456",
        "REFRESH_TOKEN",
        "google",
        "MEDIUM",
    ))
    .await;
    let r = h.result("token-refresh-google-456").await;
    assert_eq!(r.status, Status::Success, "{r:?}");
    let tool = r.tool_result.unwrap();
    assert_eq!(tool["message"], "Token for google refreshed successfully.");
    assert_eq!(tool["new_token_expires_in"], 3600);
    let names: Vec<_> = r.judges.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, ["security", "compliance", "business"]);
    assert!(
        r.judges
            .iter()
            .filter(|j| j.verdict == Vote::Approve)
            .count()
            >= 2
    );
    assert_eq!(h.sim.executions("token-refresh-google-456"), 1);
}

#[tokio::test]
async fn sop_int_02_refresh_token_not_approved_needs_approval_and_alerts_ops() {
    let h = Harness::start(Options::default()).await;
    // Neither security nor business approve an integration the business doesn't run.
    h.send(&cmd(
        "token-refresh-salesforce-1",
        "REFRESH_TOKEN",
        "salesforce",
        "MEDIUM",
    ))
    .await;
    let r = h.result("token-refresh-salesforce-1").await;
    assert_eq!(r.status, Status::NeedsApproval);
    assert!(r.tool_result.is_none());
    assert!(r.rationale.contains("human"), "{}", r.rationale);
    // The rule judges' service lists are hard rules: the first one vetoes and settles it.
    let vetoed: Vec<_> = r
        .judges
        .iter()
        .filter(|j| j.verdict == Vote::Veto)
        .map(|j| (j.name.as_str(), j.rule.as_deref()))
        .collect();
    assert!(
        vetoed.contains(&("security", Some("allowed_services")))
            || vetoed.contains(&("business", Some("allowed_services"))),
        "{vetoed:?}"
    );
    assert!(r.rationale.contains("allowed_services"), "{}", r.rationale);
    let alerts = h
        .wait_until("ops alert", Duration::from_secs(10), |i| {
            let a: Vec<_> = i
                .alerts
                .iter()
                .filter(|(_, a)| a.action_id.as_deref() == Some("token-refresh-salesforce-1"))
                .cloned()
                .collect();
            (!a.is_empty()).then_some(a)
        })
        .await;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].0.routing_key, "ops.normal");
    assert_eq!(alerts[0].1.status, Some(Status::NeedsApproval));
    assert!(alerts[0].1.summary.contains("guest"));
    assert!(!alerts[0].1.action_required.is_empty());
    assert_eq!(
        h.sim.calls().total_executions(),
        0,
        "never reached the bridge"
    );
}

#[tokio::test]
async fn sop_int_03_connect_integration_is_blocked_and_alerts_security_and_engineering() {
    let h = Harness::start(Options::default()).await;
    h.send(&cmd(
        "connect-salesforce-789",
        "CONNECT_INTEGRATION",
        "salesforce",
        "HIGH",
    ))
    .await;
    let r = h.result("connect-salesforce-789").await;
    assert_eq!(r.status, Status::Blocked);
    assert_eq!(
        r.rationale,
        "Action blocked by policy: New integrations require manual security and permissions review."
    );
    assert!(r.judges.is_empty());
    let alerts = h
        .wait_until("two alerts", Duration::from_secs(10), |i| {
            let a: Vec<_> = i
                .alerts
                .iter()
                .filter(|(_, a)| a.action_id.as_deref() == Some("connect-salesforce-789"))
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
    for (_, a) in &alerts {
        assert_eq!(a.priority, Priority::High);
        assert_eq!(a.service.as_deref(), Some("salesforce"));
        assert_eq!(a.agent.as_ref().unwrap().id, "guest");
        assert!(
            a.summary.contains("salesforce") && a.summary.contains("guest"),
            "{}",
            a.summary
        );
    }
    assert_eq!(h.sim.calls().posts.len(), 0, "the bridge never heard of it");
}

#[tokio::test]
async fn connect_sent_as_low_is_still_blocked_and_the_mismatch_recorded() {
    let h = Harness::start(Options::default()).await;
    h.send(&cmd(
        "connect-low-1",
        "CONNECT_INTEGRATION",
        "salesforce",
        "LOW",
    ))
    .await;
    let r = h.result("connect-low-1").await;
    assert_eq!(r.status, Status::Blocked);
    let sev = r.severity.unwrap();
    assert!(sev.mismatch);
    assert_eq!(sev.declared.as_str(), "LOW");
    assert_eq!(sev.effective.as_str(), "HIGH");
    assert_eq!(h.sim.calls().posts.len(), 0);
}

#[tokio::test]
async fn high_severity_status_check_goes_to_the_judges() {
    let h = Harness::start(Options {
        panel: Some(scripted_panel(
            vec![
                ("a", Script::Deny, 0),
                ("b", Script::Deny, 0),
                ("c", Script::Approve, 0),
            ],
            Duration::from_secs(2),
            2,
        )),
        ..Default::default()
    })
    .await;
    h.send(&cmd(
        "check-high-1",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "HIGH",
    ))
    .await;
    let r = h.result("check-high-1").await;
    assert_eq!(r.status, Status::NeedsApproval);
    assert!(!r.judges.is_empty());
    assert_eq!(h.sim.calls().posts.len(), 0);
}

#[tokio::test]
async fn missing_user_id_is_rejected() {
    let h = Harness::start(Options::default()).await;
    let mut c = cmd("no-user-1", "CHECK_INTEGRATION_STATUS", "mailchimp", "LOW");
    c["agent_id"] = "someone".into();
    h.publish(c.to_string().as_bytes(), BasicProperties::default())
        .await;
    let r = h.result("no-user-1").await;
    assert_eq!(r.status, Status::Rejected);
    assert_eq!(r.error_field.as_deref(), Some("user_id"));
    assert!(r.rationale.contains("user_id"));
    assert_eq!(h.sim.calls().posts.len(), 0);
}

#[tokio::test]
async fn missing_user_id_allowed_by_config_is_marked_unverified() {
    let h = Harness::start(Options {
        tweak: Box::new(|s| s.intake.allow_unverified_agents = true),
        ..Default::default()
    })
    .await;
    let mut c = cmd(
        "unverified-1",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    );
    c["agent_id"] = "marketing-bot".into();
    h.publish(c.to_string().as_bytes(), BasicProperties::default())
        .await;
    let r = h.result("unverified-1").await;
    assert_eq!(r.status, Status::Success);
    let a = r.agent.unwrap();
    assert_eq!(a.id, "marketing-bot");
    assert!(!a.verified);
    // The default security judge requires a verified agent: a hard rule, a veto. The other two
    // judges approving can't outvote it (they did, 2-1, before vetoes).
    let mut c = cmd("unverified-2", "REFRESH_TOKEN", "google", "MEDIUM");
    c["agent_id"] = "marketing-bot".into();
    h.publish(c.to_string().as_bytes(), BasicProperties::default())
        .await;
    let r = h.result("unverified-2").await;
    let security = r.judges.iter().find(|j| j.name == "security").unwrap();
    assert_eq!(security.verdict, Vote::Veto);
    assert_eq!(security.rule.as_deref(), Some("require_verified_agent"));
    assert!(
        security.reason.contains("not verified"),
        "{}",
        security.reason
    );
    assert_eq!(r.status, Status::NeedsApproval);
    assert!(
        r.rationale.contains("require_verified_agent"),
        "{}",
        r.rationale
    );
    assert_eq!(h.sim.executions("unverified-2"), 0);
    // Alerts say the agent is unverified.
    let mut c = cmd("unverified-3", "REFRESH_TOKEN", "salesforce", "MEDIUM");
    c["agent_id"] = "marketing-bot".into();
    h.publish(c.to_string().as_bytes(), BasicProperties::default())
        .await;
    assert_eq!(h.result("unverified-3").await.status, Status::NeedsApproval);
    let alert = h
        .wait_until("alert", Duration::from_secs(10), |i| {
            i.alerts
                .iter()
                .find(|(_, a)| a.action_id.as_deref() == Some("unverified-3"))
                .cloned()
        })
        .await;
    assert!(
        alert.1.summary.contains("marketing-bot (unverified)"),
        "{}",
        alert.1.summary
    );
    assert!(!alert.1.agent.unwrap().verified);
}

#[tokio::test]
async fn forged_agent_id_is_rejected() {
    let h = Harness::start(Options::default()).await;
    let mut c = cmd("forged-1", "REFRESH_TOKEN", "google", "MEDIUM");
    c["agent_id"] = "admin-bot".into();
    h.send(&c).await;
    let r = h.result("forged-1").await;
    assert_eq!(r.status, Status::Rejected);
    assert_eq!(r.error_field.as_deref(), Some("agent_id"));
    assert!(
        r.rationale.contains("admin-bot") && r.rationale.contains("guest"),
        "{}",
        r.rationale
    );
    assert_eq!(h.sim.calls().posts.len(), 0);
}

#[tokio::test]
async fn the_broker_refuses_a_user_id_that_is_not_the_connection_user() {
    // Why user_id can be trusted: RabbitMQ closes the channel of a publish whose user_id
    // differs from the connection's user.
    let h = Harness::start(Options {
        start_poller: false,
        ..Default::default()
    })
    .await;
    let ch = h.agent_conn.create_channel().await.unwrap();
    let c = cmd(
        "impersonate-1",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    )
    .to_string();
    let outcome = async {
        ch.confirm_select(Default::default()).await?;
        ch.basic_publish(
            h.settings.topology.commands_exchange.as_str().into(),
            "command.check_integration_status".into(),
            Default::default(),
            c.as_bytes(),
            BasicProperties::default().with_user_id("admin".into()),
        )
        .await?
        .await
    }
    .await;
    assert!(
        outcome.is_err(),
        "the broker accepted a forged user_id: {outcome:?}"
    );
    assert_eq!(h.queue_depth().await, 0);
}

#[tokio::test]
async fn routing_key_is_not_trusted() {
    let h = Harness::start(Options::default()).await;
    // Published under a harmless routing key, the payload is a CONNECT: the payload decides.
    let c = cmd(
        "sneaky-connect-1",
        "CONNECT_INTEGRATION",
        "salesforce",
        "HIGH",
    )
    .to_string();
    let ch = &h.agent;
    ch.basic_publish(
        h.settings.topology.commands_exchange.as_str().into(),
        "command.check_integration_status".into(),
        Default::default(),
        c.as_bytes(),
        BasicProperties::default().with_user_id("guest".into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let r = h.result("sneaky-connect-1").await;
    assert_eq!(r.status, Status::Blocked);
}
