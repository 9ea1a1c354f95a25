//! The composition root: builds a [`Poller`] from the whole settings (policy, judges, bridge,
//! store) or from parts (tests inject judges and bridges). The only module besides
//! [`crate::settings`] that sees every section.

use crate::approval::desk::Desk;
use crate::bridge::signing::Secret;
use crate::bridge::simulator::{self, SimulatorConfig, SimulatorHandle};
use crate::bridge::{AppsScriptBridge, Bridge, BridgeClientConfig};
use crate::intake::DecodeLimits;
use crate::judging::llm::{LlmJudge, LlmJudgeConfig};
use crate::judging::rules::RuleJudge;
use crate::judging::{Judge, Panel};
use crate::pipeline::Pipeline;
use crate::policy::shared::SharedPolicy;
use crate::policy::Policy;
use crate::settings::{BridgeMode, BridgeSettings, JudgeSettings, PanelSettings, Settings};
use crate::settle::render::Names;
use crate::settle::state::PollerState;
use crate::settle::{Settler, Shell};
use crate::store::Stores;
use crate::store::{RateWindows, Slots};
use crate::worker::{Poller, Sections};
use poller_adapters::webhook::Notifier;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error("bridge: {0}")]
    Bridge(String),
    #[error("panel: {0}")]
    Judge(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Approval(String),
}

/// Builds the judges of the configured panel, with the API keys read with the settings
/// ([`crate::settings::Secrets::judge_api_keys`]). Fails when a prompt file or an API key named
/// in config is missing, so a misconfigured panel stops the poller at start. Rate rules count
/// in `windows` (the shared store's, so they hold for the fleet and across restarts).
pub fn build_panel(
    panel: &PanelSettings,
    api_keys: &BTreeMap<String, Secret>,
    windows: Arc<dyn RateWindows>,
) -> Result<Panel, StartError> {
    let mut judges: Vec<(Arc<dyn Judge>, Duration)> = Vec::new();
    for j in &panel.judges {
        match j {
            JudgeSettings::Rules {
                name,
                timeout,
                rules,
            } => judges.push((
                Arc::new(RuleJudge::new(name.clone(), rules.clone(), windows.clone())),
                *timeout,
            )),
            JudgeSettings::Llm {
                name,
                timeout,
                base_url,
                model,
                api_key_env,
                temperature,
                max_tokens,
                token_limit_param,
                prompt_file,
            } => {
                let system_prompt = std::fs::read_to_string(prompt_file).map_err(|e| {
                    StartError::Judge(format!(
                        "judge {name}: prompt_file {}: {e}",
                        prompt_file.display()
                    ))
                })?;
                let api_key = match api_key_env {
                    None => None,
                    Some(var) => Some(
                        api_keys
                            .get(name)
                            .ok_or_else(|| {
                                StartError::Judge(format!(
                                    "judge {name}: the API key variable {var} is not set"
                                ))
                            })?
                            .expose(),
                    ),
                };
                let deadline = *timeout;
                let judge = LlmJudge::new(LlmJudgeConfig {
                    name: name.clone(),
                    base_url: base_url.clone(),
                    model: model.clone(),
                    api_key,
                    temperature: *temperature,
                    max_tokens: *max_tokens,
                    token_limit_param: *token_limit_param,
                    system_prompt,
                    deadline,
                })
                .map_err(|e| StartError::Judge(format!("judge {name}: {e}")))?;
                judges.push((Arc::new(judge), deadline));
            }
        }
    }
    Ok(Panel::new(judges, panel.quorum))
}

fn client_config(b: &BridgeSettings, url: url::Url, secret: Secret) -> BridgeClientConfig {
    BridgeClientConfig {
        url,
        secret,
        request_timeout: b.request_timeout,
        retry_budget: b.retry_budget,
        min_backoff: b.min_backoff,
        max_backoff: b.max_backoff,
    }
}

/// Builds the configured bridge: the Apps Script client (with `secret`, read with the
/// settings), or the embedded simulator and a client for it.
pub async fn build_bridge(
    settings: &BridgeSettings,
    secret: Option<Secret>,
) -> Result<(Arc<dyn Bridge>, Option<SimulatorHandle>), StartError> {
    match settings.mode {
        BridgeMode::AppsScript => {
            let secret = secret.ok_or_else(|| {
                StartError::Bridge(format!(
                    "the bridge secret environment variable {} is not set",
                    settings.secret_env
                ))
            })?;
            secret
                .check_strong(&settings.secret_env)
                .map_err(StartError::Bridge)?;
            if crate::bridge::signing::is_placeholder(&settings.url) {
                return Err(StartError::Bridge(
                    "bridge.url holds a placeholder (as the shipped Secret template does): set the web app's /exec URL".into(),
                ));
            }
            let url = url::Url::parse(&settings.url)
                .map_err(|e| StartError::Bridge(format!("bridge.url: {e}")))?;
            let client = AppsScriptBridge::new(client_config(settings, url, secret))
                .map_err(|e| StartError::Bridge(e.to_string()))?;
            Ok((Arc::new(client), None))
        }
        BridgeMode::Simulator => {
            let secret = secret.unwrap_or_else(Secret::random);
            let mut cfg = SimulatorConfig::new(secret.clone());
            cfg.latency = settings.simulator_latency;
            let sim = simulator::start(cfg, ([127, 0, 0, 1], 0).into())
                .await
                .map_err(|e| StartError::Bridge(format!("simulator: {e}")))?;
            tracing::info!(addr = %sim.addr(), "embedded bridge simulator listening");
            let client = AppsScriptBridge::new(client_config(settings, sim.url(), secret))
                .map_err(|e| StartError::Bridge(e.to_string()))?;
            Ok((Arc::new(client), Some(sim)))
        }
    }
}

impl Poller {
    /// Builds the poller from settings alone: policy file, rule judges, configured bridge.
    pub async fn from_settings(settings: Settings) -> Result<Self, StartError> {
        let policy = Policy::load(&settings.policy.file)?;
        if let Some(why) = settings.embedded_store_refused() {
            return Err(StartError::Store(crate::store::StoreError::Backend(
                format!("idempotency.backend: {why}"),
            )));
        }
        let stores = crate::store::open_all(&settings.idempotency).await?;
        let panel = build_panel(
            &settings.panel,
            &settings.secrets.judge_api_keys,
            stores.windows.clone(),
        )?;
        let (bridge, sim) = build_bridge(&settings.bridge, settings.secrets.bridge.clone()).await?;
        crate::store::store_key(&settings.idempotency, settings.secrets.store_key.clone())?;
        poller_core::approval::check_ttls(&policy, settings.idempotency.retention)
            .map_err(StartError::Approval)?;
        if let Some(url) = &settings.secrets.approval_webhook {
            Notifier::new(url.clone(), settings.approval.webhook_timeout)
                .map_err(StartError::Approval)?;
        }
        Ok(Self::new(
            settings,
            Arc::new(policy),
            panel,
            bridge,
            stores,
            sim,
        ))
    }

    /// Builds the poller from parts (tests inject judges and bridges here). The bridge slots
    /// are `stores.slots` (shared by the fleet with the Redis and PostgreSQL stores).
    pub fn new(
        settings: Settings,
        policy: Arc<Policy>,
        panel: Panel,
        bridge: Arc<dyn Bridge>,
        stores: Stores,
        simulator: Option<SimulatorHandle>,
    ) -> Self {
        let instance = settings.instance();
        let state = Arc::new(PollerState::default());
        crate::control::replica::ReplicaStats::policy_changed(state.as_ref(), policy.digest());
        // `from_settings` has checked it can be had; tests use the embedded store's key file.
        let store_key =
            crate::store::store_key(&settings.idempotency, settings.secrets.store_key.clone())
                .expect("the idempotency store key (checked at start)");
        let pipeline = pipeline_of(&settings, policy, panel, bridge, stores, &state, store_key);
        let names = Names {
            results_exchange: settings.topology.results_exchange.clone(),
            alerts_exchange: settings.topology.alerts_exchange.clone(),
            dead_letter_exchange: settings.topology.dead_letter_exchange.clone(),
            audit_exchange: settings.audit.exchange.clone(),
            control_exchange: settings.control.exchange.clone(),
            instance: instance.clone(),
            poller_user: settings.poller_user(),
        };
        let settler = Settler {
            state,
            names,
            trips: settings.control.trips.clone(),
            publish_failure_pause: settings.processing.publish_failure_pause,
            store_key: pipeline.store_key().clone(),
        };
        let shell = Shell {
            pipeline: Arc::new(pipeline),
            settler,
            publishers: Arc::new(tokio::sync::watch::channel(None).0),
        };
        let control_names = crate::control::replica::Names {
            control_exchange: settings.control.exchange.clone(),
            alerts_exchange: settings.topology.alerts_exchange.clone(),
            audit_exchange: settings.audit.exchange.clone(),
            dead_letter_exchange: settings.topology.dead_letter_exchange.clone(),
            instance: instance.clone(),
            poller_user: settings.poller_user(),
            replication: settings.topology.replication,
        };
        let wake = Arc::new(tokio::sync::Notify::new());
        let desk = Desk {
            settings: settings.approval.clone(),
            names: control_names.clone(),
            store: shell.pipeline.store().clone(),
            store_key: shell.pipeline.store_key().clone(),
            policy: shell.pipeline.policy().clone(),
            policy_file: settings.policy.file.clone(),
            state: shell.settler.state.clone(),
            grant_uses: shell.pipeline.grant_uses().clone(),
            wake: wake.clone(),
            audit_exchange: settings.audit.exchange.clone(),
            budget: Default::default(),
        };
        // `from_settings` has checked it.
        let notifier = settings.secrets.approval_webhook.clone().and_then(|url| {
            Notifier::new(url, settings.approval.webhook_timeout)
                .map_err(|e| tracing::error!(error = %e, "approval webhook off"))
                .ok()
        });
        Self {
            desk: Arc::new(desk),
            approval: settings.approval.clone(),
            notifier,
            wake,
            settings: Sections {
                amqp: settings.amqp.clone(),
                endpoints: settings.amqp.checked_endpoints(),
                topology: settings.topology.clone(),
                audit: settings.audit.clone(),
                processing: settings.processing.clone(),
                control: settings.control.clone(),
                canary: settings.panel.canary.clone(),
            },
            shell: Arc::new(shell),
            control_names,
            instance,
            _simulator: simulator,
        }
    }

    pub fn state(&self) -> Arc<PollerState> {
        self.shell.settler.state.clone()
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }
}

/// The pipeline of the system `settings` describe, on `stores`, behind `state`'s gate.
fn pipeline_of(
    settings: &Settings,
    policy: Arc<Policy>,
    panel: Panel,
    bridge: Arc<dyn Bridge>,
    stores: Stores,
    state: &PollerState,
    store_key: Secret,
) -> Pipeline {
    let instance = settings.instance();
    Pipeline::new(
        instance.clone(),
        crate::pipeline::IntakeParts {
            limits: DecodeLimits {
                max_payload_bytes: settings.intake.max_payload_bytes,
            },
            allow_unverified: settings.intake.allow_unverified_agents,
            admission: settings
                .intake
                .per_agent_limit
                .map(|limit| crate::pipeline::Admission {
                    windows: stores.windows.clone(),
                    limit,
                }),
        },
        crate::pipeline::Deciders {
            policy: Arc::new(SharedPolicy::from_file(
                policy,
                settings.policy.file.clone(),
                {
                    let retention = settings.idempotency.retention;
                    Some(Box::new(move |p: &Policy| {
                        poller_core::approval::check_ttls(p, retention)
                    }))
                },
            )),
            panel,
            grant_uses: stores.windows.clone(),
        },
        crate::pipeline::Execution {
            bridge,
            gate: state.gate.clone(),
            slots: Slots::new(
                stores.slots,
                settings.bridge.max_concurrency,
                settings.bridge.slot_lease,
                settings.idempotency.retention,
                &instance,
            ),
        },
        crate::pipeline::Keeping {
            store: stores.results,
            store_key,
            claim_ttl: settings.idempotency.claim_ttl,
            wait_for_in_flight: settings.idempotency.wait_for_in_flight,
            max_waiting_per_agent: settings.idempotency.max_waiting_duplicates_per_agent,
            retention: settings.idempotency.retention,
        },
    )
}
