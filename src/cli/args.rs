//! The command line's arguments: every subcommand and its flags, as clap reads them.

use crate::settings::LogFormat;
use std::path::PathBuf;

pub use super::tool_args::{JudgesCommand, OperatorArgs, PolicyCommand};

#[derive(clap::Parser, Debug)]
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

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Run the poller (the default).
    Run,
    /// Print a completion script for a shell, e.g. `command-poller completions bash >
    /// /etc/bash_completion.d/command-poller`. Needs no configuration.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `command-poller man | man -l -`. Needs no
    /// configuration.
    Man,
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
        /// Lifting a halt (Emergency-INT-E02 step 4): the post-mortem it follows (a reference,
        /// recorded with the lift and in the incident).
        #[arg(long)]
        post_mortem: Option<String>,
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// Second a loosening lever another operator proposed (a lifted halt, a release, a
    /// reconnection), bound to the digest the proposal printed; it applies once it has the
    /// operators control.loosening_approvals needs. `status` lists pending proposals.
    Second {
        /// The proposal's id.
        proposal: String,
        #[arg(long)]
        digest: String,
        /// Why you agree (recorded in the audit trail).
        #[arg(long)]
        reason: String,
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
    /// Emergency-INT-E01 step 2: revoke a service's credentials. Stored first (the service's
    /// REFRESH_TOKEN is refused on every replica from then on), then carried out once by the
    /// bridge: revoked at the provider where it allows, deleted from the bridge either way.
    /// Prints what was done to each credential; works while paused or halted.
    Revoke {
        /// The service (as in commands' params.service).
        service: String,
        /// Why (the security alert, the audit trail, the stored state).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// Emergency-INT-E02 step 2: disconnect a service's integration (every credential revoked
    /// where the provider allows and deleted); as `revoke` otherwise.
    Disconnect {
        service: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// Record that a revoked or disconnected service was reconnected by hand (SOP-INT-03's
    /// manual security and permissions review): its REFRESH_TOKEN is decided again.
    Reconnected {
        service: String,
        /// The review it followed.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// A scoped, time-boxed grant: AGENT's COMMAND_TYPE for SERVICE goes to the bridge
    /// without a human's approval when the judges don't approve it, at most --uses times
    /// within --for (never for CONNECT_INTEGRATION, never past a rule judge's veto, a
    /// quarantine, a cut, a pause, a halt or a trip). A loosening lever: it needs
    /// control.loosening_approvals operators (`second`), and its clock starts when it has them.
    Grant {
        agent: String,
        /// REFRESH_TOKEN or CHECK_INTEGRATION_STATUS.
        command_type: crate::intake::CommandType,
        service: String,
        /// How many commands it may let through, for the whole fleet (1 to 1000).
        #[arg(long)]
        uses: u32,
        /// How long it lasts: seconds, or a number with s, m, h or d (1m to 7d).
        #[arg(long = "for", value_parser = poller_core::clock::parse_duration_secs)]
        for_secs: u64,
        /// Why (the stored state, the alert, the audit trail, every result it lets through).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// Withdraw a grant (one operator, at once): its next use is refused, and a command it let
    /// through that has not reached the bridge yet waits for approvers instead.
    Ungrant {
        /// The grant's id (`status`, `approvals list`, the console).
        grant: String,
        #[arg(long)]
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
    /// The audit trail: sink, verify, show, export an incident's bundle, verify a bundle.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Incidents: a halt, the automatic trip or an automatic quarantine opens one; operators
    /// open and close one by hand; list and show read them from the audit file.
    Incident {
        #[command(subcommand)]
        command: IncidentCommand,
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

#[derive(clap::Subcommand, Debug)]
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

#[derive(clap::Subcommand, Debug)]
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
    /// Write one incident's self-verifying bundle for the security team and the post-mortem:
    /// the incident, the chain lines it was built from, the policy digests in force.
    Export {
        /// The chain file (verified first).
        file: PathBuf,
        /// The incident's id (`command-poller incident list`).
        #[arg(long)]
        incident: String,
        /// Where to write the bundle (JSON).
        #[arg(long)]
        out: PathBuf,
        /// The Apps Script deployment version in force, recorded in the bundle.
        #[arg(long)]
        bridge_version: Option<String>,
    },
    /// Check a bundle on its own: every line's hash, the links, and the incident against its
    /// lines. Exit 1 on the first thing wrong.
    VerifyBundle { bundle: PathBuf },
}

impl AuditCommand {
    /// Reads a chain or a bundle back: needs the chain key, no other configuration.
    pub fn reads_back(&self) -> bool {
        match self {
            AuditCommand::Verify { .. }
            | AuditCommand::Show { .. }
            | AuditCommand::Export { .. }
            | AuditCommand::VerifyBundle { .. } => true,
            AuditCommand::Sink { .. } => false,
        }
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum IncidentCommand {
    /// Every incident in the audit file: id, what opened it, when, open or closed.
    List {
        /// The chain file (verified first).
        file: PathBuf,
    },
    /// One incident: who opened and closed it and why, its timeline (every lever, trip, cut,
    /// refusal and approval decision, and the actions affected), the actions by agent and by
    /// service, the policy digests in force.
    Show {
        id: String,
        /// The chain file (verified first).
        file: PathBuf,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Open an incident by hand (recorded in the audit trail by every replica).
    Open {
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// Close an incident opened by hand.
    Close {
        id: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        op: OperatorArgs,
    },
}

impl IncidentCommand {
    /// Reads the audit file back (list, show): needs the chain key, no other configuration.
    pub fn reads_back(&self) -> bool {
        matches!(
            self,
            IncidentCommand::List { .. } | IncidentCommand::Show { .. }
        )
    }
}
