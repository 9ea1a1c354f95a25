//! Command line: `run` (the poller), `send` (act as an agent), `bridge-simulator`,
//! `check-config`, the operator and approver levers, and `judges eval`. The only place `anyhow` is used: errors here are reported, not handled.

use crate::control::operator::{new_request_id, Operator};
use crate::control::ControlCommand;
use crate::settings::{LogFormat, Settings};
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "command-poller",
    version,
    about = "MCP Orchestrator command poller"
)]
pub struct Cli {
    /// Directory holding default.toml (and <APP_ENVIRONMENT>.toml).
    #[arg(
        long,
        global = true,
        default_value = "config",
        env = "POLLER_CONFIG_DIR"
    )]
    pub config_dir: PathBuf,
    /// Log format; overrides logging.format.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the poller (the default).
    Run,
    /// Publish a command file as an agent would, and print its result.
    Send {
        /// The command JSON file ("-" for standard input).
        file: PathBuf,
        /// Wait for the result and print it.
        #[arg(long)]
        wait: bool,
        /// How long to wait for the result, in seconds.
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
        /// Broker URL of the agent (its user becomes the command's user_id); a cluster's nodes
        /// comma-separated. Defaults to amqp.urls (or amqp.url).
        #[arg(long, env = "AGENT_AMQP_URL")]
        amqp_url: Option<String>,
        /// Publish without the user_id property.
        #[arg(long)]
        no_user_id: bool,
    },
    /// Run the bridge simulator as a standalone HTTP server (secret from bridge.secret_env).
    BridgeSimulator {
        /// Address to serve the web app's contract on (POST /exec, GET /echo, GET /_sim/calls).
        #[arg(long, default_value = "127.0.0.1:8089")]
        listen: std::net::SocketAddr,
        /// Simulated execution time of each action, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
    },
    /// Load and check the configuration and the policy file, then exit.
    CheckConfig {
        /// Also check what `run` would trip on: prompt files, API-key and bridge-secret
        /// variables, the idempotency store (reachable, writable), the broker (reachable as the
        /// configured user, the exchanges and queues in place). Each problem names its key.
        #[arg(long)]
        online: bool,
    },
    /// Pause every replica (Emergency-INT-E01): no new commands, no bridge call starts.
    Pause {
        /// Why (recorded in the stored state, the events and the audit trail).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// Resume every replica. A halt is lifted only with --lift-halt.
    Resume {
        /// Why (recorded in the stored state, the events and the audit trail).
        #[arg(long, default_value = "")]
        reason: String,
        /// Explicit confirmation that the master shut-off may be lifted.
        #[arg(long)]
        lift_halt: bool,
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// The master shut-off (Emergency-INT-E02): no bridge calls, no judge calls, everywhere.
    Halt {
        /// Why (recorded in the stored state, the events and the audit trail).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// Show the stored control state, the queue depth, and every live replica's state.
    Status {
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// Quarantine one agent: its commands end REJECTED (never judged or executed) on every
    /// replica, while every other agent's commands flow. Stored with the control state.
    Quarantine {
        /// The agent id.
        agent: String,
        /// Why (recorded in the stored state, the events, the alert and the audit trail).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// Release an agent from quarantine.
    Release {
        agent: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// The policy: test a command, replay the audit under a candidate, reload every replica.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The judges: measure the configured panel on a labelled case set.
    Judges {
        #[command(subcommand)]
        command: JudgesCommand,
    },
    /// The audit trail: sink, verify, show.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The operator console: a web page for operators and approvers, who log in with their own
    /// broker user (see the README's "Operator console").
    Console {
        /// Address to serve on (default: console.listen).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// The MCP front door on stdin/stdout: the runbook's commands as tools, for one agent whose
    /// host launches it with that agent's broker credentials (see the README's "Agents over MCP").
    Mcp {
        /// The agent's broker URL (its user is the identity on every command). Required: the
        /// front door never falls back to the poller's or an operator's credentials.
        #[arg(long, env = "AGENT_AMQP_URL", required_unless_present = "http")]
        amqp_url: Option<String>,
        /// How long a tool call waits for its result before answering with an error, in seconds.
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
        /// Serve the streamable HTTP transport at http://ADDR/mcp instead of stdio (loopback
        /// only), each client authenticated by its own bearer token (see --clients).
        #[arg(long, requires = "clients", conflicts_with = "amqp_url")]
        http: Option<std::net::SocketAddr>,
        /// With --http: the clients file, mapping each client's token (its SHA-256) to its own
        /// agent's broker URL (mode 0600; it holds broker passwords).
        #[arg(long)]
        clients: Option<PathBuf>,
    },
    /// Parked NEEDS_APPROVAL commands: `approvals list`.
    Approvals {
        #[command(subcommand)]
        command: ApprovalsCommand,
    },
    /// Approve a parked NEEDS_APPROVAL command (as an approver; never your own command). It
    /// executes once the approvals it needs are in, when the system is running.
    Approve {
        /// The approval id (from the alert, the result or `approvals list`).
        approval_id: String,
        /// The digest shown with it: your approval binds to exactly what is parked.
        #[arg(long)]
        digest: String,
        /// Why (goes into the result and the audit trail).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        ap: ApproverArgs,
    },
    /// Deny a parked NEEDS_APPROVAL command: it is never executed.
    Deny {
        approval_id: String,
        /// Why (goes into the result and the audit trail).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        ap: ApproverArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Print the decision for a command file: handling, effective severity and mismatch,
    /// rationale, the judges that would be asked and under which rule, the alerts each outcome
    /// would send. Nothing is published, judged or executed.
    Test {
        /// The command JSON as an agent sends it ("-" for standard input).
        file: PathBuf,
        /// The policy file (default: policy.file).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The sending agent (taken as verified by the broker), for agent-group overrides and
        /// history conditions.
        #[arg(long)]
        agent: Option<String>,
        /// The agent's earlier attempts of this type within every window a history condition
        /// asks about.
        #[arg(long, default_value_t = 0, requires = "agent")]
        earlier_attempts: usize,
    },
    /// Re-decide every command recorded in an audit file under a candidate policy and print the
    /// difference (counts by old -> new handling, and each changed command). Nothing is
    /// executed, judged or published.
    Replay {
        /// The audit chain file (or JSON lines of audit records).
        #[arg(long)]
        audit: PathBuf,
        /// The candidate policy file.
        #[arg(long)]
        policy: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Make every live replica reload its policy file (validated whole, swapped at once; an
    /// invalid file is refused and the old policy stays). SIGHUP does the same for one replica.
    Reload {
        #[command(flatten)]
        op: OperatorArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum JudgesCommand {
    /// Run a labelled case set (JSON lines) through the configured panel and each judge alone,
    /// and print false-approve, false-deny and unavailable rates and latency. Nothing is
    /// executed or published; LLM judges are really asked.
    Eval {
        /// The cases, e.g. eval/judges.jsonl.
        file: PathBuf,
        /// A decision rule to score the panel under (repeatable): majority, unanimous, veto,
        /// or policy (each command type's rule from the policy). Default: all four.
        #[arg(long = "rule")]
        rules: Vec<String>,
        /// The policy to decide with (default: policy.file).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Print JSON (rows, mistakes and every case's answers) instead of the table.
        #[arg(long)]
        json: bool,
        /// A report printed earlier with --json: exit 1 if any row has more false approvals
        /// or more false denials than it.
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// Exit 1 if policy + panel approves more than this share of the cases it should deny
        /// (0.0 to 1.0).
        #[arg(long)]
        max_false_approve: Option<f64>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ApprovalsCommand {
    /// The pending approvals: command, agent, the judges' votes, age, expiry, digest.
    List {
        #[command(flatten)]
        ap: ApproverArgs,
    },
}

#[derive(clap::Args, Debug)]
pub struct ApproverArgs {
    /// The approver's broker URL (its user must be in approval.approvers); a cluster's nodes
    /// comma-separated. Defaults to amqp.urls (or amqp.url).
    #[arg(long, env = "APPROVER_AMQP_URL")]
    pub amqp_url: Option<String>,
    /// How long to wait for the answer, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub wait_ms: u64,
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Read the audit stream and append to a hash-chained JSON-lines file (one writer).
    Sink {
        /// The chain file (created if missing; its head goes to <file>.head).
        #[arg(long, default_value = "audit.jsonl")]
        file: PathBuf,
    },
    /// Check the chain (and the head file); report the first bad record.
    Verify {
        /// The chain file to check.
        file: PathBuf,
        /// Check an unkeyed chain although a chain key is configured (otherwise its first
        /// unkeyed record is reported: a chain rewritten without the key looks just like one).
        #[arg(long)]
        unkeyed: bool,
    },
    /// Print the records of one action, or of one agent since a time.
    Show {
        /// The chain file to read.
        file: PathBuf,
        /// Only the records of this action_id.
        #[arg(long)]
        action_id: Option<String>,
        /// Only the records of this agent.
        #[arg(long)]
        agent: Option<String>,
        /// RFC 3339, e.g. 2026-11-24T00:00:00Z.
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(clap::Args, Debug)]
pub struct OperatorArgs {
    /// The operator's broker URL (its user must be in control.operators); a cluster's nodes
    /// comma-separated, tried in turn, so a lever still reaches the replicas with a node down.
    /// Defaults to amqp.urls (or amqp.url).
    #[arg(long, env = "OPERATOR_AMQP_URL")]
    pub amqp_url: Option<String>,
    /// How long to collect the replicas' answers, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub wait_ms: u64,
}

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
    match runtime.block_on(dispatch(cli)) {
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

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(&cli.config_dir)
        .with_context(|| format!("loading configuration from {}", cli.config_dir.display()))?;
    init_logging(&settings, cli.log_format);
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let listen = settings.health.listen;
            let status_listen = settings.health.status_listen.clone();
            let poller = crate::worker::Poller::from_settings(settings).await?;
            let shutdown = CancellationToken::new();
            let health = crate::health::serve(
                listen,
                poller.state(),
                poller.instance().to_owned(),
                shutdown.clone(),
            )
            .await
            .with_context(|| format!("binding the health endpoint on {listen}"))?;
            tracing::info!(addr = %health, "health endpoint listening");
            if let Ok(addr) = status_listen.parse::<std::net::SocketAddr>() {
                let status = crate::health::serve_status(
                    addr,
                    poller.state(),
                    poller.instance().to_owned(),
                    shutdown.clone(),
                )
                .await
                .with_context(|| format!("binding the status endpoint on {addr}"))?;
                tracing::info!(addr = %status, "status endpoint listening (loopback only)");
            }
            tokio::spawn(watch_signals(shutdown.clone()));
            tokio::spawn(watch_reload(poller.state().reload.clone()));
            poller.run(shutdown).await;
            tracing::info!("poller stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::Send {
            file,
            wait,
            timeout_secs,
            amqp_url,
            no_user_id,
        } => {
            let payload = if file.as_os_str() == "-" {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
                buf
            } else {
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?
            };
            let endpoints = endpoints_of(amqp_url, &settings)?;
            let result = crate::agent::send(
                &payload,
                crate::agent::SendOptions {
                    endpoints: &endpoints,
                    exchange: &settings.topology.commands_exchange,
                    wait: wait.then(|| Duration::from_secs(timeout_secs)),
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
        Command::BridgeSimulator { listen, latency_ms } => {
            let secret = settings.secrets.bridge.clone().with_context(|| {
                format!(
                    "set {} to the shared bridge secret",
                    settings.bridge.secret_env
                )
            })?;
            let mut cfg = crate::bridge::simulator::SimulatorConfig::new(secret);
            cfg.latency = Duration::from_millis(latency_ms);
            let sim = crate::bridge::simulator::start(cfg, listen).await?;
            println!("bridge simulator listening on {}", sim.url());
            let stop = CancellationToken::new();
            watch_signals(stop.clone()).await;
            drop(sim);
            Ok(ExitCode::SUCCESS)
        }
        Command::Pause { reason, op } => {
            let cmd = ControlCommand::Pause {
                reason,
                request_id: new_request_id(),
            };
            operate(&settings, op, cmd).await
        }
        Command::Resume {
            reason,
            lift_halt,
            op,
        } => {
            let cmd = ControlCommand::Resume {
                reason,
                lift_halt,
                request_id: new_request_id(),
            };
            operate(&settings, op, cmd).await
        }
        Command::Halt { reason, op } => {
            let cmd = ControlCommand::Halt {
                reason,
                request_id: new_request_id(),
            };
            operate(&settings, op, cmd).await
        }
        Command::Status { op } => {
            let cmd = ControlCommand::Status {
                request_id: new_request_id(),
            };
            operate(&settings, op, cmd).await
        }
        Command::Audit { command } => audit(&settings, command).await,
        Command::Policy {
            command:
                PolicyCommand::Test {
                    file,
                    policy,
                    json,
                    agent,
                    earlier_attempts,
                },
        } => {
            let policy_file = policy.unwrap_or_else(|| settings.policy.file.clone());
            let policy = crate::policy::Policy::load(&policy_file)?;
            let bytes = if file.as_os_str() == "-" {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)?;
                b
            } else {
                std::fs::read(&file).with_context(|| format!("{}", file.display()))?
            };
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
            let e = crate::policy::explain::explain(
                &policy,
                &cmd,
                &who,
                &judges,
                settings.panel.quorum,
            );
            if json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else {
                print!("{}", e.text());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy {
            command:
                PolicyCommand::Replay {
                    audit,
                    policy,
                    json,
                },
        } => {
            let candidate = crate::policy::Policy::load(&policy)?;
            let text =
                std::fs::read_to_string(&audit).with_context(|| format!("{}", audit.display()))?;
            let (recorded, skipped) = crate::policy::replay::read(&text)
                .with_context(|| format!("{}", audit.display()))?;
            let report = crate::policy::replay::replay(&candidate, &recorded, skipped);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.text());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy {
            command: PolicyCommand::Reload { op },
        } => {
            let cmd = ControlCommand::ReloadPolicy {
                request_id: new_request_id(),
            };
            operate(&settings, op, cmd).await
        }
        Command::Quarantine { agent, reason, op } => {
            let cmd = ControlCommand::Quarantine {
                agent,
                reason,
                request_id: new_request_id(),
            };
            operate(&settings, op, cmd).await
        }
        Command::Release { agent, reason, op } => {
            let cmd = ControlCommand::Release {
                agent,
                reason,
                request_id: new_request_id(),
            };
            operate(&settings, op, cmd).await
        }
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
        } => {
            judges_eval(
                &settings,
                &file,
                &rules,
                policy,
                json,
                baseline,
                max_false_approve,
            )
            .await
        }
        Command::Console { listen } => {
            let addr = listen.unwrap_or(settings.console.listen);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("console: listening on {addr}"))?;
            tracing::info!(addr = %listener.local_addr()?, "console listening");
            let stop = CancellationToken::new();
            tokio::spawn(watch_signals(stop.clone()));
            let console =
                crate::console::Console::new(crate::console::Parts::from_settings(&settings));
            crate::console::serve(listener, console, stop).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Mcp {
            amqp_url,
            timeout_secs,
            http,
            clients,
        } => {
            let exchange = settings.topology.commands_exchange.clone();
            let deadline = Duration::from_secs(timeout_secs);
            match (http, clients, amqp_url) {
                (Some(addr), Some(file), _) => {
                    let clients =
                        crate::mcp::server::http::Clients::load(&file, &exchange, deadline)
                            .map_err(anyhow::Error::msg)?;
                    let listener = tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("mcp: listening on {addr}"))?;
                    tracing::info!(addr = %listener.local_addr()?, "MCP front door on streamable HTTP at /mcp");
                    let stop = CancellationToken::new();
                    tokio::spawn(watch_signals(stop.clone()));
                    crate::mcp::server::http::serve(listener, clients, settings.mcp.clone(), stop)
                        .await?;
                }
                (_, _, Some(url)) => {
                    let door = crate::mcp::FrontDoor::new(
                        endpoints_of(Some(url), &settings)?,
                        exchange,
                        deadline,
                    );
                    tracing::info!(agent = %door.agent(), "MCP front door on stdio");
                    crate::mcp::server::serve_stdio(door).await?;
                }
                _ => anyhow::bail!(
                    "mcp: give --amqp-url (or AGENT_AMQP_URL) for stdio, or --http with --clients"
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Approvals {
            command: ApprovalsCommand::List { ap },
        } => decide(&settings, ap, crate::approval::wire::Request::List).await,
        Command::Approve {
            approval_id,
            digest,
            reason,
            ap,
        } => {
            let req = crate::approval::wire::Request::Approve {
                approval_id,
                digest,
                reason,
            };
            decide(&settings, ap, req).await
        }
        Command::Deny {
            approval_id,
            reason,
            ap,
        } => {
            let req = crate::approval::wire::Request::Deny {
                approval_id,
                reason,
            };
            decide(&settings, ap, req).await
        }
        Command::CheckConfig { online } => {
            let policy = crate::policy::Policy::load(&settings.policy.file)?;
            crate::approval::check_ttls(&policy, settings.idempotency.retention)
                .map_err(anyhow::Error::msg)?;
            // Offline: only the secrets, and only their problems are printed.
            let findings = if online {
                crate::preflight::check(&settings).await
            } else {
                crate::preflight::secrets(&settings)
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
    }
}

async fn judges_eval(
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
    let panel = crate::worker::build_panel(
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

async fn audit(settings: &Settings, cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    use crate::audit::chain;
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
        AuditCommand::Verify { file, unkeyed } => {
            let key = settings
                .secrets
                .audit_chain_key
                .as_ref()
                .filter(|_| !unkeyed);
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
    }
}

/// Sends an approver's request and prints the answer; exit status 3 when it was refused.
async fn decide(
    settings: &Settings,
    ap: ApproverArgs,
    req: crate::approval::wire::Request,
) -> anyhow::Result<ExitCode> {
    use crate::approval::wire::ReplyOutcome;
    let approver = crate::approval::approver::Approver {
        settings: &settings.approval,
        endpoints: endpoints_of(ap.amqp_url, settings)?,
        wait: Duration::from_millis(ap.wait_ms),
    };
    let reply = approver.send(&req).await?;
    println!("{}", serde_json::to_string_pretty(&reply)?);
    Ok(if reply.outcome == ReplyOutcome::Refused {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// The broker nodes a command-line flag names (comma-separated), or the configured ones.
fn endpoints_of(
    flag: Option<String>,
    settings: &Settings,
) -> anyhow::Result<crate::broker::Endpoints> {
    match flag {
        Some(list) => {
            crate::broker::Endpoints::parse(&list).map_err(|e| anyhow::anyhow!("--amqp-url: {e}"))
        }
        None => Ok(settings.amqp.checked_endpoints()),
    }
}

async fn operate(
    settings: &Settings,
    op: OperatorArgs,
    cmd: ControlCommand,
) -> anyhow::Result<ExitCode> {
    let endpoints = endpoints_of(op.amqp_url, settings)?;
    let operator = Operator::new(settings, &endpoints, Duration::from_millis(op.wait_ms));
    let report = operator.run(cmd).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    let refused = report.replicas.iter().any(|r| !r.accepted);
    Ok(if refused {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Asks for a policy reload on every SIGHUP.
async fn watch_reload(reload: std::sync::Arc<tokio::sync::Notify>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!(
                "no SIGHUP handler: reload the policy with `command-poller policy reload`"
            );
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the policy");
            reload.notify_one();
        }
    }
    #[cfg(not(unix))]
    let _ = reload;
}

/// Cancels `token` on SIGTERM or Ctrl-C.
async fn watch_signals(token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: draining"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    token.cancel();
}
