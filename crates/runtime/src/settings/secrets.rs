//! The secrets the sections name, read from the environment once, with the settings, and the
//! environment they are read from (the process's, or a test's own).

use super::{JudgeSettings, Settings};
use crate::bridge::signing::Secret;
use std::collections::{BTreeMap, HashMap};

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
    pub(super) fn overrides(&self) -> HashMap<String, String> {
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
