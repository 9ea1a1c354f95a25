//! The policy's and the offline tools' subcommands (`policy test|replay|reload|approve`,
//! `judges eval`) and the operator's flags every lever takes, as clap reads them.

use std::path::PathBuf;

#[derive(clap::Subcommand, Debug)]
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
    /// With two people to loosen, a file that lets through what the policy in force refuses is
    /// refused until `policy approve` has the operators it needs.
    Reload {
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// Approve a policy file that loosens the policy in force (a looser action, floor or
    /// decision rule, fewer approvals, an enforced rule removed or switched to shadow): parked
    /// as a proposal bound to the file's SHA-256 until control.loosening_approvals operators have
    /// it; then `policy reload` loads it.
    Approve {
        /// The candidate file (default: policy.file, the one the replicas reload).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// An audit file: its commands are replayed under the candidate and the changes printed
        /// first (what the approvers bind to).
        #[arg(long)]
        audit: Option<PathBuf>,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        op: OperatorArgs,
    },
}

#[derive(clap::Subcommand, Debug)]
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
