//! Configuration: `config/default.toml`, then `config/<APP_ENVIRONMENT>.toml` if present, then
//! environment variables `POLLER__<SECTION>__<KEY>` (e.g. `POLLER__AMQP__URL`). Unknown keys
//! are refused at every layer. Secrets are not in these files: they are read from the
//! environment variables the files name, and never logged.

use serde::Deserialize;
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

pub use crate::broker::settings::{
    broker_user, redact_url, AmqpSettings, LeaderLocator, Replication, TopologySettings,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    /// Path of the policy file, relative to the working directory.
    pub file: PathBuf,
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

mod check;
mod fronts;
mod parts;
mod secrets;

pub use crate::bridge::settings::{BridgeMode, BridgeSettings};
pub use crate::health::HealthSettings;
pub use crate::judging::{JudgeSettings, PanelSettings};
pub use crate::pipeline::settings::{AdmissionLimit, IntakeSettings};
pub use crate::worker::settings::ProcessingSettings;
pub use fronts::{ConsoleSettings, McpSettings};
pub use poller_core::approval::ApprovalSettings;
pub use poller_core::audit::AuditSettings;
pub use poller_core::control::trip::{TripRule, TripScope};
pub use poller_core::control::{ControlSettings, EmptyStream};
pub use secrets::{Environment, Secrets};

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
    fn revoke_on_trip_is_refused_on_a_trip_that_holds_no_credentials() {
        let mut s = load(Environment::empty()).unwrap();
        let refresh = crate::intake::CommandType::RefreshToken;
        for t in &mut s.control.trips {
            t.revoke_on_trip = true;
        }
        assert!(s.control.trips.iter().any(|t| t.command_type != refresh));
        let e = s.check().unwrap_err().to_string();
        assert!(
            e.contains("revoke_on_trip is for REFRESH_TOKEN trips only"),
            "{e}"
        );
        s.control.trips.retain(|t| t.command_type == refresh);
        s.check().expect("a REFRESH_TOKEN trip may revoke");
    }

    #[test]
    fn two_people_to_loosen_need_two_operators_to_be_found() {
        let mut s =
            Settings::load_isolated(&crate::testing::repo_root().join("config"), "production")
                .unwrap();
        assert_eq!(s.control.loosening_approvals, 2, "the shipped default");
        assert!(
            s.control.operators.len() >= 2,
            "the shipped operators can lift a halt"
        );
        s.control.operators = vec!["ops-admin".into()];
        let e = s.check().unwrap_err().to_string();
        assert!(e.contains("a halt could never be lifted"), "{e}");
        s.control.loosening_approvals = 1;
        s.check().expect("one person's rules with one operator");
        s.control.loosening_approvals = 0;
        assert!(s.check().is_err());
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
