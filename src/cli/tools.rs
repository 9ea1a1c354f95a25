//! The command line's one-shot tools: `send` as an agent, `policy test` and `policy replay`,
//! `judges eval`, `audit` (sink, show, verify) and `check-config`.

use super::args::{AuditCommand, PolicyCommand};
use super::levers::endpoints_of;
use super::serve::watch_signals;
use crate::settings::Settings;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Reads a file, or standard input for "-".
fn read_input(file: &Path) -> anyhow::Result<Vec<u8>> {
    if file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
        Ok(buf)
    } else {
        std::fs::read(file).with_context(|| format!("reading {}", file.display()))
    }
}

/// `send`: publishes a command as an agent, and with `wait` prints its result.
pub(super) async fn send(
    settings: &Settings,
    file: &Path,
    wait: Option<Duration>,
    amqp_url: Option<String>,
    no_user_id: bool,
) -> anyhow::Result<ExitCode> {
    let payload = read_input(file)?;
    let endpoints = endpoints_of(amqp_url, settings)?;
    let result = crate::agent::send(
        &payload,
        crate::agent::SendOptions {
            endpoints: &endpoints,
            exchange: &settings.topology.commands_exchange,
            wait,
            omit_user_id: no_user_id,
        },
    )
    .await?;
    match result {
        Some(r) => println!("{}", serde_json::to_string_pretty(&r)?),
        None => println!("published"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `policy test`, `policy replay`, and `policy reload` (a lever: every replica reloads).
pub(super) async fn policy(
    settings: &Settings,
    command: PolicyCommand,
    request_id: String,
) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Test {
            file,
            policy,
            json,
            agent,
            earlier_attempts,
        } => policy_test(settings, &file, policy, json, agent, earlier_attempts),
        PolicyCommand::Replay {
            audit,
            policy,
            json,
        } => policy_replay(&audit, &policy, json),
        PolicyCommand::Reload { op } => {
            let cmd = crate::control::ControlCommand::ReloadPolicy { request_id };
            super::levers::operate(settings, op, cmd).await
        }
        PolicyCommand::Approve {
            policy,
            audit,
            reason,
            op,
        } => {
            let file = policy.unwrap_or_else(|| settings.policy.file.clone());
            let candidate = crate::policy::Policy::load(&file)?;
            if let Some(audit) = audit {
                // What the approvers bind to: the recorded commands this file decides otherwise.
                println!("The audit's commands under {}:", file.display());
                policy_replay(&audit, &file, false)?;
            }
            println!(
                "Approving {} (SHA-256 {}) for loading:",
                file.display(),
                candidate.digest()
            );
            let cmd = crate::control::ControlCommand::ApprovePolicy {
                digest: candidate.digest().to_owned(),
                reason,
                request_id,
            };
            super::levers::operate(settings, op, cmd).await
        }
    }
}

/// `policy test`: how the policy (and the configured panel) would handle one command.
fn policy_test(
    settings: &Settings,
    file: &Path,
    policy: Option<PathBuf>,
    json: bool,
    agent: Option<String>,
    earlier_attempts: usize,
) -> anyhow::Result<ExitCode> {
    let policy_file = policy.unwrap_or_else(|| settings.policy.file.clone());
    let policy = crate::policy::Policy::load(&policy_file)?;
    let bytes = read_input(file)?;
    let cmd = crate::intake::decode(&bytes, None, crate::intake::DecodeLimits::default())
        .map_err(|e| anyhow::anyhow!("the command would be REJECTED: {e}"))?;
    let judges: Vec<String> = settings
        .panel
        .judges
        .iter()
        .map(|j| j.name().to_owned())
        .collect();
    if let Some(a) = &agent {
        crate::intake::AgentId::parse(a).map_err(|e| anyhow::anyhow!("--agent: {e}"))?;
    }
    let who = crate::policy::explain::TestAgent {
        id: agent,
        earlier_attempts,
    };
    let e = crate::policy::explain::explain(&policy, &cmd, &who, &judges, settings.panel.quorum);
    if json {
        println!("{}", serde_json::to_string_pretty(&e)?);
    } else {
        print!("{}", e.text());
    }
    Ok(ExitCode::SUCCESS)
}

/// `policy replay`: the audit's commands re-decided under a candidate policy.
fn policy_replay(audit: &Path, policy: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let candidate = crate::policy::Policy::load(policy)?;
    let text = std::fs::read_to_string(audit).with_context(|| format!("{}", audit.display()))?;
    let (recorded, skipped) =
        crate::policy::replay::read(&text).with_context(|| format!("{}", audit.display()))?;
    let report = crate::policy::replay::replay(&candidate, &recorded, skipped);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(ExitCode::SUCCESS)
}

/// `check-config`: the settings, the policy and (offline) the secrets, or (online) every
/// service the poller would reach.
pub(super) async fn check_config(settings: &Settings, online: bool) -> anyhow::Result<ExitCode> {
    let policy = crate::policy::Policy::load(&settings.policy.file)?;
    crate::approval::check_ttls(&policy, settings.idempotency.retention)
        .map_err(anyhow::Error::msg)?;
    // Offline: only the secrets, and only their problems are printed.
    let findings = if online {
        crate::preflight::check(settings).await
    } else {
        crate::preflight::secrets(settings)
    };
    for f in findings.iter().filter(|f| online || !f.ok) {
        let mark = if f.ok { "ok     " } else { "PROBLEM" };
        println!("{mark} {}: {}", f.key, f.detail);
    }
    let problems = findings.iter().filter(|f| !f.ok).count();
    if problems > 0 {
        eprintln!("check-config: {problems} problem(s); `run` would fail or misbehave");
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "configuration OK: {} judge(s), quorum {}, bridge {:?}, policy {} (sha256 {})",
        settings.panel.judges.len(),
        settings.panel.quorum,
        settings.bridge.mode,
        settings.policy.file.display(),
        policy.digest()
    );
    Ok(ExitCode::SUCCESS)
}

/// `judges eval`: every judge against labelled cases.
pub(super) async fn judges_eval(
    settings: &Settings,
    file: &std::path::Path,
    rules: &[String],
    policy: Option<PathBuf>,
    json: bool,
    baseline: Option<PathBuf>,
    max_false_approve: Option<f64>,
) -> anyhow::Result<ExitCode> {
    use crate::judging::eval::{self, RowRule};
    use std::sync::Arc;
    let rules: Vec<RowRule> = if rules.is_empty() {
        let mut all = vec![RowRule::Policy];
        all.extend(crate::judging::DecisionRule::ALL.map(RowRule::Fixed));
        all
    } else {
        rules
            .iter()
            .map(|r| match r.as_str() {
                "policy" => Ok(RowRule::Policy),
                other => other.parse().map(RowRule::Fixed),
            })
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?
    };
    let policy_file = policy.unwrap_or_else(|| settings.policy.file.clone());
    let policy = crate::policy::Policy::load(&policy_file)?;
    let text = std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
    let cases = eval::load_cases(&text).with_context(|| format!("{}", file.display()))?;
    let windows = Arc::new(eval::CaseWindows::default());
    let panel = crate::compose::build_panel(
        &settings.panel,
        &settings.secrets.judge_api_keys,
        windows.clone(),
    )?;
    let shape = eval::PanelShape::of(&panel);
    let mut runs = Vec::with_capacity(cases.len());
    for (i, case) in cases.iter().enumerate() {
        runs.push(eval::run_case(&panel, &policy, &windows, case).await);
        if !json && (i + 1) % 25 == 0 {
            eprintln!("judges eval: {} of {} cases", i + 1, cases.len());
        }
    }
    let report = eval::score(&shape, policy.digest(), &cases, runs, &rules);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    let mut failed = false;
    if let Some(path) = baseline {
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        let base: eval::Report =
            serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
        for r in report.regressions(&base) {
            eprintln!("regression: {r}");
            failed = true;
        }
    }
    if let Some(max) = max_false_approve {
        let pipeline = report
            .rows
            .iter()
            .find(|r| r.kind == "pipeline")
            .expect("score adds the pipeline row");
        if pipeline.false_approve_rate > max {
            eprintln!(
                "policy+panel approves {:.1}% of what it should deny: above --max-false-approve {:.1}%",
                pipeline.false_approve_rate * 100.0,
                max * 100.0
            );
            failed = true;
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `audit`: the sink, and reading the chain back (show, verify).
pub(super) async fn audit(settings: &Settings, cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Sink { file } => {
            let stop = CancellationToken::new();
            tokio::spawn(watch_signals(stop.clone()));
            let n = crate::audit::sink::run(
                &crate::audit::sink::SinkConfig::from_settings(settings),
                &file,
                stop,
            )
            .await?;
            tracing::info!(appended = n, "audit sink stopped");
            Ok(ExitCode::SUCCESS)
        }
        cmd => read_back(cmd, settings.secrets.audit_chain_key.clone()),
    }
}

/// The chain key's variable in the shipped configuration (`audit.chain_key_env` in
/// config/default.toml): where `audit verify` and `audit show` take the key from when there is no
/// config folder.
pub(super) const SHIPPED_CHAIN_KEY_ENV: &str = "AUDIT_CHAIN_KEY";

/// `audit verify` and `audit show`: reading a chain back, with the chain key `key`.
pub(super) fn read_back(
    cmd: AuditCommand,
    key: Option<crate::bridge::signing::Secret>,
) -> anyhow::Result<ExitCode> {
    use crate::audit::chain;
    match cmd {
        AuditCommand::Verify { file, unkeyed } => {
            let key = key.as_ref().filter(|_| !unkeyed);
            if unkeyed {
                eprintln!("checking without the chain key (--unkeyed): the links are checked, but anyone who can write the file could have rewritten them");
            }
            let report = chain::verify_with(&file, key)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        AuditCommand::Show {
            file,
            action_id,
            agent,
            since,
        } => {
            if action_id.is_none() && agent.is_none() {
                anyhow::bail!("give --action-id, or --agent (with --since if you like)");
            }
            let since = since
                .map(|s| {
                    time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
                })
                .transpose()
                .context("--since must be RFC 3339, e.g. 2026-11-24T00:00:00Z")?;
            let rows = chain::select(&file, |r| {
                let at = r["at"].as_str().and_then(|a| {
                    time::OffsetDateTime::parse(a, &time::format_description::well_known::Rfc3339)
                        .ok()
                });
                action_id.as_deref().is_none_or(|a| r["action_id"] == a)
                    && agent.as_deref().is_none_or(|a| r["agent"] == a)
                    && since.is_none_or(|s| at.is_some_and(|at| at >= s))
            })?;
            for row in rows {
                println!("{}", serde_json::to_string(&row)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Export { .. } | AuditCommand::VerifyBundle { .. } => {
            super::incident::bundle(cmd, key)
        }
        AuditCommand::Sink { .. } => anyhow::bail!("the sink does not read a chain back"),
    }
}
