//! Configuration: `config/default.toml`, then `config/<APP_ENVIRONMENT>.toml` if present, then
//! environment variables `POLLER__<SECTION>__<KEY>` (e.g. `POLLER__AMQP__URL`). Unknown keys
//! are refused at every layer. Secrets are not in these files: they are read from the
//! environment variables the files name, and never logged.

use crate::bridge::signing::Secret;
use crate::clock::de;
use crate::judging::llm::TokenLimitParam;
use crate::judging::rules::RuleSet;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// This replica's name in results and logs; empty means `<hostname>-<pid>`.
    #[serde(default)]
    pub instance_id: String,
    /// The `APP_ENVIRONMENT` these settings were loaded for (not a configuration key).
    #[serde(skip)]
    pub environment: String,
    pub amqp: AmqpSettings,
    pub topology: TopologySettings,
    pub intake: IntakeSettings,
    pub processing: ProcessingSettings,
    pub policy: PolicySettings,
    pub panel: PanelSettings,
    pub bridge: BridgeSettings,
    pub logging: LoggingSettings,
    pub health: HealthSettings,
    pub control: ControlSettings,
    pub audit: AuditSettings,
    pub idempotency: crate::store::IdempotencySettings,
    pub approval: ApprovalSettings,
    pub console: ConsoleSettings,
    pub mcp: McpSettings,
    /// The secrets the sections name, read from the environment with the settings (not a
    /// configuration key; never logged).
    #[serde(skip)]
    pub secrets: Secrets,
}

/// The values of the environment variables the configuration names for secrets, read once,
/// when the settings are loaded: nothing else reads the environment for them.
#[derive(Clone, Default)]
pub struct Secrets {
    /// `bridge.secret_env`.
    pub bridge: Option<Secret>,
    /// Each LLM judge's `api_key_env`, by judge name (only those set).
    pub judge_api_keys: BTreeMap<String, Secret>,
    /// `idempotency.key_env`.
    pub store_key: Option<Secret>,
    /// `audit.chain_key_env`.
    pub audit_chain_key: Option<Secret>,
    /// `approval.webhook_url_env`: the webhook's URL (Slack's carry their token in the path).
    pub approval_webhook: Option<Secret>,
    /// `console.alert_url_env`: the broker URL the console publishes its security alerts as.
    pub console_alert_url: Option<Secret>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |s: &Option<Secret>| if s.is_some() { "set" } else { "unset" };
        f.debug_struct("Secrets")
            .field("bridge", &set(&self.bridge))
            .field(
                "judge_api_keys",
                &self.judge_api_keys.keys().collect::<Vec<_>>(),
            )
            .field("store_key", &set(&self.store_key))
            .field("audit_chain_key", &set(&self.audit_chain_key))
            .field("approval_webhook", &set(&self.approval_webhook))
            .field("console_alert_url", &set(&self.console_alert_url))
            .finish()
    }
}

/// What settings are loaded with besides the files: the `POLLER__*` overrides and the
/// variables secrets are read from. The process environment in `run`; tests pass their own,
/// so no test depends on (or changes) the developer's environment.
#[derive(Debug, Clone, Default)]
pub struct Environment(HashMap<String, String>);

impl Environment {
    /// The process environment.
    pub fn process() -> Self {
        Self(std::env::vars().collect())
    }

    /// Nothing set.
    pub fn empty() -> Self {
        Self::default()
    }

    /// With `name` set to `value`.
    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.0.insert(name.to_owned(), value.to_owned());
        self
    }

    /// A non-empty variable, as a secret.
    pub fn secret(&self, name: &str) -> Option<Secret> {
        self.0
            .get(name)
            .filter(|v| !v.is_empty())
            .map(|v| Secret::new(v.clone()))
    }

    /// The `POLLER__*` overrides, as `config` reads them.
    fn overrides(&self) -> HashMap<String, String> {
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with("POLLER__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl Secrets {
    /// Reads the variables `s` names from `env`.
    pub fn read(s: &Settings, env: &Environment) -> Self {
        Self {
            bridge: env.secret(&s.bridge.secret_env),
            judge_api_keys: s
                .panel
                .judges
                .iter()
                .filter_map(|j| match j {
                    JudgeSettings::Llm {
                        name,
                        api_key_env: Some(var),
                        ..
                    } => env.secret(var).map(|k| (name.clone(), k)),
                    _ => None,
                })
                .collect(),
            store_key: env.secret(&s.idempotency.key_env),
            audit_chain_key: env.secret(&s.audit.chain_key_env),
            approval_webhook: env.secret(&s.approval.webhook_url_env),
            console_alert_url: env.secret(&s.console.alert_url_env),
        }
    }
}

pub use crate::broker::settings::{
    broker_user, redact_url, AmqpSettings, LeaderLocator, Replication, TopologySettings,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntakeSettings {
    /// Payloads above this many bytes are refused.
    pub max_payload_bytes: usize,
    /// Accept commands without the AMQP user_id, attributing them to the payload's agent_id,
    /// marked unverified. Off by default: identity comes from the broker.
    pub allow_unverified_agents: bool,
    /// Per-agent admission: at most `count` commands per agent within `window_secs`, counted
    /// for the whole fleet in the shared store; the rest end REJECTED (`rate_limited`) before
    /// any claim, judge or bridge call. Off when absent.
    #[serde(default)]
    pub per_agent_limit: Option<AdmissionLimit>,
}

/// A per-agent admission limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionLimit {
    pub count: usize,
    #[serde(rename = "window_secs", deserialize_with = "de::secs")]
    pub window: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessingSettings {
    /// Commands processed concurrently; also the consumer prefetch.
    pub max_in_flight: u16,
    /// On SIGTERM, how long in-flight commands may take to finish before the poller exits
    /// (unfinished ones go back to the queue). Key `drain_timeout_secs`.
    #[serde(rename = "drain_timeout_secs", deserialize_with = "de::secs")]
    pub drain_timeout: Duration,
    /// Wait before requeueing a command whose result could not be published. Key
    /// `publish_failure_pause_ms`.
    #[serde(rename = "publish_failure_pause_ms", deserialize_with = "de::millis")]
    pub publish_failure_pause: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    /// Path of the policy file, relative to the working directory.
    pub file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PanelSettings {
    /// Judges that must actually answer (approve or deny) for an approval to count.
    pub quorum: usize,
    pub judges: Vec<JudgeSettings>,
    /// Synthetic commands put to the panel on a timer (`[panel.canary]`, off by default).
    #[serde(default)]
    pub canary: crate::judging::canary::CanarySettings,
}

/// One judge of the panel, by kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum JudgeSettings {
    /// A built-in rule-based judge.
    Rules {
        name: String,
        /// How long this judge may deliberate; past it, it counts as unavailable. Key
        /// `timeout_ms`.
        #[serde(rename = "timeout_ms", deserialize_with = "de::millis")]
        timeout: Duration,
        rules: RuleSet,
    },
    /// A language model over the OpenAI-compatible chat API.
    Llm {
        name: String,
        /// The judge's whole deadline, retries included. Key `timeout_ms`.
        #[serde(rename = "timeout_ms", deserialize_with = "de::millis")]
        timeout: Duration,
        /// Base URL of the API, e.g. `https://api.openai.com/v1` or `http://127.0.0.1:11434/v1`.
        base_url: String,
        model: String,
        /// Environment variable holding the API key (sent as a Bearer token, never logged).
        /// Optional: local servers usually need none.
        #[serde(default)]
        api_key_env: Option<String>,
        /// Sampling temperature, sent only when set: 0 for repeatable verdicts where the model
        /// takes it. OpenAI's reasoning models (o-series, GPT-5) refuse anything but their
        /// default, so leave it out for them.
        #[serde(default)]
        temperature: Option<f32>,
        /// Upper bound on the answer's length in tokens. A verdict needs well under 100; a
        /// small CPU model can emit whitespace inside a JSON grammar until this limit, so keep
        /// it tight. Reasoning models count their hidden reasoning in it too: give them more.
        #[serde(default = "default_max_tokens")]
        max_tokens: u32,
        /// The request field that carries `max_tokens`: `max_tokens` (llama.cpp, Ollama,
        /// vLLM, older OpenAI models) or `max_completion_tokens` (OpenAI o-series and GPT-5,
        /// Azure OpenAI, vLLM).
        #[serde(default)]
        token_limit_param: TokenLimitParam,
        /// The role's system prompt (what it weighs), e.g. `config/prompts/security.md`.
        prompt_file: PathBuf,
    },
}

fn default_max_tokens() -> u32 {
    200
}

impl JudgeSettings {
    pub fn name(&self) -> &str {
        match self {
            JudgeSettings::Rules { name, .. } | JudgeSettings::Llm { name, .. } => name,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BridgeMode {
    /// Start the in-process simulator on a loopback port and use it.
    Simulator,
    /// Call the deployed Apps Script web app at `url`.
    AppsScript,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeSettings {
    pub mode: BridgeMode,
    /// The web app's `/exec` URL (mode `apps_script`).
    #[serde(default)]
    pub url: String,
    /// Environment variable holding the shared HMAC secret.
    pub secret_env: String,
    /// One POST's deadline (`request_timeout_secs`), below Apps Script's 6-minute limit.
    #[serde(rename = "request_timeout_secs", deserialize_with = "de::secs")]
    pub request_timeout: Duration,
    /// How long retries may go on (`retry_budget_secs`).
    #[serde(rename = "retry_budget_secs", deserialize_with = "de::secs")]
    pub retry_budget: Duration,
    /// Retry backoff bounds (`min_backoff_ms`, `max_backoff_ms`).
    #[serde(rename = "min_backoff_ms", deserialize_with = "de::millis")]
    pub min_backoff: Duration,
    #[serde(rename = "max_backoff_ms", deserialize_with = "de::millis")]
    pub max_backoff: Duration,
    /// Bridge calls at once for the whole fleet: every replica sharing the Redis or PostgreSQL
    /// store counts against this one number (Apps Script allows 30 simultaneous executions per
    /// user). With the embedded store (one poller) it is that poller's.
    pub max_concurrency: usize,
    /// How long a bridge slot's lease lasts without renewal (`slot_lease_secs`): the replica
    /// running the call renews it every third of this, so only a crashed replica's slots
    /// expire, and they come back to the fleet within this time. At least 3.
    #[serde(
        rename = "slot_lease_secs",
        deserialize_with = "de::secs",
        default = "default_slot_lease"
    )]
    pub slot_lease: Duration,
    /// Simulated execution time (mode `simulator`; `simulator_latency_ms`).
    #[serde(rename = "simulator_latency_ms", deserialize_with = "de::millis")]
    pub simulator_latency: Duration,
}

fn default_slot_lease() -> Duration {
    Duration::from_secs(15)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingSettings {
    pub format: LogFormat,
    /// tracing EnvFilter directive; `RUST_LOG` overrides it.
    pub filter: String,
}

pub use poller_core::approval::ApprovalSettings;
pub use poller_core::audit::AuditSettings;
pub use poller_core::control::trip::{TripRule, TripScope};
pub use poller_core::control::{ControlSettings, EmptyStream};

/// The operator console (`command-poller console`, the `[console]` section).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSettings {
    /// Address the console serves on (`--listen` overrides it).
    pub listen: std::net::SocketAddr,
    /// An idle session ends after this long, and its broker connection is closed
    /// (`idle_timeout_secs`).
    #[serde(rename = "idle_timeout_secs", deserialize_with = "de::secs")]
    pub idle_timeout: Duration,
    /// Mark the session cookie `Secure` (set it when a TLS proxy serves the console).
    pub secure_cookies: bool,
    /// Failed logins allowed per user name, and per client address, within `login_window_secs`.
    pub max_failed_logins: usize,
    #[serde(rename = "login_window_secs", deserialize_with = "de::secs")]
    pub login_window: Duration,
    /// Largest request body accepted, in bytes.
    pub max_form_bytes: usize,
    /// The audit chain file `command-poller audit sink` writes, for an action's story; empty:
    /// the story page says it is not configured.
    pub audit_file: String,
    /// Addresses of reverse proxies in front of the console: from them, the client is the last
    /// address in `X-Forwarded-For` that is not one of them (throttled as that client). From
    /// anyone else the header is ignored, so it can't be forged to dodge the throttle.
    #[serde(default)]
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Environment variable holding the broker URL (`amqp://console:…`) the console publishes
    /// its security alerts as (repeated failed logins against an operator's name); unset: they
    /// are logged only. Never logged.
    #[serde(default = "default_console_alert_url_env")]
    pub alert_url_env: String,
}

fn default_console_alert_url_env() -> String {
    "CONSOLE_ALERT_AMQP_URL".into()
}

/// The MCP front door over streamable HTTP (`command-poller mcp --http`, the `[mcp]` section).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpSettings {
    /// Page origins (`scheme://host[:port]`) allowed to call besides loopback pages; a request
    /// with any other `Origin` is refused (403). Requests without `Origin` (not from a browser)
    /// are not affected.
    pub allowed_origins: Vec<String>,
    /// Requests one client (token) may have in flight at once; one more is refused (429).
    pub max_calls_in_flight: usize,
    /// Live sessions one client (token) may hold; one more `initialize` is refused (429).
    pub max_sessions: usize,
    /// A session without a request for this long ends (`session_idle_secs`).
    #[serde(rename = "session_idle_secs", deserialize_with = "de::secs")]
    pub session_idle: Duration,
}

impl McpSettings {
    /// `text` as a page origin (`scheme://host[:port]`, http or https, nothing after it), in the
    /// form browsers send.
    pub fn origin_of(text: &str) -> Result<String, String> {
        let u = url::Url::parse(text).map_err(|e| e.to_string())?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err("http or https only".into());
        }
        if u.path() != "/"
            || u.query().is_some()
            || u.fragment().is_some()
            || !u.username().is_empty()
        {
            return Err("an origin is scheme://host[:port], with nothing after it".into());
        }
        Ok(u.origin().ascii_serialization())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    /// Address of the health endpoint (/healthz, /readyz, /metrics); port 0 picks a free one.
    pub listen: std::net::SocketAddr,
    /// Address of `/status` (recent action ids, who paused and why): loopback only, so it is
    /// never served on the pod's port. Empty: not served.
    pub status_listen: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: {0}")]
    Invalid(String),
}

/// The longest a duplicate may wait for its in-flight original: below RabbitMQ's default
/// `consumer_timeout` of 30 minutes, with room to spare.
pub const MAX_WAIT_FOR_IN_FLIGHT_MS: u64 = 25 * 60 * 1000;

/// The environment when `APP_ENVIRONMENT` is unset.
pub const DEFAULT_ENVIRONMENT: &str = "production";

impl Settings {
    /// Why `run` refuses this configuration's idempotency store, if it does: the embedded store
    /// (one poller per file) under production, unless explicitly allowed.
    pub fn embedded_store_refused(&self) -> Option<&'static str> {
        let i = &self.idempotency;
        (self.environment == DEFAULT_ENVIRONMENT
            && i.backend == crate::store::Backend::Embedded
            && !i.allow_embedded_in_production)
            .then_some("\"embedded\" keeps results in one poller's file, and production runs several replicas; configure redis or postgres (idempotency.url), or set idempotency.allow_embedded_in_production = true for a single replica on a volume of its own")
    }
}

impl Settings {
    /// Loads `dir/default.toml`, `dir/<APP_ENVIRONMENT>.toml` and `POLLER__*` overrides.
    /// `APP_ENVIRONMENT` defaults to `production`: the local development conveniences of
    /// `config/local.toml` (guest as an operator) must be asked for.
    pub fn load(dir: &Path) -> Result<Self, SettingsError> {
        let env = std::env::var("APP_ENVIRONMENT").unwrap_or_else(|_| DEFAULT_ENVIRONMENT.into());
        Self::load_with(dir, &env, &Environment::process())
    }

    /// Loads `dir/default.toml` and `dir/<environment>.toml` alone: no `POLLER__*` override and
    /// no secret from the process environment (tests and tools that must not depend on it).
    pub fn load_isolated(dir: &Path, environment: &str) -> Result<Self, SettingsError> {
        Self::load_with(dir, environment, &Environment::empty())
    }

    /// Loads `dir/default.toml`, `dir/<environment>.toml` and the `POLLER__*` overrides of
    /// `vars`, and reads the secrets the result names from `vars`.
    pub fn load_with(
        dir: &Path,
        environment: &str,
        vars: &Environment,
    ) -> Result<Self, SettingsError> {
        let env = environment;
        let mut s: Settings = config::Config::builder()
            .add_source(config::File::from(dir.join("default.toml")))
            .add_source(config::File::from(dir.join(format!("{env}.toml"))).required(false))
            .add_source(
                config::Environment::with_prefix("POLLER")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("amqp.urls")
                    .with_list_parse_key("mcp.allowed_origins")
                    .source(Some(vars.overrides())),
            )
            .build()?
            .try_deserialize()?;
        s.environment = env.to_owned();
        s.check()?;
        s.secrets = Secrets::read(&s, vars);
        Ok(s)
    }

    fn check(&self) -> Result<(), SettingsError> {
        let bad = |m: String| Err(SettingsError::Invalid(m));
        if let Err(e) = self.amqp.endpoints() {
            let key = if self.amqp.urls.is_empty() {
                "amqp.url"
            } else {
                "amqp.urls"
            };
            return bad(format!("{key}: {e}"));
        }
        let m = &self.mcp;
        if m.max_calls_in_flight == 0 || m.max_sessions == 0 || m.session_idle.is_zero() {
            return bad("mcp.max_calls_in_flight, mcp.max_sessions and mcp.session_idle_secs: each at least 1".into());
        }
        for o in &m.allowed_origins {
            if let Err(e) = McpSettings::origin_of(o) {
                return bad(format!("mcp.allowed_origins: {o:?}: {e}"));
            }
        }
        if !self.health.status_listen.is_empty() {
            match self.health.status_listen.parse::<std::net::SocketAddr>() {
                Ok(a) if a.ip().is_loopback() => {}
                Ok(a) => {
                    return bad(format!(
                        "health.status_listen: {a} is not a loopback address; /status shows recent action ids and who paused the system, so it is served on loopback only (empty turns it off)"
                    ))
                }
                Err(e) => {
                    return bad(format!(
                        "health.status_listen: {:?}: {e}",
                        self.health.status_listen
                    ))
                }
            }
        }
        if self.processing.max_in_flight == 0 {
            return bad(
                "processing.max_in_flight: must be at least 1 (0 would mean unlimited prefetch)"
                    .into(),
            );
        }
        let members = self.topology.replication.initial_group_size;
        if members == 0 || members.is_multiple_of(2) {
            return bad(format!(
                "topology.replication.initial_group_size: {members} must be odd (a quorum of an even group survives no more losses than the odd group one smaller)"
            ));
        }
        if self.topology.delivery_limit == 0 {
            return bad("topology.delivery_limit: must be at least 1".into());
        }
        // RabbitMQ 3.x counts a lost connection as a delivery: a rolling restart can cost a
        // command that waits in a replica's prefetch one delivery per node.
        let nodes = self.amqp.urls.len();
        if nodes > 1 && self.topology.delivery_limit as usize <= nodes {
            return bad(format!(
                "topology.delivery_limit: {} is not above the {nodes} nodes in amqp.urls; a rolling restart can spend one delivery per node (a lost connection counts as one) and dead-letter commands that did nothing wrong",
                self.topology.delivery_limit
            ));
        }
        if self.bridge.mode == BridgeMode::AppsScript && url::Url::parse(&self.bridge.url).is_err()
        {
            return bad(format!(
                "bridge.url: {:?} is not a URL (required with mode apps_script)",
                self.bridge.url
            ));
        }
        if self.bridge.request_timeout.is_zero() || self.bridge.request_timeout.as_secs() >= 360 {
            return bad("bridge.request_timeout_secs: must be between 1 and 359 (Apps Script stops executions at 6 minutes)".into());
        }
        if self.bridge.max_concurrency == 0 {
            return bad("bridge.max_concurrency: must be at least 1".into());
        }
        if self.bridge.slot_lease < Duration::from_secs(3) {
            return bad(format!(
                "bridge.slot_lease_secs: {} is below 3 (a live lease is renewed every third of it)",
                self.bridge.slot_lease.as_secs()
            ));
        }
        let mut names = std::collections::HashSet::new();
        for j in &self.panel.judges {
            if !names.insert(j.name()) {
                return bad(format!(
                    "panel.judges: judge name {:?} appears twice",
                    j.name()
                ));
            }
        }
        if let Some(l) = &self.intake.per_agent_limit {
            if l.count == 0 || l.window.is_zero() {
                return bad(
                    "intake.per_agent_limit: count and window_secs must be at least 1".into(),
                );
            }
        }
        for (i, t) in self.control.trips.iter().enumerate() {
            if t.count == 0 || t.window.is_zero() {
                return bad(format!(
                    "control.trips[{i}]: count and window_secs must be at least 1"
                ));
            }
        }
        let i = &self.idempotency;
        if i.backend != crate::store::Backend::Embedded && i.url.is_empty() {
            return bad("idempotency.url: required with the redis and postgres backends".into());
        }
        if i.claim_ttl < Duration::from_secs(3) {
            return bad(format!(
                "idempotency.claim_ttl_secs: {} is below 3 (a live claim is renewed every third of it)",
                i.claim_ttl.as_secs()
            ));
        }
        if i.max_waiting_duplicates_per_agent == 0 {
            return bad("idempotency.max_waiting_duplicates_per_agent: must be at least 1 (a redelivered copy after a lost connection waits for its original)".into());
        }
        if i.wait_for_in_flight <= i.claim_ttl {
            return bad(format!(
                "idempotency.wait_for_in_flight_ms: {} must exceed claim_ttl_secs ({} s), or a duplicate of a crashed replica's command goes back to the queue before the dead claim expires, spending its delivery limit",
                i.wait_for_in_flight.as_millis(), i.claim_ttl.as_secs()
            ));
        }
        // A duplicate waits for a live original instead of going back to the queue (each
        // requeue spends one of the command's deliveries): long enough for the longest the
        // original can take, its wait for a bridge slot included, and below the broker's
        // consumer_timeout (30 minutes), which would close the channel.
        let b = &self.bridge;
        let longest_call_ms = (b.retry_budget + 2 * b.request_timeout).as_millis() as u64;
        let rounds =
            1 + (self.processing.max_in_flight as u64).div_ceil(b.max_concurrency.max(1) as u64);
        let needed_ms = rounds * longest_call_ms;
        let wait_ms = i.wait_for_in_flight.as_millis() as u64;
        if wait_ms < needed_ms {
            return bad(format!(
                "idempotency.wait_for_in_flight_ms: {} is shorter than the longest a live command can take ({needed_ms} ms: {rounds} rounds of bridge.retry_budget_secs {} s + 2 x bridge.request_timeout_secs {} s, as processing.max_in_flight {} commands share bridge.max_concurrency {} slots, counted as if this replica had the fleet's slots to itself); a duplicate would go back to the queue while its original still runs, spending its delivery limit until it is dead-lettered",
                wait_ms, b.retry_budget.as_secs(), b.request_timeout.as_secs(), self.processing.max_in_flight, b.max_concurrency
            ));
        }
        if wait_ms > MAX_WAIT_FOR_IN_FLIGHT_MS {
            return bad(format!(
                "idempotency.wait_for_in_flight_ms: {wait_ms} is over {MAX_WAIT_FOR_IN_FLIGHT_MS} ms; RabbitMQ's consumer_timeout (30 minutes) would close the channel under a waiting duplicate"
            ));
        }
        if self.approval.sweep_interval.is_zero() {
            return bad("approval.sweep_interval_ms: must be at least 1".into());
        }
        if self.approval.max_decision_bytes < 256 {
            return bad("approval.max_decision_bytes: must be at least 256".into());
        }
        if self.panel.canary.interval < Duration::from_secs(10) {
            return bad("panel.canary.interval_secs: must be at least 10".into());
        }
        if let Err(e) = crate::intake::AgentId::parse(&self.panel.canary.agent) {
            return bad(format!("panel.canary.agent: {e}"));
        }
        if self.panel.quorum > self.panel.judges.len() {
            return bad(format!(
                "panel.quorum: {} is more than the {} configured judges",
                self.panel.quorum,
                self.panel.judges.len()
            ));
        }
        Ok(())
    }

    /// The broker user the poller connects as (its own control messages carry it).
    pub fn poller_user(&self) -> String {
        self.amqp
            .endpoints()
            .map(|e| e.user())
            .unwrap_or_else(|_| broker_user(&self.amqp.url))
    }

    pub fn instance(&self) -> String {
        if !self.instance_id.is_empty() {
            return self.instance_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "poller".into());
        format!("{host}-{}", std::process::id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(vars: Environment) -> Result<Settings, SettingsError> {
        Settings::load_with(&crate::testing::repo_root().join("config"), "local", &vars)
    }

    #[test]
    fn a_cluster_is_given_as_a_comma_separated_list_and_wins_over_the_single_url() {
        let s = load(Environment::empty().with(
            "POLLER__AMQP__URLS",
            "amqp://poller:pw@n1:5672/%2f,amqp://poller:pw@n2:5672/%2f,amqp://poller:pw@n3:5672/%2f",
        ))
        .unwrap();
        let e = s.amqp.endpoints().unwrap();
        assert_eq!(e.len(), 3);
        assert!(e.redacted()[2].contains("n3:5672"));
        assert_eq!(s.poller_user(), "poller", "not the single url's guest");
        assert!(!format!("{:?}", s.amqp).contains(":pw@"));
    }

    #[test]
    fn the_single_url_keeps_working() {
        let s =
            load(Environment::empty().with("POLLER__AMQP__URL", "amqp://p:pw@h:5673/v")).unwrap();
        let e = s.amqp.endpoints().unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(s.poller_user(), "p");
    }

    #[test]
    fn nodes_reached_as_different_users_are_refused_by_key_without_a_password() {
        let e = load(Environment::empty().with(
            "POLLER__AMQP__URLS",
            "amqp://poller:secret1@n1/%2f,amqp://ops:secret2@n2/%2f",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("amqp.urls") && e.contains("different users"),
            "{e}"
        );
        assert!(!e.contains("secret"), "{e}");
        let e = load(Environment::empty().with("POLLER__AMQP__URLS", "http://x:secret3@n1/"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("amqp.urls") && !e.contains("secret3"), "{e}");
    }

    #[test]
    fn a_delivery_limit_a_rolling_restart_could_spend_is_refused() {
        let three = "amqp://p:pw@n1/%2f,amqp://p:pw@n2/%2f,amqp://p:pw@n3/%2f";
        let e = load(
            Environment::empty()
                .with("POLLER__AMQP__URLS", three)
                .with("POLLER__TOPOLOGY__DELIVERY_LIMIT", "3"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("topology.delivery_limit: 3 is not above the 3 nodes"),
            "{e}"
        );
        assert!(!e.contains(":pw@"), "{e}");
        // The shipped limit (5) with three nodes, and a low limit with one broker, are fine.
        load(Environment::empty().with("POLLER__AMQP__URLS", three)).unwrap();
        load(Environment::empty().with("POLLER__TOPOLOGY__DELIVERY_LIMIT", "2")).unwrap();
    }

    #[test]
    fn replication_is_odd_and_spread_by_default() {
        let s = load(Environment::empty()).unwrap();
        assert_eq!(s.topology.replication, crate::testing::REPLICATION);
        let e = load(
            Environment::empty().with("POLLER__TOPOLOGY__REPLICATION__INITIAL_GROUP_SIZE", "4"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("initial_group_size: 4 must be odd"), "{e}");
        let s = load(Environment::empty().with(
            "POLLER__TOPOLOGY__REPLICATION__LEADER_LOCATOR",
            "client-local",
        ))
        .unwrap();
        assert_eq!(
            s.topology.replication.leader_locator,
            LeaderLocator::ClientLocal
        );
    }
}
