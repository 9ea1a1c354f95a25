//! Canaries against the real broker: a panel that approves the known-bad canary alerts
//! security and pauses; a panel that denies the known-good one warns ops; canaries never reach
//! the bridge, the results or the alerts of commands.

use crate::common::*;
use command_poller::control::Mode;
use command_poller::testing::{scripted_panel, Script};
use std::time::Duration;

fn panel(script: Script) -> command_poller::judging::Panel {
    scripted_panel(
        vec![
            ("security", script, 0),
            ("compliance", script, 0),
            ("business", script, 0),
        ],
        Duration::from_secs(2),
        2,
    )
}

fn canaries_on(s: &mut command_poller::settings::Settings) {
    s.panel.canary.enabled = true;
    // The first round goes out as the session starts; the next not within the test.
    s.panel.canary.interval = Duration::from_secs(3600);
}

#[tokio::test]
async fn a_panel_that_approves_the_known_bad_canary_alerts_security_and_pauses() {
    let h = Harness::start(Options {
        panel: Some(panel(Script::Approve)),
        tweak: Box::new(canaries_on),
        ..Default::default()
    })
    .await;
    let alert = h
        .wait_until(
            "the canary's security alert",
            Duration::from_secs(15),
            |i| {
                i.alerts
                    .iter()
                    .find(|(_, a)| a.summary.contains("known-bad canary"))
                    .cloned()
            },
        )
        .await;
    assert_eq!(alert.0.routing_key, "security.high");
    assert!(alert.1.summary.contains("APPROVED"), "{}", alert.1.summary);
    assert!(
        alert.1.summary.contains("approved under the majority rule"),
        "{}",
        alert.1.summary
    );
    eventually("paused by the canary", Duration::from_secs(10), || {
        h.poller_state.gate.mode() == Mode::Paused
    })
    .await;
    let state = h.poller_state.gate.state();
    assert!(state.reason.contains("canary"), "{state:?}");
    // Never executed, never a result: the canary is not a command.
    settle().await;
    assert_eq!(h.sim.calls().posts.len(), 0);
    assert!(h.inbox.lock().unwrap().results.is_empty());
    let text = h.poller_state.metrics.render(0, Mode::Paused);
    assert!(
        text.contains("command_poller_canaries_total{canary=\"known_bad\",outcome=\"approved\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_panel_that_denies_the_known_good_canary_warns_ops_and_keeps_running() {
    let h = Harness::start(Options {
        panel: Some(panel(Script::Deny)),
        tweak: Box::new(canaries_on),
        ..Default::default()
    })
    .await;
    let alert = h
        .wait_until("the canary's ops warning", Duration::from_secs(15), |i| {
            i.alerts
                .iter()
                .find(|(_, a)| a.summary.contains("known-good canary"))
                .cloned()
        })
        .await;
    assert_eq!(alert.0.routing_key, "ops.normal");
    settle().await;
    assert_eq!(h.poller_state.gate.mode(), Mode::Running);
    // Only the one warning: the known-bad canary was refused, as it should be.
    let alerts = h.inbox.lock().unwrap().alerts.clone();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert!(h.inbox.lock().unwrap().results.is_empty());
    assert_eq!(h.sim.calls().posts.len(), 0);
    // Commands still flow.
    h.send(&cmd(
        "after-canary-1",
        "CHECK_INTEGRATION_STATUS",
        "google",
        "LOW",
    ))
    .await;
    assert_eq!(
        h.result("after-canary-1").await.status,
        command_poller::outcome::Status::Success
    );
}

#[tokio::test]
async fn a_healthy_panel_says_nothing_and_the_rate_rule_does_not_count_canaries() {
    // The shipped rule panel: security refuses the unverified known-bad canary; compliance's
    // rate rules (5 per hour, 3 per 10 minutes) must not count the known-good canary, or a busy canary would
    // starve the agent it poses as, and soon fail itself.
    let h = Harness::start(Options {
        tweak: Box::new(|s| {
            canaries_on(s);
            s.panel.canary.agent = "guest".into();
        }),
        ..Default::default()
    })
    .await;
    eventually("both canaries asked", Duration::from_secs(15), || {
        let t = h.poller_state.metrics.render(0, Mode::Running);
        t.contains("canary=\"known_bad\",outcome=\"not_approved\"} 1")
            && t.contains("canary=\"known_good\",outcome=\"approved\"} 1")
    })
    .await;
    // guest (the harness's agent) still has all 3 refreshes of compliance's 10-minute burst
    // window (a counted canary would have taken one).
    for i in 0..3 {
        let id = format!("canary-rate-{i}");
        h.send(&cmd(&id, "REFRESH_TOKEN", "google", "MEDIUM")).await;
        let r = h.result(&id).await;
        assert_eq!(
            r.status,
            command_poller::outcome::Status::Success,
            "{}",
            r.rationale
        );
    }
    assert!(h.inbox.lock().unwrap().alerts.is_empty());
}
