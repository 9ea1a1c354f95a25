//! `command-poller judges eval` as an operator runs it: exact confusion counts on a small
//! fixture set, the shipped case set against the shipped rule panel and against an emulated
//! LLM panel (a local OpenAI-compatible server) compared with the committed baselines, and the
//! gates failing when they should.

use crate::common::*;
use axum::routing::post;
use axum::{Json, Router};
use std::path::{Path, PathBuf};
use std::process::Output;

fn eval(args: &[&str], config_dir: Option<&Path>) -> Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_command-poller"));
    c.args(["judges", "eval"])
        .args(args)
        .env("APP_ENVIRONMENT", "local");
    if let Some(d) = config_dir {
        c.args(["--config-dir", d.to_str().unwrap()]);
    }
    c.output().unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn row<'a>(
    report: &'a serde_json::Value,
    kind: &str,
    name: &str,
    rule: Option<&str>,
) -> &'a serde_json::Value {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| {
            r["kind"] == kind && r["name"] == name && rule.is_none_or(|rule| r["rule"] == rule)
        })
        .unwrap_or_else(|| panic!("no row {kind} {name} {rule:?}"))
}

fn counts(r: &serde_json::Value) -> (u64, u64, u64) {
    (
        r["false_approve"].as_u64().unwrap(),
        r["false_deny"].as_u64().unwrap(),
        r["unavailable"].as_u64().unwrap(),
    )
}

fn case(
    id: &str,
    ctype: &str,
    service: &str,
    sev: &str,
    verified: bool,
    history: &str,
    expect: &str,
) -> String {
    format!(
        r#"{{"id":"{id}","command":{{"action_id":"fx-{id}","command_type":"{ctype}","params":{{"service":"{service}"}},"severity":"{sev}"}},"agent":"agent-7","verified":{verified},"history":{history},"expect":"{expect}","why":"fixture"}}"#
    )
}

#[test]
fn a_small_fixture_set_gives_the_exact_confusion_counts() {
    let burst = r#"[{"status":"SUCCESS","ago_secs":60},{"status":"SUCCESS","ago_secs":120},{"status":"SUCCESS","ago_secs":180},{"status":"SUCCESS","ago_secs":240},{"status":"SUCCESS","ago_secs":300}]"#;
    let stale = r#"[{"status":"SUCCESS","ago_secs":4000},{"status":"SUCCESS","ago_secs":5000},{"status":"SUCCESS","ago_secs":6000},{"status":"SUCCESS","ago_secs":7000},{"status":"SUCCESS","ago_secs":8000}]"#;
    let lines = [
        // Approved by every rule judge, rightly.
        case(
            "good",
            "REFRESH_TOKEN",
            "google",
            "MEDIUM",
            true,
            "[]",
            "approve",
        ),
        // Five refreshes more than an hour ago: outside compliance's windows, approved rightly.
        case(
            "stale-history",
            "REFRESH_TOKEN",
            "google",
            "MEDIUM",
            true,
            stale,
            "approve",
        ),
        // security and business veto the unknown service.
        case(
            "unknown",
            "REFRESH_TOKEN",
            "salesforce",
            "MEDIUM",
            true,
            "[]",
            "deny",
        ),
        // security vetoes the unverified agent.
        case(
            "unverified",
            "REFRESH_TOKEN",
            "google",
            "MEDIUM",
            false,
            "[]",
            "deny",
        ),
        // compliance vetoes the sixth in five minutes (its burst rule).
        case(
            "burst",
            "REFRESH_TOKEN",
            "google",
            "MEDIUM",
            true,
            burst,
            "deny",
        ),
        // security vetoes the understated severity.
        case(
            "understated",
            "REFRESH_TOKEN",
            "google",
            "LOW",
            true,
            "[]",
            "deny",
        ),
        // compliance vetoes CONNECT (and the policy blocks it anyway).
        case(
            "connect",
            "CONNECT_INTEGRATION",
            "google",
            "HIGH",
            true,
            "[]",
            "deny",
        ),
        // Labelled deny for a reason no rule sees: every judge and the panel approve it.
        case(
            "unseen",
            "REFRESH_TOKEN",
            "meta",
            "MEDIUM",
            true,
            "[]",
            "deny",
        ),
    ];
    let file = std::env::temp_dir().join(format!("eval-fixture-{}.jsonl", suffix()));
    std::fs::write(&file, lines.join("\n")).unwrap();
    let report = json(&eval(&[file.to_str().unwrap(), "--json"], None));
    std::fs::remove_file(&file).unwrap();
    assert_eq!(report["cases"], 8);
    // Judges alone: (false approvals, false denials, unavailable).
    // security approves burst, connect, unseen.
    assert_eq!(counts(row(&report, "judge", "security", None)), (3, 0, 0));
    // compliance approves unknown, unverified, understated, unseen.
    assert_eq!(counts(row(&report, "judge", "compliance", None)), (4, 0, 0));
    // business approves unverified, burst, understated, connect, unseen.
    assert_eq!(counts(row(&report, "judge", "business", None)), (5, 0, 0));
    for rule in ["majority", "unanimous", "veto", "policy"] {
        assert_eq!(
            counts(row(&report, "panel", "panel", Some(rule))),
            (1, 0, 0),
            "{rule}"
        );
    }
    let p = row(&report, "pipeline", "policy+panel", Some("policy"));
    assert_eq!(counts(p), (1, 0, 0));
    assert_eq!(
        (p["should_deny"].as_u64(), p["should_approve"].as_u64()),
        (Some(6), Some(2))
    );
    assert_eq!(p["false_approve_rate"], 0.1667);
    let mistakes: Vec<&str> = report["mistakes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(mistakes, ["unseen"]);
}

#[test]
fn the_shipped_set_against_the_rule_panel_holds_its_baseline_and_the_gates_can_fail() {
    let text = std::fs::read_to_string("eval/judges.jsonl").unwrap();
    let cases = text.lines().filter(|l| l.starts_with('{')).count();
    assert!(cases >= 150, "{cases} cases");
    let out = eval(
        &[
            "eval/judges.jsonl",
            "--baseline",
            "eval/baseline-rules.json",
        ],
        None,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("policy+panel"), "{stdout}");
    // The gate passes at 0 for the shipped panel...
    let out = eval(&["eval/judges.jsonl", "--max-false-approve", "0"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A weaker panel (the service lists dropped) regresses against the baseline.
    let dir = std::env::temp_dir().join(format!("eval-weak-{}", suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let default = std::fs::read_to_string("config/default.toml").unwrap();
    // No service list anywhere: look-alikes and unknown services get through.
    let weak = default.replace(
        "allowed_services = [\"mailchimp\", \"meta\", \"google\"]\n",
        "",
    );
    assert_ne!(weak, default);
    std::fs::write(dir.join("default.toml"), weak).unwrap();
    std::fs::copy("config/local.toml", dir.join("local.toml")).unwrap();
    let out = eval(
        &[
            "eval/judges.jsonl",
            "--baseline",
            "eval/baseline-rules.json",
        ],
        Some(&dir),
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("regression: judge security: false approvals"),
        "{err}"
    );
}

/// An emulated model, deterministic: it reads the request like a lenient small model does
/// (published LLM judges approve most of what they see). It denies an unverified agent only as
/// the security judge, an unknown service as the security or business judge, and CONNECT as
/// the compliance judge; it never weighs severity or history. One answer in 16 (by a hash of
/// the request) is malformed, so "unavailable" is measured too.
async fn emulated_model(Json(body): Json<serde_json::Value>) -> Json<serde_json::Value> {
    let system = body["messages"][0]["content"].as_str().unwrap_or("");
    let user: serde_json::Value =
        serde_json::from_str(body["messages"][1]["content"].as_str().unwrap_or("{}"))
            .unwrap_or_default();
    let r = &user["request"];
    let role = ["SECURITY", "COMPLIANCE", "BUSINESS"]
        .into_iter()
        .find(|role| system.contains(role))
        .unwrap_or("");
    let known = ["mailchimp", "meta", "google"].contains(&r["service"].as_str().unwrap_or(""));
    let verified = r["agent"]["verified_by_broker"] == true;
    let connect = r["command_type"] == "CONNECT_INTEGRATION";
    let deny = match role {
        "SECURITY" => !verified || !known,
        "BUSINESS" => !known,
        "COMPLIANCE" => connect,
        _ => false,
    };
    let digest = {
        use sha2::{Digest, Sha256};
        // Stable fields only: the history's timestamps move with the clock.
        let history = user["context"]["recent_attempts_by_this_agent_of_this_type"]
            .as_array()
            .map_or(0, |h| h.len());
        Sha256::digest(format!("{role}{r}{history}").as_bytes())[0]
    };
    let content = if digest % 16 == 0 {
        "I think this is fine.".to_owned()
    } else {
        serde_json::json!({
            "decision": if deny { "deny" } else { "approve" },
            "reason": "emulated"
        })
        .to_string()
    };
    Json(serde_json::json!({
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]
    }))
}

fn llm_config_dir(base_url: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("eval-llm-{}", suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let default = std::fs::read_to_string("config/default.toml").unwrap();
    let cut = default.find("[[panel.judges]]").unwrap();
    let end = default.find("[bridge]").unwrap();
    let mut panel = String::new();
    for role in ["security", "compliance", "business"] {
        panel.push_str(&format!(
            "[[panel.judges]]\nname = \"{role}\"\nkind = \"llm\"\ntimeout_ms = 5000\nbase_url = \"{base_url}\"\nmodel = \"emulated\"\nprompt_file = \"config/prompts/{role}.md\"\n\n"
        ));
    }
    std::fs::write(
        dir.join("default.toml"),
        format!("{}{}{}", &default[..cut], panel, &default[end..]),
    )
    .unwrap();
    std::fs::copy("config/local.toml", dir.join("local.toml")).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_set_against_an_emulated_llm_panel_holds_its_baseline() {
    let app = Router::new().route("/v1/chat/completions", post(emulated_model));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let dir = llm_config_dir(&format!("http://{addr}/v1"));
    let d = dir.clone();
    // EVAL_WRITE_BASELINE=1 writes the baseline anew (after an intended change).
    let write = std::env::var_os("EVAL_WRITE_BASELINE").is_some();
    let out = tokio::task::spawn_blocking(move || {
        let mut args = vec!["eval/judges.jsonl", "--json"];
        if !write {
            args.extend(["--baseline", "eval/baseline-emulated.json"]);
        }
        eval(&args, Some(&d))
    })
    .await
    .unwrap();
    if write {
        std::fs::write("eval/baseline-emulated.json", &out.stdout).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let report = json(&out);
    // Every judge really went over HTTP: the malformed answers are unavailable, not verdicts.
    let security = row(&report, "judge", "security", None);
    assert!(security["unavailable"].as_u64().unwrap() > 0, "{security}");
    // The lenient model's compliance judge approves every refresh, whatever its history.
    let compliance = row(&report, "judge", "compliance", None);
    assert!(
        compliance["false_approve_rate"].as_f64().unwrap() > 0.3,
        "{compliance}"
    );
    // The rules differ on the same answers: unanimous never approves more than majority.
    let fa = |rule| counts(row(&report, "panel", "panel", Some(rule))).0;
    assert!(fa("unanimous") <= fa("majority"));
    assert!(fa("veto") <= fa("majority"));
}

#[test]
fn policy_test_explains_a_command_with_no_broker() {
    let run = |body: &str, json: bool| {
        let file = std::env::temp_dir().join(format!("policy-test-{}.json", suffix()));
        std::fs::write(&file, body).unwrap();
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_command-poller"));
        c.args(["policy", "test", file.to_str().unwrap()])
            .env("APP_ENVIRONMENT", "local")
            // Nothing listens there: the command must not need a broker.
            .env("POLLER__AMQP__URL", "amqp://guest:guest@127.0.0.1:1/%2f");
        if json {
            c.arg("--json");
        }
        let out = c.output().unwrap();
        std::fs::remove_file(&file).unwrap();
        out
    };
    let out = run(
        r#"{"action_id":"p-1","command_type":"REFRESH_TOKEN","params":{"service":"google"},"severity":"MEDIUM"}"#,
        false,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("handling:  JUDGE"), "{text}");
    assert!(
        text.contains("judges:    security, compliance, business (rule majority, quorum 2)"),
        "{text}"
    );
    assert!(text.contains("if NEEDS_APPROVAL   ops.normal"), "{text}");
    let out = run(
        r#"{"action_id":"p-2","command_type":"CHECK_INTEGRATION_STATUS","params":{"service":"meta"},"severity":"HIGH"}"#,
        true,
    );
    let e = json(&out);
    assert_eq!(e["handling"], "JUDGE", "HIGH escalates an ALLOW type: {e}");
    assert!(e["rationale"]
        .as_str()
        .unwrap()
        .contains("Escalated to the judges"));
    // A command intake would refuse says so, naming the field.
    let out = run(
        r#"{"action_id":"p 3","command_type":"REFRESH_TOKEN"}"#,
        false,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("would be REJECTED") && err.contains("action_id"),
        "{err}"
    );
}
