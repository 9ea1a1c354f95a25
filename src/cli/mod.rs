//! Command line: `run` (the poller), `send` (act as an agent), `bridge-simulator`,
//! `check-config`, the operator and approver levers, and the offline tools. The only place
//! `anyhow` is used: errors here are reported, not handled.
//!
//! [`args`] is what clap reads; [`dispatch`] picks the function of each subcommand from
//! [`serve`] (the long-running modes), [`levers`] (operators and approvers) or [`tools`] (the
//! one-shot tools).

mod args;
mod incident;
mod levers;
mod serve;
mod tool_args;
mod tools;

pub use args::{
    ApprovalsCommand, ApproverArgs, AuditCommand, Cli, Command, IncidentCommand, JudgesCommand,
    OperatorArgs, PolicyCommand,
};

use crate::approval::wire::Request;
use crate::control::operator::new_request_id;
use crate::control::ControlCommand;
use crate::settings::{LogFormat, Settings};
use anyhow::Context;
use clap::Parser;
use std::process::ExitCode;
use std::time::Duration;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // On a worker, not on this thread: block_on's future runs on the calling thread, so the
    // consumer's loop there had every delivery wake this thread to spawn the command's task
    // onto a worker, and every finished task wake it again (two hand-offs per command).
    let done = runtime.block_on(async { tokio::spawn(dispatch(cli)).await });
    let done = match done {
        Ok(done) => done,
        Err(e) => Err(anyhow::anyhow!("the command's task failed: {e}")),
    };
    match done {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(settings: &Settings, flag: Option<LogFormat>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&settings.logging.filter));
    // Colours only for a person at a terminal: never escape codes in a log file or a pipe.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match flag.unwrap_or(settings.logging.format) {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The subcommands that need no configuration, answered before it is loaded: completions, the
/// manual page, and reading a chain back without a config folder (the security team's machine,
/// holding an exported chain: the key comes from the variable the shipped configuration names).
/// Any other is handed back.
fn answered_without_configuration(
    command: Command,
    config_dir: &std::path::Path,
) -> Result<anyhow::Result<ExitCode>, Command> {
    match command {
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "command-poller", &mut std::io::stdout());
            Ok(Ok(ExitCode::SUCCESS))
        }
        Command::Man => Ok(
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
                .render(&mut std::io::stdout())
                .map(|()| ExitCode::SUCCESS)
                .map_err(Into::into),
        ),
        Command::Audit { command } if command.reads_back() && !config_dir.exists() => {
            Ok(tools::read_back(command, shipped_chain_key()))
        }
        Command::Incident { command } if command.reads_back() && !config_dir.exists() => {
            Ok(incident::read_back(command, shipped_chain_key()))
        }
        other => Err(other),
    }
}

/// The chain key from the variable the shipped configuration names, when it is set.
fn shipped_chain_key() -> Option<crate::bridge::signing::Secret> {
    std::env::var(tools::SHIPPED_CHAIN_KEY_ENV)
        .ok()
        .filter(|v| !v.is_empty())
        .map(crate::bridge::signing::Secret::new)
}

/// Loads the settings and runs the subcommand.
async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let command = match answered_without_configuration(
        cli.command.unwrap_or(Command::Run),
        &cli.config_dir,
    ) {
        Ok(answer) => return answer,
        Err(command) => command,
    };
    let settings = Settings::load(&cli.config_dir)
        .with_context(|| format!("loading configuration from {}", cli.config_dir.display()))?;
    init_logging(&settings, cli.log_format);
    let s = &settings;
    let request_id = new_request_id();
    match command {
        Command::Completions { .. } | Command::Man => {
            unreachable!("answered before the configuration is loaded")
        }
        Command::Run => serve::poller(settings).await,
        Command::Send {
            file,
            wait,
            timeout_secs,
            amqp_url,
            no_user_id,
        } => {
            let wait = wait.then(|| Duration::from_secs(timeout_secs));
            tools::send(s, &file, wait, amqp_url, no_user_id).await
        }
        Command::BridgeSimulator { listen, latency_ms } => {
            serve::bridge_simulator(s, listen, latency_ms).await
        }
        Command::Status { op } => {
            levers::operate(s, op, ControlCommand::Status { request_id }).await
        }
        Command::Pause { .. }
        | Command::Halt { .. }
        | Command::Resume { .. }
        | Command::Second { .. }
        | Command::Quarantine { .. }
        | Command::Release { .. }
        | Command::Revoke { .. }
        | Command::Disconnect { .. }
        | Command::Reconnected { .. }
        | Command::Grant { .. }
        | Command::Ungrant { .. } => {
            let (cmd, op) = levers::lever_of(command, request_id);
            levers::operate(s, op, cmd).await
        }
        Command::Policy { command } => tools::policy(s, command, request_id).await,
        Command::Audit { command } => tools::audit(s, command).await,
        Command::Incident { command } => incident::run(s, command, request_id).await,
        Command::Judges {
            command:
                JudgesCommand::Eval {
                    file,
                    rules,
                    policy,
                    json,
                    baseline,
                    max_false_approve,
                },
        } => tools::judges_eval(s, &file, &rules, policy, json, baseline, max_false_approve).await,
        Command::Console { listen } => serve::console(s, listen).await,
        Command::Mcp {
            amqp_url,
            timeout_secs,
            http,
            clients,
        } => serve::mcp(s, amqp_url, timeout_secs, http, clients).await,
        Command::Approvals {
            command: ApprovalsCommand::List { ap },
        } => levers::decide(s, ap, Request::List).await,
        Command::Approve {
            approval_id,
            digest,
            reason,
            ap,
        } => levers::approve(s, ap, approval_id, digest, reason).await,
        Command::Deny {
            approval_id,
            reason,
            ap,
        } => {
            levers::decide(
                s,
                ap,
                Request::Deny {
                    approval_id,
                    reason,
                },
            )
            .await
        }
        Command::CheckConfig { online } => tools::check_config(s, online).await,
    }
}
