//! The judge panel and the bridge's failure paths, end to end.

use crate::common::*;
use command_poller::bridge::simulator::Fault;
use command_poller::outcome::{Status, Vote};
use command_poller::testing::{scripted_panel, Script};
use std::time::{Duration, Instant};

fn refresh(id: &str) -> serde_json::Value {
    cmd(id, "REFRESH_TOKEN", "google", "MEDIUM")
}

#[tokio::test]
async fn panel_split_two_to_one_approves() {
    let h = Harness::start(Options {
        panel: Some(scripted_panel(
            vec![
                ("security", Script::Approve, 0),
                ("compliance", Script::Deny, 0),
                ("business", Script::Approve, 20),
            ],
            Duration::from_secs(2),
            2,
        )),
        ..Default::default()
    })
    .await;
    h.send(&refresh("split-approve-1")).await;
    let r = h.result("split-approve-1").await;
    assert_eq!(r.status, Status::Success, "{}", r.rationale);
    assert!(r.rationale.contains("2 of 3"), "{}", r.rationale);
    assert_eq!(h.sim.executions("split-approve-1"), 1);
}

#[tokio::test]
async fn panel_split_one_to_two_needs_approval() {
    let h = Harness::start(Options {
        panel: Some(scripted_panel(
            vec![
                ("security", Script::Deny, 0),
                ("compliance", Script::Approve, 0),
                ("business", Script::Deny, 20),
            ],
            Duration::from_secs(2),
            2,
        )),
        ..Default::default()
    })
    .await;
    h.send(&refresh("split-deny-1")).await;
    let r = h.result("split-deny-1").await;
    assert_eq!(r.status, Status::NeedsApproval);
    let votes: Vec<_> = r
        .judges
        .iter()
        .map(|j| (j.name.as_str(), j.verdict))
        .collect();
    assert_eq!(
        votes,
        [
            ("security", Vote::Deny),
            ("compliance", Vote::Approve),
            ("business", Vote::Deny)
        ]
    );
    assert_eq!(h.sim.calls().posts.len(), 0);
}

#[tokio::test]
async fn a_judge_that_times_out_is_unavailable_not_denied() {
    let h = Harness::start(Options {
        panel: Some(scripted_panel(
            vec![
                ("security", Script::Approve, 0),
                ("compliance", Script::Hang, 0),
                ("business", Script::Deny, 0),
            ],
            Duration::from_millis(300),
            2,
        )),
        ..Default::default()
    })
    .await;
    h.send(&refresh("timeout-1")).await;
    let r = h.result("timeout-1").await;
    assert_eq!(r.status, Status::NeedsApproval);
    let c = r.judges.iter().find(|j| j.name == "compliance").unwrap();
    assert_eq!(c.verdict, Vote::Unavailable);
    assert!(c.cause.as_deref().unwrap().contains("timed out"), "{c:?}");
    assert!(c.ms >= 300);
}

#[tokio::test]
async fn the_panel_stops_waiting_once_the_majority_is_in() {
    let h = Harness::start(Options {
        panel: Some(scripted_panel(
            vec![
                ("security", Script::Approve, 0),
                ("compliance", Script::Approve, 30),
                ("business", Script::Hang, 0),
            ],
            Duration::from_secs(30),
            2,
        )),
        ..Default::default()
    })
    .await;
    let t0 = Instant::now();
    h.send(&refresh("fast-majority-1")).await;
    let r = h.result("fast-majority-1").await;
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "waited for the hanging judge"
    );
    assert_eq!(r.status, Status::Success);
    let b = r.judges.iter().find(|j| j.name == "business").unwrap();
    assert_eq!(b.verdict, Vote::Skipped);
}

#[tokio::test]
async fn failing_judges_count_as_not_approving() {
    let h = Harness::start(Options {
        panel: Some(scripted_panel(
            vec![
                ("security", Script::Approve, 0),
                ("compliance", Script::Fail, 0),
                ("business", Script::Fail, 0),
            ],
            Duration::from_secs(2),
            2,
        )),
        ..Default::default()
    })
    .await;
    h.send(&refresh("fail-1")).await;
    let r = h.result("fail-1").await;
    assert_eq!(r.status, Status::NeedsApproval);
    assert_eq!(
        r.judges
            .iter()
            .filter(|j| j.verdict == Vote::Unavailable)
            .count(),
        2
    );
}

#[tokio::test]
async fn bridge_html_error_page_fails_with_the_page_message_and_alerts_ops() {
    let h = Harness::start(Options::default()).await;
    h.sim.fail_next_posts([Fault::Html {
        message: "Authorization is required to perform that action.".into(),
    }]);
    h.send(&refresh("html-1")).await;
    let r = h.result("html-1").await;
    assert_eq!(r.status, Status::Failed);
    assert!(
        r.rationale.contains("Authorization is required"),
        "{}",
        r.rationale
    );
    let b = r.bridge.unwrap();
    assert_eq!(b.attempts, 1, "an authorization page is not retried");
    let alert = h
        .wait_until("ops alert", Duration::from_secs(10), |i| {
            i.alerts
                .iter()
                .find(|(_, a)| a.action_id.as_deref() == Some("html-1"))
                .cloned()
        })
        .await;
    assert_eq!(alert.0.routing_key, "ops.normal");
    assert_eq!(alert.1.status, Some(Status::Failed));
}

#[tokio::test]
async fn bridge_500_then_success_retries_the_post_and_executes_once() {
    let h = Harness::start(Options::default()).await;
    h.sim
        .fail_next_posts([Fault::Status { code: 500 }, Fault::Status { code: 503 }]);
    h.send(&cmd(
        "retry-500-1",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    ))
    .await;
    let r = h.result("retry-500-1").await;
    assert_eq!(r.status, Status::Success, "{}", r.rationale);
    assert_eq!(r.bridge.unwrap().attempts, 3);
    assert_eq!(h.sim.posts("retry-500-1"), 3);
    assert_eq!(h.sim.executions("retry-500-1"), 1);
}

#[tokio::test]
async fn a_302_whose_get_fails_once_repeats_only_the_get() {
    let h = Harness::start(Options::default()).await;
    h.sim.fail_next_gets([Fault::Status { code: 502 }]);
    h.send(&cmd(
        "get-fails-1",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    ))
    .await;
    let r = h.result("get-fails-1").await;
    assert_eq!(r.status, Status::Success, "{}", r.rationale);
    assert_eq!(
        h.sim.posts("get-fails-1"),
        1,
        "the POST reached the bridge exactly once"
    );
    assert_eq!(h.sim.executions("get-fails-1"), 1);
    assert_eq!(h.sim.calls().gets, 2);
}

#[tokio::test]
async fn bridge_retries_stop_at_the_budget_and_the_result_is_failed() {
    let h = Harness::start(Options {
        tweak: Box::new(|s| s.bridge.retry_budget = Duration::from_secs(1)),
        ..Default::default()
    })
    .await;
    h.sim
        .fail_next_posts((0..200).map(|_| Fault::Status { code: 500 }));
    let t0 = Instant::now();
    h.send(&cmd(
        "exhausted-1",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    ))
    .await;
    let r = h.result("exhausted-1").await;
    assert!(t0.elapsed() < Duration::from_secs(8));
    assert_eq!(r.status, Status::Failed);
    let b = r.bridge.unwrap();
    assert!(b.attempts > 1, "{b:?}");
    assert!(b.error.unwrap().contains("500"));
    assert_eq!(h.sim.executions("exhausted-1"), 0);
}

#[tokio::test]
async fn the_bridge_refuses_a_bad_signature() {
    // A poller holding the wrong secret gets the bridge's refusal, not an execution.
    let mut h = Harness::start(Options {
        start_poller: false,
        ..Default::default()
    })
    .await;
    h.start_poller(None, command_poller::bridge::signing::Secret::new("wrong"))
        .await;
    h.send(&cmd(
        "bad-sig-1",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    ))
    .await;
    let r = h.result("bad-sig-1").await;
    assert_eq!(r.status, Status::Failed);
    assert!(r.rationale.contains("bad signature"), "{}", r.rationale);
    assert_eq!(h.sim.executions("bad-sig-1"), 0);
    assert_eq!(h.sim.calls().rejected_signatures, 1);
}

#[tokio::test]
async fn an_apps_script_quota_page_is_retried_and_reported() {
    let h = Harness::start(Options::default()).await;
    let quota = "Service invoked too many times for one day: urlfetch.";
    h.sim.fail_next_posts([Fault::Html {
        message: quota.into(),
    }]);
    h.send(&cmd(
        "quota-1",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    ))
    .await;
    let r = h.result("quota-1").await;
    assert_eq!(
        r.status,
        Status::Success,
        "a quota page is retryable: {}",
        r.rationale
    );
    assert_eq!(r.bridge.unwrap().attempts, 2);
    assert_eq!(h.sim.executions("quota-1"), 1);
    // When it persists past the budget, the page's message is in the result.
    let h2 = Harness::start(Options {
        tweak: Box::new(|s| s.bridge.retry_budget = Duration::from_secs(1)),
        ..Default::default()
    })
    .await;
    h2.sim.fail_next_posts((0..100).map(|_| Fault::Html {
        message: quota.into(),
    }));
    h2.send(&cmd(
        "quota-2",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    ))
    .await;
    let r = h2.result("quota-2").await;
    assert_eq!(r.status, Status::Failed);
    assert!(r.rationale.contains(quota), "{}", r.rationale);
}

#[tokio::test]
async fn a_rate_limit_is_a_veto_not_a_vote() {
    // The default panel: compliance allows 5 refreshes per agent per hour. Security and business
    // approve every refresh of google; before vetoes they outvoted compliance 2-1, and all 9
    // refreshes ran. (No trip here: three unapproved refreshes would pause the fleet.)
    // The hourly limit alone: compliance's burst and E01 rules would veto earlier (the 4th
    // refresh in 10 minutes), and are tested on their own.
    let h = Harness::start(Options {
        tweak: Box::new(|s| {
            s.control.trips.clear();
            for j in &mut s.panel.judges {
                if let command_poller::settings::JudgeSettings::Rules { rules, .. } = j {
                    rules.max_burst = None;
                    rules.max_unapproved_recent = None;
                }
            }
        }),
        ..Default::default()
    })
    .await;
    for i in 1..=9 {
        h.send(&refresh(&format!("rate-{i}"))).await;
        let r = h.result(&format!("rate-{i}")).await;
        if i <= 5 {
            assert_eq!(r.status, Status::Success, "{i}: {r:?}");
            continue;
        }
        assert_eq!(r.status, Status::NeedsApproval, "{i}: {r:?}");
        let compliance = r.judges.iter().find(|j| j.name == "compliance").unwrap();
        assert_eq!(compliance.verdict, Vote::Veto);
        assert_eq!(compliance.rule.as_deref(), Some("max_per_agent"));
        assert!(
            r.rationale.contains("compliance") && r.rationale.contains("max_per_agent"),
            "{}",
            r.rationale
        );
    }
    let calls = h.sim.calls();
    assert_eq!(calls.total_executions(), 5, "{calls:?}");
}

#[tokio::test]
async fn the_default_panel_vetoes_a_burst_and_e01s_pattern() {
    // The shipped compliance judge: 3 refreshes in 10 minutes, then max_burst; the vetoed
    // attempts are unapproved, and two of them make E01's pattern (max_unapproved_recent).
    let h = Harness::start(Options {
        tweak: Box::new(|s| s.control.trips.clear()),
        ..Default::default()
    })
    .await;
    let mut rules = Vec::new();
    for i in 1..=6 {
        let id = format!("burst-{i}");
        h.send(&refresh(&id)).await;
        let r = h.result(&id).await;
        let compliance = r.judges.iter().find(|j| j.name == "compliance").unwrap();
        rules.push((r.status, compliance.rule.clone()));
    }
    let expected = [
        (Status::Success, None),
        (Status::Success, None),
        (Status::Success, None),
        (Status::NeedsApproval, Some("max_burst".to_string())),
        (Status::NeedsApproval, Some("max_burst".to_string())),
        (
            Status::NeedsApproval,
            Some("max_unapproved_recent".to_string()),
        ),
    ];
    assert_eq!(rules, expected);
    assert_eq!(h.sim.calls().total_executions(), 3);
    // An understated refresh: the security judge's hard rule, whatever the others say.
    h.send(&cmd("understated-1", "REFRESH_TOKEN", "meta", "LOW"))
        .await;
    let r = h.result("understated-1").await;
    assert_eq!(r.status, Status::NeedsApproval);
    assert!(
        r.rationale.contains("deny_understated_severity"),
        "{}",
        r.rationale
    );
}

fn check(id: &str) -> serde_json::Value {
    cmd(id, "CHECK_INTEGRATION_STATUS", "mailchimp", "LOW")
}

#[tokio::test]
async fn an_html_page_on_the_get_asks_for_the_remembered_answer_and_never_reposts() {
    // Finding 9: doPost ran, then the echo GET got an HTML page. The result said FAILED, "the
    // action did not complete and the agent may retry it": untrue, and a retry risked a second
    // execution once the bridge forgot it.
    let h = Harness::start(Options::default()).await;
    h.sim.fail_next_gets([Fault::Html {
        message: "Sorry, unable to open the file at this time.".into(),
    }]);
    h.send(&check("html-get-1")).await;
    let r = h.result("html-get-1").await;
    assert_eq!(r.status, Status::Success, "{}", r.rationale);
    assert_eq!(r.tool_result.unwrap()["integration_status"], "CONNECTED");
    assert_eq!(h.sim.posts("html-get-1"), 1, "the POST is never repeated");
    assert_eq!(
        h.sim.lookups("html-get-1"),
        1,
        "the remembered answer was asked for"
    );
    assert_eq!(h.sim.executions("html-get-1"), 1);
}

#[tokio::test]
async fn a_quota_page_on_the_get_retries_the_get_not_the_post() {
    // Finding 9: a quota page on the GET made the client re-POST.
    let h = Harness::start(Options::default()).await;
    h.sim.fail_next_gets([Fault::Html {
        message: "Service invoked too many times for one day: urlfetch.".into(),
    }]);
    h.send(&check("quota-get-1")).await;
    let r = h.result("quota-get-1").await;
    assert_eq!(r.status, Status::Success, "{}", r.rationale);
    assert_eq!(h.sim.posts("quota-get-1"), 1);
    assert_eq!(h.sim.calls().gets, 2);
    assert_eq!(h.sim.executions("quota-get-1"), 1);
}

#[tokio::test]
async fn an_answer_lost_for_good_is_an_unknown_outcome_for_a_human() {
    let h = Harness::start(Options::default()).await;
    // Every GET fails: the action's and every lookup's.
    h.sim.fail_next_gets((0..50).map(|_| Fault::Html {
        message: "Sorry, unable to open the file at this time.".into(),
    }));
    h.send(&check("lost-1")).await;
    let r = h.result("lost-1").await;
    assert_eq!(r.status, Status::UnknownOutcome, "{r:?}");
    assert!(
        r.rationale.contains("unknown") && !r.rationale.contains("may retry"),
        "{}",
        r.rationale
    );
    assert_eq!(h.sim.posts("lost-1"), 1, "the POST is never repeated");
    assert_eq!(h.sim.executions("lost-1"), 1);
    let alert = h
        .wait_until("the alert", Duration::from_secs(10), |i| {
            i.alerts
                .iter()
                .find(|(_, a)| a.action_id.as_deref() == Some("lost-1"))
                .cloned()
        })
        .await;
    assert_eq!(alert.0.routing_key, "ops.high");
    assert!(
        alert.1.action_required.contains("Do not retry"),
        "{}",
        alert.1.action_required
    );
    assert!(!alert.1.action_required.contains("may retry"));
    // The agent retrying gets the same answer, nothing is executed again.
    h.send(&check("lost-1")).await;
    let replay = h
        .wait_until("the replay", Duration::from_secs(10), |i| {
            i.results
                .iter()
                .filter(|(_, r)| r.action_id.as_deref() == Some("lost-1"))
                .nth(1)
                .map(|(_, r)| r.clone())
        })
        .await;
    assert_eq!(replay.status, Status::UnknownOutcome);
    assert!(replay.replay);
    assert_eq!(h.sim.executions("lost-1"), 1);
}

/// A copy of the shipped policy whose REFRESH_TOKEN rule decides by `rule`.
fn policy_with_rule(rule: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string("config/policy.toml").unwrap();
    let text = text.replace(
        "decision_rule = \"majority\"",
        &format!("decision_rule = \"{rule}\""),
    );
    assert!(text.contains(&format!("decision_rule = \"{rule}\"")));
    let path = std::env::temp_dir().join(format!("policy-{rule}-{}.toml", suffix()));
    std::fs::write(&path, text).unwrap();
    path
}

async fn judged_under(
    rule: &str,
    business: Script,
    id: &str,
) -> command_poller::outcome::ResultMessage {
    let policy = policy_with_rule(rule);
    let file = policy.clone();
    let h = Harness::start(Options {
        // Two quick approvals; the slowest judge answers last.
        panel: Some(scripted_panel(
            vec![
                ("security", Script::Approve, 0),
                ("compliance", Script::Approve, 0),
                ("business", business, 150),
            ],
            Duration::from_secs(2),
            2,
        )),
        tweak: Box::new(move |s| s.policy.file = file),
        ..Default::default()
    })
    .await;
    h.send(&refresh(id)).await;
    let r = h.result(id).await;
    let executions = h.sim.executions(id);
    std::fs::remove_file(policy).unwrap();
    match r.status {
        Status::Success => assert_eq!(executions, 1, "{r:?}"),
        _ => assert_eq!(executions, 0, "{r:?}"),
    }
    r
}

#[tokio::test]
async fn the_decision_rule_of_the_command_type_decides_and_is_recorded() {
    use command_poller::judging::DecisionRule;
    // A split panel, 2 approve and the slow one denies.
    let r = judged_under("majority", Script::Deny, "rule-majority-1").await;
    assert_eq!(r.status, Status::Success, "{}", r.rationale);
    let p = r.panel.expect("the panel's summary");
    assert_eq!(p.rule, DecisionRule::Majority);
    // Majority settles at two approvals: the slow deny was never waited for.
    assert_eq!(r.judges[2].verdict, Vote::Skipped);

    let r = judged_under("veto", Script::Deny, "rule-veto-1").await;
    assert_eq!(r.status, Status::NeedsApproval, "{}", r.rationale);
    assert!(
        r.rationale.contains("under the veto rule one deny denies"),
        "{}",
        r.rationale
    );
    let p = r.panel.unwrap();
    assert_eq!(
        (p.rule, p.approvals, p.denials, p.approved),
        (DecisionRule::Veto, 2, 1, false)
    );
    assert_eq!(
        r.judges[2].verdict,
        Vote::Deny,
        "the veto rule waits for every judge"
    );

    let r = judged_under("unanimous", Script::Deny, "rule-unanimous-1").await;
    assert_eq!(r.status, Status::NeedsApproval, "{}", r.rationale);
    assert!(
        r.rationale.contains("the unanimous rule needs all 3"),
        "{}",
        r.rationale
    );

    // An unavailable judge: the veto rule approves on its quorum of answers, unanimity fails.
    let r = judged_under("veto", Script::Fail, "rule-veto-2").await;
    assert_eq!(r.status, Status::Success, "{}", r.rationale);
    assert!(
        r.rationale.contains("under the veto rule"),
        "{}",
        r.rationale
    );
    let r = judged_under("unanimous", Script::Fail, "rule-unanimous-2").await;
    assert_eq!(r.status, Status::NeedsApproval, "{}", r.rationale);

    let r = judged_under("unanimous", Script::Approve, "rule-unanimous-3").await;
    assert_eq!(r.status, Status::Success, "{}", r.rationale);
    assert_eq!(
        r.rationale,
        "Approved by the judges (3 of 3) under the unanimous rule."
    );
}
