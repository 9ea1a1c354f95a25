//! The shipped binary, as an operator and an agent use it: `run` configured through
//! environment overrides, `send --wait` for the runbook's examples, SIGTERM for a clean exit.

use crate::common::free_port;
use crate::common::{suffix, test_settings, Cleanup};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_command-poller");

fn env_for(sfx: &str) -> Vec<(String, String)> {
    let mut env = crate::common::poller_env(&test_settings(sfx));
    env.push((
        "BRIDGE_SECRET".into(),
        format!("binary-test-{sfx}-with-enough-bytes"),
    ));
    env
}

/// Runs `check-config` with these environment overrides.
fn check_config(env: &[(&str, &str)]) -> std::process::Output {
    crate::common::isolated(BIN)
        .arg("check-config")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Polls /readyz until the poller is consuming.
fn wait_ready(port: u16) {
    let t0 = Instant::now();
    loop {
        let ready = std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .and_then(|mut s| {
                use std::io::{Read, Write};
                s.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
                    .ok()?;
                let mut buf = String::new();
                s.read_to_string(&mut buf).ok()?;
                buf.starts_with("HTTP/1.0 200").then_some(())
            });
        if ready.is_some() {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "poller never became ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn send(envs: &[(String, String)], file: &str) -> serde_json::Value {
    let out = crate::common::isolated(BIN)
        .args(["send", file, "--wait", "--timeout-secs", "20"])
        .envs(envs.iter().cloned())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn run_send_and_sigterm() {
    let sfx = suffix();
    let _cleanup = Cleanup(test_settings(&sfx));
    let mut envs = env_for(&sfx);
    let port = free_port();
    envs.push(("POLLER__HEALTH__LISTEN".into(), format!("127.0.0.1:{port}")));
    let mut poller = crate::common::isolated(BIN)
        .args(["run", "--log-format", "json"])
        .envs(envs.iter().cloned())
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_ready(port);
    let r1 = send(&envs, "examples/commands/sop-int-01-check-status.json");
    assert_eq!(r1["status"], "SUCCESS");
    assert_eq!(r1["tool_result"]["integration_status"], "CONNECTED");
    let r2 = send(&envs, "examples/commands/sop-int-02-refresh-token.json");
    assert_eq!(r2["status"], "SUCCESS");
    assert_eq!(
        r2["tool_result"]["message"],
        "Token for google refreshed successfully."
    );
    let r3 = send(
        &envs,
        "examples/commands/sop-int-03-connect-integration.json",
    );
    assert_eq!(r3["status"], "BLOCKED");
    assert_eq!(r3["rationale"], "Action blocked by policy: New integrations require manual security and permissions review.");

    // SIGTERM: drains and exits 0.
    let pid = poller.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = poller.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "poller did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status:?}");
    let mut logs = String::new();
    std::io::Read::read_to_string(poller.stderr.as_mut().unwrap(), &mut logs).unwrap();
    // JSON logs, one span per command carrying its action_id, and no secret in them.
    assert!(
        logs.lines()
            .all(|l| l.trim().is_empty() || serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "non-JSON log line"
    );
    assert!(
        logs.contains("\"action_id\":\"token-refresh-google-456\""),
        "no span field in logs"
    );
    assert!(
        !logs.contains(&format!("binary-test-{sfx}-with-enough-bytes")),
        "the bridge secret leaked into the logs"
    );
    assert!(
        !logs.contains("guest:guest"),
        "the broker password leaked into the logs"
    );
    // Quiet when all went well: direct reply-to replies used to be published mandatory, which
    // RabbitMQ returns as unroutable although it delivered them ("reply not delivered" and a
    // dump of the returned message, for every reply).
    for noise in [
        "reply not delivered",
        "returned us a message",
        "\"level\":\"ERROR\"",
        "\"level\":\"WARN\"",
    ] {
        assert!(!logs.contains(noise), "{noise}: {logs}");
    }
}

#[test]
fn an_invalid_policy_stops_the_poller_at_start_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("poller-policy-{}", suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = std::fs::read_to_string("config/policy.toml")
        .unwrap()
        .replace("floor_severity = \"HIGH\"", "floor_severity = \"EXTREME\"");
    let file = dir.join("policy.toml");
    std::fs::write(&file, policy).unwrap();
    let out = crate::common::isolated(BIN)
        .arg("run")
        .env("POLLER__POLICY__FILE", &file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("floor_severity") && err.contains("EXTREME"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_unknown_config_key_is_refused() {
    let out = check_config(&[("POLLER__PROCESSING__MAX_INFLIGHT", "3")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_inflight"), "{err}");
    let ok = crate::common::isolated(BIN)
        .arg("check-config")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn status_is_never_served_beyond_loopback() {
    let out = check_config(&[("POLLER__HEALTH__STATUS_LISTEN", "0.0.0.0:9465")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("health.status_listen") && err.contains("loopback"),
        "{err}"
    );
}

#[test]
fn unset_app_environment_means_production_and_guest_is_no_operator() {
    // Low finding: APP_ENVIRONMENT defaulted to local, which made guest an operator.
    let settings = command_poller::settings::Settings::load_isolated(
        std::path::Path::new("config"),
        command_poller::settings::DEFAULT_ENVIRONMENT,
    )
    .unwrap();
    assert_eq!(command_poller::settings::DEFAULT_ENVIRONMENT, "production");
    assert!(!settings.control.operators.iter().any(|o| o == "guest"));
    let local =
        command_poller::settings::Settings::load_isolated(std::path::Path::new("config"), "local")
            .unwrap();
    assert!(local.control.operators.iter().any(|o| o == "guest"));
}

#[test]
fn claim_timings_that_would_spend_the_delivery_limit_are_refused() {
    // A duplicate must outwait a crashed replica's claim, or it goes back to the queue (one
    // delivery each time) before the dead claim expires.
    let out = check_config(&[
        ("POLLER__IDEMPOTENCY__CLAIM_TTL_SECS", "30"),
        ("POLLER__IDEMPOTENCY__WAIT_FOR_IN_FLIGHT_MS", "10000"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("wait_for_in_flight_ms") && err.contains("claim_ttl_secs"),
        "{err}"
    );
    // Finding 10: the old default (20 s) let a duplicate of a long bridge call go back to the
    // queue five times while the original still ran, until it was dead-lettered.
    let out = check_config(&[("POLLER__IDEMPOTENCY__WAIT_FOR_IN_FLIGHT_MS", "20000")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("wait_for_in_flight_ms") && err.contains("retry_budget_secs"),
        "{err}"
    );
    let out = check_config(&[("POLLER__IDEMPOTENCY__WAIT_FOR_IN_FLIGHT_MS", "1800000")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("consumer_timeout"));
    let out = check_config(&[("POLLER__IDEMPOTENCY__CLAIM_TTL_SECS", "2")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("claim_ttl_secs"));
}

/// Item 14 of the levers issue: `run` and `check-config` took the Secret template's CHANGE-ME
/// for the bridge secret, the store key and the bridge URL; a record sealed with the template's
/// key then executed a REFRESH_TOKEN nobody asked for.
#[test]
fn placeholders_and_short_keys_are_refused_as_secrets() {
    let out = check_config(&[
        ("POLLER__BRIDGE__MODE", "apps_script"),
        (
            "POLLER__BRIDGE__URL",
            "https://script.google.com/macros/s/CHANGE-ME/exec",
        ),
        ("BRIDGE_SECRET", "0123456789abcdef0123456789abcdef"),
        ("POLLER_STORE_KEY", "CHANGE-ME"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("PROBLEM bridge.url"), "{text}");
    assert!(text.contains("PROBLEM idempotency.key_env"), "{text}");
    let out = check_config(&[
        ("POLLER__BRIDGE__MODE", "apps_script"),
        (
            "POLLER__BRIDGE__URL",
            "https://script.google.com/macros/s/abc/exec",
        ),
        ("BRIDGE_SECRET", "CHANGE-ME"),
        ("POLLER_STORE_KEY", "a-key-of-twenty-byte"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("PROBLEM bridge.secret_env"), "{text}");
    assert!(text.contains("shorter than 32 bytes"), "{text}");
    assert!(
        !text.contains("a-key-of-twenty-byte"),
        "the key echoed: {text}"
    );
}

/// Every message body waiting in `queue`, taken off it, as text.
fn drain_queue(queue: &str) -> Vec<String> {
    drain_queue_messages(queue)
        .into_iter()
        .map(|(body, _)| String::from_utf8_lossy(&body).into_owned())
        .collect()
}

/// The records of the stream `queue` from its start up to the first one that mentions `until`.
fn read_stream(queue: &str, until: &str) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use futures::StreamExt;
        let conn = lapin::Connection::connect(crate::common::AMQP, Default::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.basic_qos(100, Default::default()).await.unwrap();
        let mut args = lapin::types::FieldTable::default();
        args.insert(
            "x-stream-offset".into(),
            lapin::types::AMQPValue::LongString("first".into()),
        );
        let mut c = ch
            .basic_consume(queue.into(), "".into(), Default::default(), args)
            .await
            .unwrap();
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while let Ok(Some(Ok(d))) = tokio::time::timeout_at(deadline, c.next()).await {
            let text = String::from_utf8_lossy(&d.data).into_owned();
            let _ = d.ack(Default::default()).await;
            let done = text.contains(until);
            out.push(text);
            if done {
                break;
            }
        }
        let _ = conn.close(200, "done".into()).await;
        out
    })
}

#[test]
fn no_bridge_url_or_signature_leaves_the_process() {
    // The web app's URL carries the deployment id (kept in a Secret) and every request's ts and
    // sig. A transport error used to quote it in the result, the agent's reply, the ops alert,
    // the audit record and the logs.
    let sfx = suffix();
    let settings = test_settings(&sfx);
    let _cleanup = Cleanup(settings.clone());
    let deployment = format!("AKfycbDEPLOYMENT{sfx}");
    let secret = format!("binary-test-{sfx}-with-enough-bytes");
    // Nobody listens there: every POST is a transport error.
    let port = free_port();
    let mut envs = env_for(&sfx);
    let health = free_port();
    envs.extend([
        (
            "POLLER__HEALTH__LISTEN".into(),
            format!("127.0.0.1:{health}"),
        ),
        ("POLLER__BRIDGE__MODE".into(), "apps_script".into()),
        (
            "POLLER__BRIDGE__URL".into(),
            format!("http://127.0.0.1:{port}/macros/s/{deployment}/exec"),
        ),
        ("POLLER__BRIDGE__RETRY_BUDGET_SECS".into(), "1".into()),
        ("POLLER__BRIDGE__MIN_BACKOFF_MS".into(), "50".into()),
        ("POLLER__BRIDGE__MAX_BACKOFF_MS".into(), "100".into()),
    ]);
    let mut poller = crate::common::isolated(BIN)
        .args(["run", "--log-format", "json"])
        .envs(envs.iter().cloned())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_ready(health);
    let reply = send(&envs, "examples/commands/sop-int-01-check-status.json");
    assert_eq!(reply["status"], "FAILED", "{reply}");
    assert!(
        reply["rationale"]
            .as_str()
            .unwrap()
            .contains("transport error"),
        "{reply}"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &poller.id().to_string()])
        .status();
    let _ = poller.wait();
    let mut logs = String::new();
    std::io::Read::read_to_string(poller.stderr.as_mut().unwrap(), &mut logs).unwrap();
    assert!(logs.contains("bridge call failed"), "{logs}");

    let results = drain_queue(&settings.topology.results_queue);
    let alerts = drain_queue(&format!("{}.ops", settings.topology.alerts_exchange));
    let audit = read_stream(&settings.audit.queue, "status-check-mailchimp-123");
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert!(!audit.is_empty());
    let channels = [
        ("reply", vec![reply.to_string()]),
        ("result", results),
        ("alert", alerts),
        ("audit", audit),
        ("log", vec![logs]),
    ];
    for (channel, texts) in &channels {
        for text in texts {
            for leak in [
                deployment.as_str(),
                "sig=",
                "ts=",
                "/macros/s/",
                secret.as_str(),
            ] {
                assert!(
                    !text.contains(leak),
                    "{leak} leaked into the {channel}: {text}"
                );
            }
        }
    }
}

/// The peak resident set (VmHWM) of `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn huge_messages_are_refused_without_being_copied() {
    // Finding 2: the 64 KiB check ran after the whole body was in memory, and the full body was
    // re-published as a dead letter: six 48 MiB messages took a replica from 28 MiB to a 1.0 GiB
    // peak. The bound that holds whatever arrives is the broker's max_message_size
    // (deploy/rabbitmq/rabbitmq.conf); this shows what the poller itself adds: one copy of each
    // body held while it is refused, none re-published.
    let sfx = suffix();
    let settings = test_settings(&sfx);
    let _cleanup = Cleanup(settings.clone());
    let mut envs = env_for(&sfx);
    let health = free_port();
    envs.push((
        "POLLER__HEALTH__LISTEN".into(),
        format!("127.0.0.1:{health}"),
    ));
    // The six are 288 MiB, over the queue's shipped 256 MiB of ready messages: a poller slower
    // to take them than the test to publish them (a busy machine) left the last ones refused
    // (reject-publish), unnoticed, and the count of dead letters short. The queue's own limit
    // has its tests; this one is about what the poller holds.
    envs.push((
        "POLLER__TOPOLOGY__MAX_LENGTH_BYTES".into(),
        (1u64 << 30).to_string(),
    ));
    let mut poller = crate::common::isolated(BIN)
        .args(["run", "--log-format", "json"])
        .envs(envs.iter().cloned())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_ready(health);
    let before = peak_rss_kib(poller.id());
    const HUGE: usize = 48 * 1024 * 1024;
    const COUNT: usize = 6;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A broker configured like the shipped one (max_message_size 1 MiB) refuses them at the
    // publisher; one left at RabbitMQ's default (128 MiB) delivers them to the poller.
    let refused_by_broker = rt.block_on(async {
        let conn = lapin::Connection::connect(crate::common::AMQP, Default::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        let body = vec![b'x'; HUGE];
        for _ in 0..COUNT {
            let sent = async {
                ch.basic_publish(
                    settings.topology.commands_exchange.as_str().into(),
                    "command.refresh_token".into(),
                    Default::default(),
                    &body,
                    lapin::BasicProperties::default().with_user_id("guest".into()),
                )
                .await?
                .await
            }
            .await;
            match sent {
                Err(e) => {
                    assert!(e.to_string().contains("max size"), "{e}");
                    return true;
                }
                // A refusal the test did not look at once made the dead letters look lost.
                Ok(confirm) => assert!(
                    confirm.is_ack(),
                    "the broker refused a 48 MiB command (nack): {:?}",
                    queue_depth(&settings.topology.commands_queue)
                ),
            }
        }
        let _ = conn.close(200, "done".into()).await;
        false
    });
    if refused_by_broker {
        let after = peak_rss_kib(poller.id());
        let _ = Command::new("kill")
            .args(["-TERM", &poller.id().to_string()])
            .status();
        let _ = poller.wait();
        println!(
            "BOUNDED: refused by the broker's max_message_size; peak RSS {} -> {} MiB",
            before / 1024,
            after / 1024
        );
        assert!(after - before < 16 * 1024);
        return;
    }
    // Every one dead-lettered: digest and size, no body.
    let t0 = Instant::now();
    let dead = loop {
        let dead = drain_queue_messages(&settings.topology.dead_letter_queue);
        if !dead.is_empty() || t0.elapsed() > Duration::from_secs(60) {
            break dead;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut dead = dead;
    while dead.len() < COUNT && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
        dead.extend(drain_queue_messages(&settings.topology.dead_letter_queue));
    }
    assert_eq!(
        dead.len(),
        COUNT,
        "dead letters after 60 s; the commands queue (ready, consumers): {:?}",
        queue_depth(&settings.topology.commands_queue)
    );
    assert!(dead.iter().all(|(body, _)| body.is_empty()));
    let after = peak_rss_kib(poller.id());
    let _ = Command::new("kill")
        .args(["-TERM", &poller.id().to_string()])
        .status();
    let _ = poller.wait();
    let grew_mib = (after.saturating_sub(before)) / 1024;
    println!(
        "BOUNDED: peak RSS {} MiB before, {} MiB after {COUNT} x 48 MiB (+{grew_mib} MiB); all dead-lettered {:.1} s after the last publish",
        before / 1024,
        after / 1024,
        t0.elapsed().as_secs_f64()
    );
    // Before: +1,000 MiB. The broker hands the poller up to `max_in_flight` messages at once,
    // and each is held once while it is refused.
    assert!(
        grew_mib < (COUNT * 48 + 64) as u64,
        "peak RSS grew by {grew_mib} MiB for {COUNT} x 48 MiB"
    );
}

/// `queue`'s ready messages and consumers, or why they can't be read.
fn queue_depth(queue: &str) -> Result<(u32, u32), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = lapin::Connection::connect(crate::common::AMQP, Default::default())
            .await
            .map_err(|e| e.to_string())?;
        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
        let q = crate::faults::depth(&ch, queue)
            .await
            .map_err(|e| e.to_string());
        let _ = conn.close(200, "done".into()).await;
        q
    })
}

/// Every message waiting in `queue`, taken off it: (body, headers as text).
fn drain_queue_messages(queue: &str) -> Vec<(Vec<u8>, String)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use lapin::options::BasicGetOptions;
        let conn = lapin::Connection::connect(crate::common::AMQP, Default::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Ok(Some(m)) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
        {
            out.push((
                m.delivery.data.clone(),
                format!("{:?}", m.delivery.properties.headers()),
            ));
        }
        let _ = conn.close(200, "done".into()).await;
        out
    })
}

#[test]
fn every_subcommand_and_flag_says_what_it_is_for() {
    let subcommands: &[&[&str]] = &[
        &[],
        &["run"],
        &["send"],
        &["bridge-simulator"],
        &["check-config"],
        &["pause"],
        &["resume"],
        &["halt"],
        &["status"],
        &["audit"],
        &["audit", "sink"],
        &["audit", "verify"],
        &["audit", "show"],
    ];
    for sub in subcommands {
        let out = crate::common::isolated(BIN)
            .args(*sub)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{sub:?}");
        let help = String::from_utf8_lossy(&out.stdout);
        let mut section = "";
        for line in help.lines() {
            if !line.starts_with(' ') {
                section = line;
                continue;
            }
            if !matches!(section, "Options:" | "Arguments:" | "Commands:") {
                continue;
            }
            // "  --flag <VALUE>   Description"; a continuation line is indented further.
            let entry = line.trim_start();
            if !(entry.starts_with('-') || entry.starts_with('<') || section == "Commands:") {
                continue;
            }
            // What follows the flag column, without clap's "[default: …]" and "[env: …]".
            let text: String = line
                .trim()
                .split("  ")
                .filter(|p| !p.trim().is_empty())
                .skip(1)
                .collect::<Vec<_>>()
                .join(" ");
            let words = text.split('[').next().unwrap_or("").trim().to_owned();
            let described = !words.is_empty();
            assert!(described, "{sub:?}: no help text for {:?}", line.trim());
        }
    }
}

#[test]
fn check_config_online_names_each_problem_run_would_trip_on() {
    let sfx = suffix();
    let settings = test_settings(&sfx);
    let _cleanup = Cleanup(settings.clone());
    // The poller's topology in place, as a first run (or the shipped definitions) leaves it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = lapin::Connection::connect(crate::common::AMQP, Default::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        command_poller::broker::declare(&ch, &settings.topology)
            .await
            .unwrap();
        command_poller::broker::declare_audit(
            &conn,
            &settings.audit,
            &settings.topology.replication,
        )
        .await
        .unwrap();
        command_poller::broker::declare_control(
            &ch,
            &settings.control,
            &settings.topology.replication,
        )
        .await
        .unwrap();
        let _ = conn.close(200, "done".into()).await;
    });
    let envs = env_for(&sfx);
    let good = crate::common::isolated(BIN)
        .args(["check-config", "--online"])
        .envs(envs.iter().cloned())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&good.stdout);
    assert!(
        good.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&good.stderr)
    );
    for key in [
        "panel.judges",
        "idempotency.path",
        "amqp.url",
        "topology.commands_queue",
        "control.state_queue",
        "audit.queue",
    ] {
        assert!(out.contains(&format!("ok      {key}")), "{key}: {out}");
    }

    // A cluster: every node is checked, not only the one that answered first. Node 2 here is
    // the same broker by another name, node 3 a port nothing listens on.
    let dead = crate::common::free_port();
    let cluster = crate::common::isolated(BIN)
        .args(["check-config", "--online"])
        .envs(envs.iter().cloned())
        .env(
            "POLLER__AMQP__URLS",
            format!(
                "{},amqp://guest:guest@localhost:5672/%2f,amqp://guest:guest@127.0.0.1:{dead}/%2f",
                crate::common::AMQP
            ),
        )
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&cluster.stdout);
    assert!(!cluster.status.success(), "{out}");
    assert!(
        out.contains(
            "ok      amqp.urls: node 2 of 3 (amqp://guest:***@localhost:5672/%2f) takes guest too"
        ),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "PROBLEM amqp.urls: node 3 of 3 (amqp://guest:***@127.0.0.1:{dead}/%2f): can't connect"
        )),
        "{out}"
    );

    // Everything `run` would trip on, at once, each named by its key; no secret printed.
    let bad = crate::common::isolated(BIN)
        .args(["check-config", "--online"])
        .envs(envs.iter().cloned())
        .env(
            "POLLER__AMQP__URL",
            "amqp://guest:not-the-password@127.0.0.1:5672/%2f",
        )
        .env("POLLER__BRIDGE__MODE", "apps_script")
        .env(
            "POLLER__BRIDGE__URL",
            "https://script.google.com/macros/s/x/exec",
        )
        .env(
            "POLLER__BRIDGE__SECRET_ENV",
            format!("UNSET_BRIDGE_SECRET_{sfx}"),
        )
        .env("POLLER__IDEMPOTENCY__BACKEND", "postgres")
        .env(
            "POLLER__IDEMPOTENCY__URL",
            "postgres://postgres@127.0.0.1:1/test",
        )
        .env(
            "POLLER__IDEMPOTENCY__KEY_ENV",
            format!("UNSET_STORE_KEY_{sfx}"),
        )
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !err.contains('\u{1b}'),
        "colour codes in a piped log: {err}"
    );
    let out = String::from_utf8_lossy(&bad.stdout);
    for key in [
        "bridge.secret_env",
        "idempotency.key_env",
        "idempotency.url",
        "amqp.url",
    ] {
        assert!(out.contains(&format!("PROBLEM {key}")), "{key}: {out}");
    }
    assert!(!out.contains("not-the-password"), "{out}");
}

#[test]
fn audit_verify_takes_the_chain_key() {
    let file = std::env::temp_dir().join(format!("keyed-{}.jsonl", suffix()));
    let key = command_poller::bridge::signing::Secret::new("binary-chain-key");
    let mut w = command_poller::audit::chain::ChainWriter::open_keyed(&file, Some(key)).unwrap();
    w.append(r#"{"kind":"command","action_id":"k-1"}"#).unwrap();
    drop(w);
    let without = crate::common::isolated(BIN)
        .args(["audit", "verify"])
        .arg(&file)
        .env_remove("AUDIT_CHAIN_KEY")
        .output()
        .unwrap();
    assert!(!without.status.success());
    assert!(String::from_utf8_lossy(&without.stdout).contains("needs the chain key"));
    let with = crate::common::isolated(BIN)
        .args(["audit", "verify"])
        .arg(&file)
        .env("AUDIT_CHAIN_KEY", "binary-chain-key")
        .output()
        .unwrap();
    assert!(
        with.status.success(),
        "{}",
        String::from_utf8_lossy(&with.stdout)
    );
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(command_poller::audit::chain::head_path(&file));
}

/// The security team reads an exported chain on a machine of its own, with no config folder:
/// `audit verify` and `audit show` need only the chain key, from the variable the shipped
/// configuration names (they failed "loading configuration from config").
#[test]
fn audit_verify_and_show_run_without_a_config_folder() {
    let outside = std::env::temp_dir().join(format!("no-config-{}", suffix()));
    std::fs::create_dir_all(&outside).unwrap();
    let file = outside.join("exported.jsonl");
    let key = command_poller::bridge::signing::Secret::new("binary-chain-key");
    let mut w = command_poller::audit::chain::ChainWriter::open_keyed(&file, Some(key)).unwrap();
    w.append(r#"{"kind":"command","action_id":"x-1","agent":"a"}"#)
        .unwrap();
    drop(w);
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"),
    )
    .unwrap();
    assert!(
        shipped.contains(r#"chain_key_env = "AUDIT_CHAIN_KEY""#),
        "the shipped configuration names the variable the binary reads without one"
    );
    let run = |args: &[&str], key: Option<&str>| {
        let mut c = crate::common::isolated(BIN);
        c.args(args).arg(&file).current_dir(&outside);
        match key {
            Some(k) => c.env("AUDIT_CHAIN_KEY", k),
            None => c.env_remove("AUDIT_CHAIN_KEY"),
        };
        c.output().unwrap()
    };
    let verified = run(&["audit", "verify"], Some("binary-chain-key"));
    assert!(
        verified.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
    let wrong = run(&["audit", "verify"], Some("another-key"));
    assert!(!wrong.status.success(), "a wrong key does not verify");
    let without = run(&["audit", "verify"], None);
    assert!(String::from_utf8_lossy(&without.stdout).contains("needs the chain key"));
    let shown = run(
        &["audit", "show", "--action-id", "x-1"],
        Some("binary-chain-key"),
    );
    assert!(shown.status.success());
    assert_eq!(String::from_utf8_lossy(&shown.stdout).lines().count(), 1);
    // Everything else still needs its configuration.
    let status = crate::common::isolated(BIN)
        .args(["check-config"])
        .current_dir(&outside)
        .output()
        .unwrap();
    assert!(!status.status.success());
    let _ = std::fs::remove_dir_all(&outside);
}

/// With a chain key configured, an unkeyed chain (one rewritten without the key looks just like
/// it) is refused; checking it as unkeyed takes `--unkeyed`, which says what it does not prove.
#[test]
fn audit_verify_with_a_key_refuses_an_unkeyed_chain_unless_asked() {
    let file = std::env::temp_dir().join(format!("unkeyed-{}.jsonl", suffix()));
    let mut w = command_poller::audit::chain::ChainWriter::open_keyed(&file, None).unwrap();
    w.append(r#"{"kind":"command","action_id":"u-1"}"#).unwrap();
    drop(w);
    let verify = |extra: &[&str]| {
        crate::common::isolated(BIN)
            .args(["audit", "verify"])
            .arg(&file)
            .args(extra)
            .env("AUDIT_CHAIN_KEY", "binary-chain-key")
            .output()
            .unwrap()
    };
    let keyed = verify(&[]);
    assert!(!keyed.status.success());
    assert!(
        String::from_utf8_lossy(&keyed.stdout).contains("an unkeyed record in a keyed chain"),
        "{}",
        String::from_utf8_lossy(&keyed.stdout)
    );
    let asked = verify(&["--unkeyed"]);
    assert!(
        asked.status.success(),
        "{}",
        String::from_utf8_lossy(&asked.stdout)
    );
    assert!(String::from_utf8_lossy(&asked.stderr).contains("without the chain key"));
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(command_poller::audit::chain::head_path(&file));
}

#[test]
fn production_refuses_the_embedded_store_unless_allowed() {
    let sfx = suffix();
    let mut envs = env_for(&sfx);
    envs.retain(|(k, _)| k != "APP_ENVIRONMENT");
    let out = crate::common::isolated(BIN)
        .arg("run")
        .envs(envs.iter().cloned())
        .env("APP_ENVIRONMENT", "production")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("idempotency.backend") && err.contains("allow_embedded_in_production"),
        "{err}"
    );
}

/// GET `path` on 127.0.0.1:`port`; the body.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    Some(buf.split("\r\n\r\n").nth(1)?.to_owned())
}

fn status_digest(port: u16) -> String {
    let body = http_get(port, "/status").expect("/status answers");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["policy_sha256"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn sighup_reloads_the_policy_and_a_bad_file_is_refused_without_stopping() {
    let sfx = suffix();
    let _cleanup = Cleanup(test_settings(&sfx));
    let shipped = std::fs::read_to_string("config/policy.toml").unwrap();
    let blocking = shipped.replace(
        "[commands.CHECK_INTEGRATION_STATUS]\naction = \"ALLOW\"",
        "[commands.CHECK_INTEGRATION_STATUS]\naction = \"BLOCK\"",
    );
    assert_ne!(blocking, shipped);
    let digest = |t: &str| {
        command_poller::policy::Policy::parse(t)
            .unwrap()
            .digest()
            .to_owned()
    };
    let file = std::env::temp_dir().join(format!("sighup-policy-{sfx}.toml"));
    std::fs::write(&file, &shipped).unwrap();
    let mut envs = env_for(&sfx);
    let (port, status_port) = (free_port(), free_port());
    envs.push(("POLLER__HEALTH__LISTEN".into(), format!("127.0.0.1:{port}")));
    envs.push((
        "POLLER__HEALTH__STATUS_LISTEN".into(),
        format!("127.0.0.1:{status_port}"),
    ));
    envs.push(("POLLER__POLICY__FILE".into(), file.display().to_string()));
    let mut poller = crate::common::isolated(BIN)
        .args(["run", "--log-format", "json"])
        .envs(envs.iter().cloned())
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_ready(port);
    assert_eq!(status_digest(status_port), digest(&shipped));
    let hup = |pid: u32| {
        assert!(Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success())
    };
    let wait_digest = |want: &str| {
        let t0 = Instant::now();
        while status_digest(status_port) != want {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "digest never became {want}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    std::fs::write(&file, &blocking).unwrap();
    hup(poller.id());
    wait_digest(&digest(&blocking));
    let r = send(&envs, "examples/commands/sop-int-01-check-status.json");
    assert_eq!(r["status"], "BLOCKED", "{r}");

    // A broken file: refused, the process keeps running on the policy in force.
    std::fs::write(
        &file,
        blocking.replace("floor_severity = \"HIGH\"", "floor_severty = \"HIGH\""),
    )
    .unwrap();
    hup(poller.id());
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(500) {
        assert!(
            poller.try_wait().unwrap().is_none(),
            "SIGHUP stopped the poller"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(status_digest(status_port), digest(&blocking));
    let r = send(
        &envs,
        "examples/commands/sop-int-03-connect-integration.json",
    );
    assert_eq!(r["status"], "BLOCKED");

    let _ = Command::new("kill")
        .args(["-TERM", &poller.id().to_string()])
        .status();
    assert!(poller.wait().unwrap().success());
    let mut logs = String::new();
    std::io::Read::read_to_string(poller.stderr.as_mut().unwrap(), &mut logs).unwrap();
    assert!(logs.contains("policy reload refused"), "{logs}");
    assert!(logs.contains("floor_severty"), "the refusal names the key");
    let _ = std::fs::remove_file(&file);
}

/// Shell completions and the manual page, from an empty directory (no configuration needed):
/// the bash script is valid bash and completes every subcommand; the page names them too.
#[test]
fn completions_and_the_manual_page_need_no_configuration() {
    let outside = std::env::temp_dir().join(format!("completions-{}", suffix()));
    std::fs::create_dir_all(&outside).unwrap();
    let run = |args: &[&str]| {
        let out = crate::common::isolated(BIN)
            .args(args)
            .current_dir(&outside)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let subcommands = [
        "run",
        "send",
        "pause",
        "halt",
        "quarantine",
        "audit",
        "policy",
    ];
    for shell in ["bash", "zsh", "fish"] {
        let script = run(&["completions", shell]);
        for s in subcommands {
            assert!(script.contains(s), "{shell} completes {s}");
        }
    }
    let script = outside.join("command-poller.bash");
    std::fs::write(&script, run(&["completions", "bash"])).unwrap();
    let parsed = std::process::Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        parsed.status.success(),
        "{}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    let page = run(&["man"]);
    assert!(page.contains(".TH command-poller 1"), "{page}");
    for s in subcommands {
        assert!(page.contains(s), "the manual page names {s}");
    }
    let _ = std::fs::remove_dir_all(&outside);
}
