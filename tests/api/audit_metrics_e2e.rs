//! The audit trail end to end (poller → audit exchange → sink → hash-chained file → verify and
//! show), and the Prometheus metrics scraped over HTTP.

use crate::common::*;
use command_poller::audit::chain;
use command_poller::control::operator::new_request_id;
use command_poller::control::ControlCommand;
use command_poller::outcome::Status;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn temp_file() -> PathBuf {
    std::env::temp_dir().join(format!("audit-e2e-{}.jsonl", suffix()))
}

fn records(file: &std::path::Path) -> Vec<serde_json::Value> {
    chain::select(file, |_| true)
        .unwrap()
        .into_iter()
        .map(|l| l["record"].clone())
        .collect()
}

#[tokio::test]
async fn every_decision_is_audited_chained_verifiable_and_queryable() {
    let h = Harness::start(Options::default()).await;
    let file = temp_file();
    let stop = CancellationToken::new();
    let sink = {
        let (s, f, stop) = (h.settings.clone(), file.clone(), stop.clone());
        tokio::spawn(async move {
            command_poller::audit::sink::run(
                &command_poller::audit::sink::SinkConfig::from_settings(&s),
                &f,
                stop,
            )
            .await
        })
    };
    let check = cmd(
        "audit-check-1",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    );
    h.send(&check).await;
    h.send(&cmd("audit-refresh-1", "REFRESH_TOKEN", "google", "MEDIUM"))
        .await;
    h.send(&cmd(
        "audit-connect-1",
        "CONNECT_INTEGRATION",
        "salesforce",
        "LOW",
    ))
    .await;
    h.publish(
        br#"{"action_id":"audit-bad-1","command_type":"NOPE"}"#,
        lapin::BasicProperties::default().with_user_id("guest".into()),
    )
    .await;
    for id in [
        "audit-check-1",
        "audit-refresh-1",
        "audit-connect-1",
        "audit-bad-1",
    ] {
        h.result(id).await;
    }
    h.operator()
        .run(ControlCommand::Pause {
            reason: "audit drill".into(),
            request_id: new_request_id(),
        })
        .await
        .unwrap();
    eventually("5 audit records on disk", Duration::from_secs(15), || {
        file.exists()
            && chain::verify(&file)
                .map(|r| r.records >= 5)
                .unwrap_or(false)
    })
    .await;
    stop.cancel();
    sink.await.unwrap().unwrap();

    let recs = records(&file);
    let by_id = |id: &str| {
        recs.iter()
            .find(|r| r["action_id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no record for {id}"))
    };
    let types = |r: &serde_json::Value| {
        r["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };

    let c = by_id("audit-check-1");
    assert_eq!(c["agent"], "guest");
    assert_eq!(c["instance"], h.settings.instance_id.as_str());
    assert_eq!(
        types(&c),
        [
            "received",
            "policy_decision",
            "bridge_call",
            "result_published"
        ]
    );
    let received = &c["events"][0];
    assert_eq!(
        received["payload_sha256"],
        hex::encode(Sha256::digest(check.to_string().as_bytes()))
    );
    let policy = &c["events"][1];
    let policy_file = std::fs::read("config/policy.toml").unwrap();
    assert_eq!(
        policy["policy_sha256"],
        hex::encode(Sha256::digest(&policy_file)),
        "names the policy that decided"
    );
    assert_eq!(c["events"][2]["integration_status"], "CONNECTED");
    assert_eq!(c["events"][3]["status"], "SUCCESS");

    let r = by_id("audit-refresh-1");
    let t = types(&r);
    assert!(
        t.iter().filter(|x| *x == "judge_verdict").count() == 3,
        "{t:?}"
    );
    assert!(t.contains(&"bridge_call".to_string()));
    // How the panel decided, before the verdicts: the rule and the count.
    let panel = r["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "panel_decision")
        .unwrap_or_else(|| panic!("no panel_decision in {t:?}"));
    assert_eq!(panel["rule"], "majority");
    assert_eq!(panel["size"], 3);
    assert_eq!(panel["approved"], true);

    let b = by_id("audit-connect-1");
    assert_eq!(
        types(&b),
        [
            "received",
            "policy_decision",
            "result_published",
            "alert_sent",
            "alert_sent"
        ]
    );
    assert_eq!(b["events"][1]["severity_mismatch"], true);

    let bad = by_id("audit-bad-1");
    assert_eq!(
        types(&bad),
        ["received", "rejected", "dead_lettered", "result_published"]
    );

    let control = recs
        .iter()
        .find(|r| r["kind"] == "control")
        .expect("a control record");
    assert_eq!(control["events"][0]["kind"], "paused");
    assert_eq!(control["events"][0]["actor"], "guest");
    assert_eq!(control["events"][0]["reason"], "audit drill");

    // No secret anywhere in the trail.
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        !text.contains("test-secret-"),
        "the bridge secret is in the audit file"
    );
    assert!(!text.contains("guest:guest"));

    // The chain verifies; `audit show` answers per action and per agent.
    let bin = env!("CARGO_BIN_EXE_command-poller");
    let out = crate::common::isolated(bin)
        .args(["audit", "verify"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = crate::common::isolated(bin)
        .args(["audit", "show"])
        .arg(&file)
        .args(["--action-id", "audit-refresh-1"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert_eq!(shown.lines().count(), 1);
    assert!(shown.contains("judge_verdict"));
    let out = crate::common::isolated(bin)
        .args(["audit", "show"])
        .arg(&file)
        .args(["--agent", "guest", "--since", "2000-01-01T00:00:00Z"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 4);
    let out = crate::common::isolated(bin)
        .args(["audit", "show"])
        .arg(&file)
        .args(["--agent", "guest", "--since", "2999-01-01T00:00:00Z"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 0);

    // A tampered record is reported, as is a cut tail.
    let original = text.clone();
    std::fs::write(
        &file,
        original.replacen("\"status\":\"BLOCKED\"", "\"status\":\"SUCCESS\"", 1),
    )
    .unwrap();
    let out = crate::common::isolated(bin)
        .args(["audit", "verify"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["first_bad"]["why"]
            .as_str()
            .unwrap()
            .contains("altered"),
        "{report}"
    );
    let kept: Vec<&str> = original.lines().take(2).collect();
    std::fs::write(&file, format!("{}\n", kept.join("\n"))).unwrap();
    let report = chain::verify(&file).unwrap();
    assert!(report.first_bad.unwrap().why.contains("cut off"));
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(chain::head_path(&file));
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    buf
}

#[tokio::test]
async fn metrics_are_scraped_from_the_health_port() {
    let h = Harness::start(Options::default()).await;
    let stop = CancellationToken::new();
    let addr = command_poller::health::serve(
        ([127, 0, 0, 1], 0).into(),
        h.poller_state.clone(),
        "m".into(),
        stop.clone(),
    )
    .await
    .unwrap();
    h.send(&cmd(
        "m-check-1",
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    ))
    .await;
    h.send(&cmd("m-refresh-1", "REFRESH_TOKEN", "google", "MEDIUM"))
        .await;
    h.send(&cmd(
        "m-connect-1",
        "CONNECT_INTEGRATION",
        "salesforce",
        "HIGH",
    ))
    .await;
    h.publish(
        b"junk",
        lapin::BasicProperties::default().with_user_id("guest".into()),
    )
    .await;
    assert_eq!(h.result("m-connect-1").await.status, Status::Blocked);
    h.result("m-check-1").await;
    h.result("m-refresh-1").await;
    h.wait_until("dead letter", Duration::from_secs(10), |i| {
        (!i.dead.is_empty()).then_some(())
    })
    .await;
    let expected = [
        r#"command_poller_commands_total{command_type="CHECK_INTEGRATION_STATUS",status="SUCCESS"} 1"#,
        r#"command_poller_commands_total{command_type="REFRESH_TOKEN",status="SUCCESS"} 1"#,
        r#"command_poller_commands_total{command_type="CONNECT_INTEGRATION",status="BLOCKED"} 1"#,
        r#"command_poller_judge_verdicts_total{judge="security",verdict="approve"} 1"#,
        r#"command_poller_alerts_total{team="security",priority="high"} 1"#,
        r#"command_poller_alerts_total{team="engineering",priority="high"} 1"#,
        "command_poller_dead_letters_total 1",
        "command_poller_bridge_latency_seconds_count 2",
        "command_poller_bridge_retries_total 0",
        "command_poller_in_flight_commands 0",
        r#"command_poller_control_mode{mode="RUNNING"} 1"#,
        r#"command_poller_control_mode{mode="PAUSED"} 0"#,
    ];
    // Counters move just after the result is published: poll until all are there.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        let body = scrape(addr).await;
        let missing: Vec<_> = expected
            .iter()
            .filter(|l| !body.lines().any(|b| b == **l))
            .collect();
        if missing.is_empty() {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "missing {missing:?} in:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    assert!(body.contains("# TYPE command_poller_judge_latency_seconds histogram"));
    // Without an Accept for OpenMetrics: the classic text format, labelled as such, and clean by
    // promtool's lint (it used to report "command_poller_commands_total no help text": OpenMetrics
    // text labelled text/plain 0.0.4). scripts/test.sh installs Debian's prometheus for promtool.
    let (head, text) = body.split_once("\r\n\r\n").unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(!text.contains("# EOF"));
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test.sh installs it)");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Asked for OpenMetrics (as Prometheus asks): OpenMetrics, labelled as such.
    let om = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n")
            .await
            .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        buf
    };
    assert!(
        om.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{om}"
    );
    assert!(om.trim_end().ends_with("# EOF"));
    stop.cancel();
}

#[tokio::test]
async fn a_restarted_sink_resumes_after_its_last_record() {
    // The audit queue is a stream (nothing can purge it, and reading takes nothing off it): the
    // sink resumes from the offset kept with its last record, so nothing is missed or doubled.
    let h = Harness::start(Options::default()).await;
    let file = temp_file();
    let run_sink = |stop: CancellationToken| {
        let (s, f) = (h.settings.clone(), file.clone());
        tokio::spawn(async move {
            command_poller::audit::sink::run(
                &command_poller::audit::sink::SinkConfig::from_settings(&s),
                &f,
                stop,
            )
            .await
        })
    };
    let stop = CancellationToken::new();
    let sink = run_sink(stop.clone());
    for i in 0..3 {
        let id = format!("resume-{i}");
        h.send(&cmd(&id, "CHECK_INTEGRATION_STATUS", "google", "LOW"))
            .await;
        h.result(&id).await;
    }
    eventually("3 records", Duration::from_secs(15), || {
        file.exists()
            && chain::verify(&file)
                .map(|r| r.records == 3)
                .unwrap_or(false)
    })
    .await;
    stop.cancel();
    assert_eq!(sink.await.unwrap().unwrap(), 3);
    // While the sink is down, records wait in the stream.
    for i in 3..5 {
        let id = format!("resume-{i}");
        h.send(&cmd(&id, "CHECK_INTEGRATION_STATUS", "google", "LOW"))
            .await;
        h.result(&id).await;
    }
    let stop = CancellationToken::new();
    let sink = run_sink(stop.clone());
    eventually("5 records", Duration::from_secs(15), || {
        chain::verify(&file)
            .map(|r| r.records >= 5)
            .unwrap_or(false)
    })
    .await;
    settle().await;
    stop.cancel();
    assert_eq!(sink.await.unwrap().unwrap(), 2, "only the two new records");
    let ids: Vec<String> = records(&file)
        .iter()
        .map(|r| r["action_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        ids,
        ["resume-0", "resume-1", "resume-2", "resume-3", "resume-4"],
        "each once, in order"
    );
    let report = chain::verify(&file).unwrap();
    assert!(report.first_bad.is_none());
    let _ = std::fs::remove_file(&file);
}

#[tokio::test]
async fn the_sink_reconnects_when_its_connection_drops() {
    // A workload, not a one-shot: it used to exit when its connection ended, so after a broker
    // restart the audit trail stopped growing.
    let h = Harness::start(Options::default()).await;
    let file = temp_file();
    let stop = CancellationToken::new();
    let sink = {
        let (s, f, stop) = (h.settings.clone(), file.clone(), stop.clone());
        tokio::spawn(async move {
            command_poller::audit::sink::run(
                &command_poller::audit::sink::SinkConfig::from_settings(&s),
                &f,
                stop,
            )
            .await
        })
    };
    h.send(&cmd(
        "sink-drop-1",
        "CHECK_INTEGRATION_STATUS",
        "google",
        "LOW",
    ))
    .await;
    eventually("the first record", Duration::from_secs(15), || {
        file.exists()
            && chain::verify(&file)
                .map(|r| r.records == 1)
                .unwrap_or(false)
    })
    .await;
    let name = format!("{}-audit-sink", h.settings.amqp.connection_name);
    let closed = tokio::task::spawn_blocking(move || close_connections(&name))
        .await
        .unwrap();
    assert_eq!(closed, 1, "the sink's connection");
    h.send(&cmd(
        "sink-drop-2",
        "CHECK_INTEGRATION_STATUS",
        "google",
        "LOW",
    ))
    .await;
    eventually("the second record", Duration::from_secs(20), || {
        chain::verify(&file)
            .map(|r| r.records == 2)
            .unwrap_or(false)
    })
    .await;
    assert!(!sink.is_finished(), "the sink kept running");
    stop.cancel();
    assert_eq!(sink.await.unwrap().unwrap(), 2);
    let _ = std::fs::remove_file(&file);
}

#[tokio::test]
async fn the_sink_refuses_records_not_published_by_the_poller() {
    // Anyone who can publish to the audit exchange could forge records; the poller sets its
    // (broker-checked) user_id on every record and the sink keeps only those.
    let h = Harness::start(Options::default()).await;
    let forger = BrokerUser::create();
    let conn = lapin::Connection::connect(&forger.url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let forged = serde_json::json!({"kind": "command", "action_id": "forged-1", "agent": "x",
        "instance": "x", "at": "x", "events": []});
    ch.basic_publish(
        h.settings.audit.exchange.as_str().into(),
        "audit.command".into(),
        Default::default(),
        forged.to_string().as_bytes(),
        lapin::BasicProperties::default().with_user_id(forger.0.as_str().into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let _ = conn.close(200, "done".into()).await;
    h.send(&cmd(
        "genuine-audit-1",
        "CHECK_INTEGRATION_STATUS",
        "google",
        "LOW",
    ))
    .await;
    h.result("genuine-audit-1").await;
    let file = temp_file();
    let stop = CancellationToken::new();
    let sink = {
        let (s, f, stop) = (h.settings.clone(), file.clone(), stop.clone());
        tokio::spawn(async move {
            command_poller::audit::sink::run(
                &command_poller::audit::sink::SinkConfig::from_settings(&s),
                &f,
                stop,
            )
            .await
        })
    };
    eventually("the genuine record", Duration::from_secs(15), || {
        file.exists()
            && chain::verify(&file)
                .map(|r| r.records >= 1)
                .unwrap_or(false)
    })
    .await;
    let refused = h
        .wait_until(
            "the forged record dead-lettered",
            Duration::from_secs(10),
            |i| {
                i.dead
                    .iter()
                    .find(|d| {
                        d.header("x-poller-reason")
                            .is_some_and(|r| r.contains("refused"))
                    })
                    .cloned()
            },
        )
        .await;
    assert!(refused
        .header("x-poller-reason")
        .unwrap()
        .contains(&forger.0));
    let alert = h
        .wait_until("the security alert", Duration::from_secs(10), |i| {
            i.alerts
                .iter()
                .find(|(_, a)| a.summary.contains("audit sink refused"))
                .cloned()
        })
        .await;
    assert_eq!(alert.0.routing_key, "security.high");
    stop.cancel();
    sink.await.unwrap().unwrap();
    let ids: Vec<String> = records(&file)
        .iter()
        .map(|r| r["action_id"].as_str().unwrap_or("-").to_owned())
        .collect();
    assert_eq!(
        ids,
        ["genuine-audit-1"],
        "the forged record is not in the chain"
    );
    let _ = std::fs::remove_file(&file);
}
