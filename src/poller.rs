//! The poller: consumes commands, runs each through the [`Pipeline`] concurrently (up to
//! `max_in_flight`), publishes what it decided with confirms, and only then acks.
//!
//! In: settings and a pipeline. Out: results, alerts and dead letters on the broker. Rides out
//! broker restarts (a plain reconnect loop: new connections, topology, consumer) and drains
//! in-flight commands on shutdown. Anything unacked when a connection goes away is requeued by
//! the broker; the bridge's dedup (per agent and action_id) makes a re-run after a lost ack safe.

use crate::audit::{self, AuditEvent, AuditRecord};
use crate::bridge::signing::Secret;
use crate::bridge::simulator::{self, SimulatorConfig, SimulatorHandle};
use crate::bridge::{AppsScriptBridge, Bridge, BridgeClientConfig};
use crate::broker::{self, BrokerError, Outgoing, Publisher};
use crate::control::gate::Gate;
use crate::control::replica::{Replica, ReplicaStats};
use crate::control::trip::UnapprovedAttempt;
use crate::control::Mode;
use crate::idempotency::ResultStore;
use crate::intake::CommandType;
use crate::intake::{DecodeLimits, ReplyTarget};
use crate::judging::llm::{LlmJudge, LlmJudgeConfig};
use crate::judging::rules::RuleJudge;
use crate::judging::{Judge, Panel};
use crate::metrics::Metrics;
use crate::outcome::{ResultMessage, Status};
use crate::pipeline::{DeadLetterBody, Disposition, Inbound, Pipeline, StoredOutcome};
use crate::policy::Policy;
use crate::settings::{BridgeMode, JudgeSettings, Settings};
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error("bridge: {0}")]
    Bridge(String),
    #[error("panel: {0}")]
    Judge(String),
    #[error(transparent)]
    Store(#[from] crate::idempotency::StoreError),
}

/// Live state, for health, status and the control plane.
#[derive(Default)]
pub struct PollerState {
    pub in_flight: AtomicUsize,
    /// Connected, topology declared, control state applied, consumer attached.
    pub connected: AtomicBool,
    /// The idempotency store answered the last probe (a claim and its release): without it no
    /// command is processed (fail closed), so the replica is not ready either.
    pub store_ok: AtomicBool,
    pub processed: AtomicUsize,
    /// The operator gate (running / paused / halted).
    pub gate: Arc<Gate>,
    pub metrics: Metrics,
    recent: Mutex<VecDeque<(String, Status)>>,
}

impl PollerState {
    const RECENT: usize = 20;

    fn record(&self, action_id: Option<&str>, status: Status) {
        let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        r.push_back((action_id.unwrap_or("-").to_owned(), status));
        while r.len() > Self::RECENT {
            r.pop_front();
        }
    }
}

impl ReplicaStats for PollerState {
    fn audit_diverted(&self) {
        self.metrics.audit_diverted();
    }
    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
    fn processed(&self) -> usize {
        self.processed.load(Ordering::SeqCst)
    }
    fn recent_results(&self) -> Vec<(String, Status)> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

pub struct Poller {
    settings: Arc<Settings>,
    pipeline: Arc<Pipeline>,
    state: Arc<PollerState>,
    instance: String,
    /// The broker user the poller connects as (its own attempt reports carry it).
    poller_user: String,
    /// Keeps the embedded bridge simulator running, when it is the configured bridge.
    _simulator: Option<SimulatorHandle>,
    /// The current session's publisher (None between sessions): a command whose session was
    /// lost while it was in flight publishes its outcome on the next one.
    publishers: Arc<tokio::sync::watch::Sender<Option<Publisher>>>,
}

/// Builds the judges of the configured panel. Fails when a prompt file or an API key named in
/// config is missing, so a misconfigured panel stops the poller at start.
pub fn build_panel(settings: &Settings) -> Result<Panel, StartError> {
    let mut judges: Vec<(Arc<dyn Judge>, Duration)> = Vec::new();
    for j in &settings.panel.judges {
        match j {
            JudgeSettings::Rules {
                name,
                timeout_ms,
                rules,
            } => judges.push((
                Arc::new(RuleJudge::new(name.clone(), rules.clone())),
                Duration::from_millis(*timeout_ms),
            )),
            JudgeSettings::Llm {
                name,
                timeout_ms,
                base_url,
                model,
                api_key_env,
                temperature,
                max_tokens,
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
                    Some(var) => Some(std::env::var(var).map_err(|_| {
                        StartError::Judge(format!(
                            "judge {name}: the API key variable {var} is not set"
                        ))
                    })?),
                };
                let deadline = Duration::from_millis(*timeout_ms);
                let judge = LlmJudge::new(LlmJudgeConfig {
                    name: name.clone(),
                    base_url: base_url.clone(),
                    model: model.clone(),
                    api_key,
                    temperature: *temperature,
                    max_tokens: *max_tokens,
                    system_prompt,
                    deadline,
                })
                .map_err(|e| StartError::Judge(format!("judge {name}: {e}")))?;
                judges.push((Arc::new(judge), deadline));
            }
        }
    }
    Ok(Panel::new(judges, settings.panel.quorum))
}

fn client_config(settings: &Settings, url: url::Url, secret: Secret) -> BridgeClientConfig {
    let b = &settings.bridge;
    BridgeClientConfig {
        url,
        secret,
        request_timeout: Duration::from_secs(b.request_timeout_secs),
        retry_budget: Duration::from_secs(b.retry_budget_secs),
        min_backoff: Duration::from_millis(b.min_backoff_ms),
        max_backoff: Duration::from_millis(b.max_backoff_ms),
    }
}

/// Builds the configured bridge: the Apps Script client, or the embedded simulator and a client
/// for it.
pub async fn build_bridge(
    settings: &Settings,
) -> Result<(Arc<dyn Bridge>, Option<SimulatorHandle>), StartError> {
    let secret = std::env::var(&settings.bridge.secret_env)
        .ok()
        .filter(|s| !s.is_empty())
        .map(Secret::new);
    match settings.bridge.mode {
        BridgeMode::AppsScript => {
            let secret = secret.ok_or_else(|| {
                StartError::Bridge(format!(
                    "the bridge secret environment variable {} is not set",
                    settings.bridge.secret_env
                ))
            })?;
            let url = url::Url::parse(&settings.bridge.url)
                .map_err(|e| StartError::Bridge(format!("bridge.url: {e}")))?;
            let client = AppsScriptBridge::new(client_config(settings, url, secret))
                .map_err(|e| StartError::Bridge(e.to_string()))?;
            Ok((Arc::new(client), None))
        }
        BridgeMode::Simulator => {
            let secret = secret.unwrap_or_else(Secret::random);
            let mut cfg = SimulatorConfig::new(secret.clone());
            cfg.latency = Duration::from_millis(settings.bridge.simulator_latency_ms);
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
        let panel = build_panel(&settings)?;
        let (bridge, sim) = build_bridge(&settings).await?;
        if let Some(why) = settings.embedded_store_refused() {
            return Err(StartError::Store(crate::idempotency::StoreError::Backend(
                format!("idempotency.backend: {why}"),
            )));
        }
        let store = crate::idempotency::open(&settings.idempotency).await?;
        crate::idempotency::store_key(&settings.idempotency)?;
        Ok(Self::new(
            settings,
            Arc::new(policy),
            panel,
            bridge,
            store,
            sim,
        ))
    }

    /// Builds the poller from parts (tests inject judges and bridges here).
    pub fn new(
        settings: Settings,
        policy: Arc<Policy>,
        panel: Panel,
        bridge: Arc<dyn Bridge>,
        store: Arc<dyn ResultStore>,
        simulator: Option<SimulatorHandle>,
    ) -> Self {
        let instance = settings.instance();
        let settings_poller_user = settings.poller_user();
        let state = Arc::new(PollerState::default());
        // `from_settings` has checked it can be had; tests use the embedded store's key file.
        let store_key = crate::idempotency::store_key(&settings.idempotency)
            .expect("the idempotency store key (checked at start)");
        let pipeline = Pipeline {
            limits: DecodeLimits {
                max_payload_bytes: settings.intake.max_payload_bytes,
            },
            allow_unverified: settings.intake.allow_unverified_agents,
            policy,
            panel,
            bridge,
            instance: instance.clone(),
            history: Default::default(),
            gate: state.gate.clone(),
            bridge_slots: Semaphore::new(settings.bridge.max_concurrency),
            store,
            claim_ttl: Duration::from_secs(settings.idempotency.claim_ttl_secs),
            wait_for_in_flight: Duration::from_millis(settings.idempotency.wait_for_in_flight_ms),
            store_key,
        };
        Self {
            settings: Arc::new(settings),
            pipeline: Arc::new(pipeline),
            state,
            instance,
            poller_user: settings_poller_user,
            _simulator: simulator,
            publishers: Arc::new(tokio::sync::watch::channel(None).0),
        }
    }

    pub fn state(&self) -> Arc<PollerState> {
        self.state.clone()
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Runs until `shutdown` is cancelled, reconnecting after broker failures.
    pub async fn run(&self, shutdown: CancellationToken) {
        let a = &self.settings.amqp;
        let mut backoff = reconnect_backoff(a.reconnect_min_ms, a.reconnect_max_ms);
        tracing::info!(instance = %self.instance, broker = %crate::settings::redact_url(&a.url), "poller starting");
        // In-flight commands outlive a lost session: they finish, store their outcome and
        // settle their idempotency claim, so the redelivered copies replay it at once instead of
        // waiting out an orphaned claim. Drained (or aborted) only at shutdown.
        let mut tasks: JoinSet<()> = JoinSet::new();
        let store_watch = tokio::spawn(watch_store(
            self.pipeline.store.clone(),
            self.state.clone(),
            shutdown.clone(),
        ));
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let mut consumed_any = false;
            match self.session(&shutdown, &mut consumed_any, &mut tasks).await {
                Ok(()) => break,
                Err(e) => {
                    self.state.connected.store(false, Ordering::SeqCst);
                    if consumed_any {
                        backoff = reconnect_backoff(a.reconnect_min_ms, a.reconnect_max_ms);
                    }
                    let delay = backoff
                        .next()
                        .unwrap_or(Duration::from_millis(a.reconnect_max_ms));
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "broker session ended; reconnecting");
                    let sleep = tokio::time::sleep(delay);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = &mut sleep => break,
                            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                        }
                    }
                }
            }
        }
        self.drain(&mut tasks).await;
        store_watch.abort();
    }

    /// Lets in-flight commands finish within the drain timeout; the rest are aborted (their
    /// deliveries go back to the queue when the channel closes, and their claims expire).
    async fn drain(&self, tasks: &mut JoinSet<()>) {
        if tasks.is_empty() {
            return;
        }
        let drain = Duration::from_secs(self.settings.processing.drain_timeout_secs);
        tracing::info!(
            in_flight = tasks.len(),
            timeout_s = drain.as_secs(),
            "draining"
        );
        let drained =
            tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                left = tasks.len(),
                "drain timeout; unfinished commands go back to the queue"
            );
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    /// One connected session. `Ok` means an orderly shutdown; `Err` means reconnect.
    async fn session(
        &self,
        shutdown: &CancellationToken,
        consumed_any: &mut bool,
        tasks: &mut JoinSet<()>,
    ) -> Result<(), SessionError> {
        let s = &self.settings;
        let consume_conn =
            broker::connect(&s.amqp.url, &format!("{}-consume", s.amqp.connection_name)).await?;
        let publish_conn = match broker::connect(
            &s.amqp.url,
            &format!("{}-publish", s.amqp.connection_name),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                broker::close(&consume_conn, "publisher connection failed").await;
                return Err(e.into());
            }
        };
        let result = self
            .consume(&consume_conn, &publish_conn, shutdown, consumed_any, tasks)
            .await;
        self.state.connected.store(false, Ordering::SeqCst);
        self.publishers.send_replace(None);
        // Closing requeues whatever is still unacked. A dead connection never answers close-ok:
        // bounded, so the reconnect loop can't stall here.
        broker::close(&consume_conn, "command-poller session end").await;
        broker::close(&publish_conn, "command-poller session end").await;
        result
    }

    async fn consume(
        &self,
        consume_conn: &lapin::Connection,
        publish_conn: &lapin::Connection,
        shutdown: &CancellationToken,
        consumed_any: &mut bool,
        tasks: &mut JoinSet<()>,
    ) -> Result<(), SessionError> {
        let s = &self.settings;
        // Setting up is bounded: a broker half-way through a restart can leave a call without
        // an answer, and the session must then start over rather than wait forever.
        let setup = async {
            let publisher = Publisher::open(publish_conn).await?;
            self.publishers.send_replace(Some(publisher.clone()));
            let ch = consume_conn.create_channel().await?;
            broker::declare(&ch, &s.topology).await?;
            broker::declare_audit(consume_conn, &s.audit).await?;

            // Control first: the stored state is applied before any command is consumed.
            let replica = Arc::new(Replica::new(
                self.settings.clone(),
                self.state.gate.clone(),
                self.instance.clone(),
                self.state.clone(),
            ));
            let control_ch = consume_conn.create_channel().await?;
            let state_ch = consume_conn.create_channel().await?;
            let (control_consumer, state_reader) =
                replica.attach(&control_ch, &state_ch, &publisher).await?;
            ch.basic_qos(s.processing.max_in_flight, BasicQosOptions::default())
                .await?;
            // A consumer the broker stopped feeding without the stream ending or the
            // connection reporting it: checked while running and quiet (`consumer_stalled`).
            let watch_ch = consume_conn.create_channel().await?;
            let mut commands = CommandConsumer::new(
                ch.clone(),
                s.topology.commands_queue.clone(),
                self.instance.clone(),
            );
            if self.state.gate.mode() == Mode::Running {
                commands.start().await?;
            } else {
                tracing::warn!(
                    mode = self.state.gate.mode().as_str(),
                    "not consuming: the system is paused or halted"
                );
            }
            Ok::<_, SessionError>((
                publisher,
                replica,
                control_consumer,
                state_reader,
                commands,
                watch_ch,
            ))
        };
        let (publisher, replica, control_consumer, state_reader, mut commands, watch_ch) =
            match tokio::time::timeout(SETUP_TIMEOUT, setup).await {
                Ok(parts) => parts?,
                Err(_) => {
                    return Err(SessionError::Lost(format!(
                        "setting up the session took longer than {SETUP_TIMEOUT:?}"
                    )))
                }
            };
        let mut control_task = {
            let replica = replica.clone();
            let publisher = publisher.clone();
            tokio::spawn(async move {
                replica
                    .listen(control_consumer, state_reader, publisher)
                    .await
            })
        };
        let mut mode = self.state.gate.watch();
        self.state.connected.store(true, Ordering::SeqCst);

        let broken = CancellationToken::new();
        let mut stall_check = tokio::time::interval(STALL_CHECK_EVERY);
        stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_delivery = std::time::Instant::now();
        let outcome = loop {
            tokio::select! {
                _ = stall_check.tick() => {
                    if self.state.gate.mode() != Mode::Running
                        || !commands.is_active()
                        || last_delivery.elapsed() < STALL_CHECK_EVERY
                    {
                        continue;
                    }
                    if let Some(why) = consumer_stalled(&watch_ch, &s.topology.commands_queue).await {
                        tracing::warn!(why = %why, "the commands consumer stalled; reconnecting");
                        break Err(SessionError::Lost(why));
                    }
                }
                _ = shutdown.cancelled() => break Ok(()),
                _ = broken.cancelled() => break Err(SessionError::Lost("publishing failed on the broker connection".into())),
                ended = &mut control_task => break Err(SessionError::Lost(format!("control listener ended: {ended:?}"))),
                changed = mode.changed() => {
                    if changed.is_err() { continue; }
                    let now = *mode.borrow_and_update();
                    if now == Mode::Running {
                        commands.start().await?;
                        tracing::info!("resumed: consuming commands");
                    } else {
                        commands.cancel().await?;
                        tracing::warn!(mode = now.as_str(), in_flight = tasks.len(), "stopped consuming; in-flight commands that have not reached the bridge go back to the queue");
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                next = commands.next() => match next {
                    Some(Ok(delivery)) => {
                        *consumed_any = true;
                        last_delivery = std::time::Instant::now();
                        tasks.spawn(self.handle(delivery, publisher.clone(), broken.clone()));
                    }
                    Some(Err(e)) => break Err(SessionError::Broker(e.into())),
                    None => break Err(SessionError::Lost("the broker cancelled the consumer".into())),
                }
            }
        };
        control_task.abort();
        if outcome.is_ok() {
            // Orderly shutdown: stop deliveries first; `run` then drains what is in flight
            // while the connections are still open, so results and acks go out.
            let _ = commands.cancel().await;
            self.drain(tasks).await;
        }
        // A lost session leaves its tasks running: see `run`.
        outcome
    }

    fn handle(
        &self,
        mut delivery: Delivery,
        publisher: Publisher,
        broken: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let pipeline = self.pipeline.clone();
        let settings = self.settings.clone();
        let state = self.state.clone();
        let instance = self.instance.clone();
        let poller_user = self.poller_user.clone();
        let mut next_publisher = self.publishers.subscribe();
        async move {
            state.in_flight.fetch_add(1, Ordering::SeqCst);
            let _guard = Decrement(&state.in_flight);
            let props = &delivery.properties;
            let inbound = Inbound {
                // Moved, not copied: the delivery's body is held once.
                payload: std::mem::take(&mut delivery.data),
                user_id: props.user_id().as_ref().map(|u| u.to_string()),
                reply_to: props.reply_to().as_ref().map(|u| u.to_string()),
                content_type: props.content_type().as_ref().map(|u| u.to_string()),
                routing_key: delivery.routing_key.to_string(),
                redelivered: delivery.redelivered,
            };
            let mut inbound = inbound;
            let disposition = pipeline.process(&inbound).await;
            if matches!(
                disposition.dead_letter.as_ref().map(|d| &d.body),
                Some(DeadLetterBody::Withheld { .. })
            ) {
                // An oversized body is released at once; only its digest goes on.
                inbound.payload = Vec::new();
            }
            if disposition.deferred.is_some() {
                state.metrics.observe(&disposition);
                if let Some(c) = &disposition.claimed {
                    if let Err(e) = pipeline.store.release(&c.key, &c.owner).await {
                        tracing::warn!(error = %e, "could not release the idempotency claim; it expires on its own");
                    }
                }
                // Paused or halted before judges or bridge: back to the queue, unprocessed.
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                };
                if !matches!(delivery.acker.nack(requeue).await, Ok(true)) {
                    tracing::warn!(
                        "requeue not sent (channel gone); the broker requeues it on close"
                    );
                }
                return;
            }
            // Stored (unpublished) before it is published: a crash in between publishes the
            // stored outcome instead of redoing the action.
            let retention = Duration::from_secs(settings.idempotency.retention_secs);
            let store_outcome = |published: bool| {
                let pipeline = pipeline.clone();
                let d = &disposition;
                async move {
                    match (&d.claimed, &d.result) {
                        (Some(c), Some(r)) => {
                            let json = serde_json::to_string(&StoredOutcome {
                                published,
                                result: r.clone(),
                                command_digest: c.command_digest.clone(),
                            })
                            .expect("result serializes");
                            let json = crate::idempotency::seal(&pipeline.store_key, &json);
                            pipeline
                                .store
                                // Durable before publishing; the "published" mark may be lost
                                // in a crash at the cost of a replay.
                                .complete(&c.key, &c.owner, &json, retention, !published)
                                .await
                        }
                        _ => Ok(()),
                    }
                }
            };
            let stored = if disposition.stored {
                Ok(())
            } else {
                store_outcome(false).await
            };
            if let Err(e) = stored {
                // Unpublished and unstored: requeue it; the claim is ours, so the re-run proceeds.
                tracing::error!(error = %e, "could not store the result; not publishing it, requeueing");
                state.metrics.publish_failed();
                requeue_after_pause(&delivery, &settings, &broken).await;
                return;
            }
            match carry_out(
                &publisher,
                &settings,
                &instance,
                &poller_user,
                &inbound,
                &disposition,
            )
            .await
            {
                Ok(audited) => {
                    if audited != audit::AuditOutcome::Delivered {
                        state.metrics.audit_diverted();
                    }
                    if let Err(e) = store_outcome(true).await {
                        // Harmless: a later duplicate would publish it again, alerts included.
                        tracing::warn!(error = %e, "could not mark the result published");
                    }
                    state.processed.fetch_add(1, Ordering::SeqCst);
                    state.metrics.observe(&disposition);
                    if let Some(r) = &disposition.result {
                        state.record(r.action_id.as_deref(), r.status);
                        if let Err(e) =
                            report_unapproved(&publisher, &settings, &instance, &poller_user, r)
                                .await
                        {
                            tracing::warn!(error = %e, "could not report the unapproved attempt to the trip");
                        }
                    }
                    match delivery.acker.ack(BasicAckOptions::default()).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!("ack not sent (channel gone); expect a redelivery")
                        }
                        Err(e) => tracing::warn!(error = %e, "ack failed; expect a redelivery"),
                    }
                }
                Err(e) => {
                    state.metrics.publish_failed();
                    tracing::error!(error = %e, "could not publish the outcome; the command is not acked");
                    if e.is_connection() {
                        broken.cancel();
                        // The broker requeues this delivery, but its copy may wait on our claim
                        // until it is dead-lettered: publish the outcome on the next session's
                        // channel, marked as a replay (part of it may have gone out).
                        let Some(next) = await_next_publisher(&mut next_publisher).await else {
                            tracing::error!("no new broker session to publish the outcome on; a redelivered copy publishes it from the store");
                            return;
                        };
                        let mut again = disposition.clone();
                        if let Some(r) = again.result.as_mut() {
                            r.replay = true;
                        }
                        match carry_out(&next, &settings, &instance, &poller_user, &inbound, &again)
                            .await
                        {
                            Ok(_) => {
                                tracing::info!("outcome published on the new session");
                                if let Err(e) = store_outcome(true).await {
                                    tracing::warn!(error = %e, "could not mark the result published");
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "could not publish on the new session either; a redelivered copy publishes it from the store")
                            }
                        }
                        return;
                    }
                    // Message-level refusal (unroutable, nacked): retry later; the queue's
                    // delivery limit dead-letters it if it never succeeds.
                    requeue_after_pause(&delivery, &settings, &broken).await;
                }
            }
        }
    }
}

/// How often the idempotency store is probed for `/readyz`.
const STORE_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Probes the store (a claim and its release under a key no command can have) every
/// [`STORE_CHECK_EVERY`], recording whether it answered within that time.
async fn watch_store(
    store: Arc<dyn ResultStore>,
    state: Arc<PollerState>,
    stop: CancellationToken,
) {
    let key = format!("~readiness/{}", uuid::Uuid::new_v4().simple());
    let owner = "readiness-probe";
    let mut every = tokio::time::interval(STORE_CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let probe = async {
            store.claim(&key, owner, STORE_CHECK_EVERY * 5).await?;
            store.release(&key, owner).await
        };
        let ok = matches!(
            tokio::time::timeout(STORE_CHECK_EVERY, probe).await,
            Ok(Ok(()))
        );
        let was = state.store_ok.swap(ok, Ordering::SeqCst);
        if was != ok {
            if ok {
                tracing::info!("idempotency store reachable again");
            } else {
                tracing::error!(
                    "idempotency store unreachable: not ready (commands wait, fail closed)"
                );
            }
        }
    }
}

/// How long a command whose session was lost waits for the next one to publish on.
const REPUBLISH_WAIT: Duration = Duration::from_secs(120);

/// The publisher of the next session after the one that failed, within [`REPUBLISH_WAIT`].
async fn await_next_publisher(
    rx: &mut tokio::sync::watch::Receiver<Option<Publisher>>,
) -> Option<Publisher> {
    tokio::time::timeout(REPUBLISH_WAIT, async {
        loop {
            rx.changed().await.ok()?;
            if let Some(p) = rx.borrow_and_update().clone() {
                return Some(p);
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// Sends a delivery back to the queue after `publish_failure_pause_ms` (each requeue costs one
/// of the queue's delivery limit, so never in a tight loop). A requeue that can't be sent means
/// the channel is gone: the session is restarted and the broker requeues it.
async fn requeue_after_pause(delivery: &Delivery, settings: &Settings, broken: &CancellationToken) {
    tokio::time::sleep(Duration::from_millis(
        settings.processing.publish_failure_pause_ms,
    ))
    .await;
    let requeue = BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    if !matches!(delivery.acker.nack(requeue).await, Ok(true)) {
        broken.cancel();
    }
}

/// Shares an unapproved attempt (NEEDS_APPROVAL or BLOCKED) of a watched type with every
/// replica, so the trip counts attempts across all of them.
async fn report_unapproved(
    publisher: &Publisher,
    settings: &Settings,
    instance: &str,
    poller_user: &str,
    r: &ResultMessage,
) -> Result<(), BrokerError> {
    if !matches!(r.status, Status::NeedsApproval | Status::Blocked) {
        return Ok(());
    }
    let (Some(t), Some(agent), Some(action_id)) = (
        r.command_type.as_deref().and_then(CommandType::parse),
        r.agent.as_ref(),
        r.action_id.as_ref(),
    ) else {
        return Ok(());
    };
    if !settings
        .control
        .trips
        .iter()
        .any(|rule| rule.command_type == t)
    {
        return Ok(());
    }
    let attempt = UnapprovedAttempt {
        agent: agent.id.clone(),
        command_type: t,
        action_id: action_id.clone(),
        status: r.status,
        at: time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64,
        instance: instance.to_owned(),
    };
    publisher
        .publish(&Outgoing {
            exchange: settings.control.exchange.clone(),
            routing_key: "attempt.unapproved".into(),
            body: serde_json::to_vec(&attempt).expect("serializes"),
            message_type: "attempt",
            user_id: Some(poller_user.to_owned()),
            // Counting for the trip; no replica listening (the last one shutting down) is not
            // a failure of the command.
            best_effort: true,
            ..Default::default()
        })
        .await
}

/// The commands consumer, cancelled on pause and started again on resume. After a cancel it
/// keeps yielding what was already delivered (those deliveries are requeued by the pipeline's
/// gate) until the stream ends.
struct CommandConsumer {
    ch: lapin::Channel,
    queue: String,
    instance: String,
    active: Option<(String, lapin::Consumer)>,
    draining: Vec<lapin::Consumer>,
}

impl CommandConsumer {
    fn new(ch: lapin::Channel, queue: String, instance: String) -> Self {
        Self {
            ch,
            queue,
            instance,
            active: None,
            draining: Vec::new(),
        }
    }

    async fn start(&mut self) -> Result<(), lapin::Error> {
        if self.active.is_some() {
            return Ok(());
        }
        let tag = format!("{}-{}", self.instance, uuid::Uuid::new_v4().simple());
        let c = self
            .ch
            .basic_consume(
                self.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.active = Some((tag, c));
        Ok(())
    }

    async fn cancel(&mut self) -> Result<(), lapin::Error> {
        if let Some((tag, c)) = self.active.take() {
            self.ch
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await?;
            self.draining.push(c);
        }
        Ok(())
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The next delivery: first what cancelled consumers still hold, then the active one.
    /// Pending (never ready) when neither has anything, e.g. while paused.
    async fn next(&mut self) -> Option<Result<Delivery, lapin::Error>> {
        loop {
            if let Some(c) = self.draining.first_mut() {
                match c.next().await {
                    Some(d) => return Some(d),
                    None => {
                        self.draining.remove(0);
                        continue;
                    }
                }
            }
            return match &mut self.active {
                Some((_, c)) => c.next().await,
                None => futures::future::pending().await,
            };
        }
    }
}

/// How long setting up a session (channels, topology, the control state, the consumer) may
/// take before the session starts over.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// How often a quiet, running session checks that its commands consumer still receives.
const STALL_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Why the consumer on `queue` looks dead: commands wait and nobody consumes them (while this
/// session believes it does), or the broker doesn't answer the check. `None` when all is well.
/// A broker can cancel a consumer, or a connection can go quiet, without the consumer stream
/// ending; this catches it instead of waiting forever.
async fn consumer_stalled(ch: &lapin::Channel, queue: &str) -> Option<String> {
    let check = ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    );
    match tokio::time::timeout(STALL_CHECK_EVERY, check).await {
        Ok(Ok(q)) if q.message_count() > 0 && q.consumer_count() == 0 => Some(format!(
            "{} commands wait in {queue} with no consumer attached",
            q.message_count()
        )),
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(format!("the stall check failed: {e}")),
        Err(_) => Some("the broker did not answer the stall check".into()),
    }
}

struct Decrement<'a>(&'a AtomicUsize);
impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("{0}")]
    Lost(String),
}

impl From<lapin::Error> for SessionError {
    fn from(e: lapin::Error) -> Self {
        SessionError::Broker(e.into())
    }
}

fn reconnect_backoff(min_ms: u64, max_ms: u64) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(min_ms))
        .with_max_delay(Duration::from_millis(max_ms))
        .with_jitter()
        .without_max_times()
        .build()
}

fn header(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()))
}

/// Publishes a disposition: dead letter, result, reply, alerts, each confirmed. A reply that
/// can't be delivered is logged, not fatal: the confirmed result on the results exchange is the
/// record, and the agent may have gone away.
pub async fn carry_out(
    publisher: &Publisher,
    settings: &Settings,
    instance: &str,
    poller_user: &str,
    inbound: &Inbound,
    d: &Disposition,
) -> Result<audit::AuditOutcome, BrokerError> {
    let t = &settings.topology;
    let mut trail = d.audit.clone();
    if let Some(dl) = &d.dead_letter {
        let mut headers = FieldTable::default();
        headers.insert("x-poller-reason".into(), header(&dl.reason));
        headers.insert("x-poller-field".into(), header(&dl.field));
        headers.insert(
            "x-original-routing-key".into(),
            header(&inbound.routing_key),
        );
        if let Some(u) = &inbound.user_id {
            headers.insert("x-original-user-id".into(), header(u));
        }
        headers.insert("x-poller-instance".into(), header(instance));
        let body = match &dl.body {
            DeadLetterBody::Original => inbound.payload.clone(),
            DeadLetterBody::Withheld { sha256, bytes } => {
                headers.insert("x-poller-payload-sha256".into(), header(sha256));
                headers.insert(
                    "x-poller-payload-bytes".into(),
                    AMQPValue::LongLongInt(i64::try_from(*bytes).unwrap_or(i64::MAX)),
                );
                Vec::new()
            }
        };
        publisher
            .publish(&Outgoing {
                exchange: t.dead_letter_exchange.clone(),
                routing_key: inbound.routing_key.clone(),
                body,
                correlation_id: None,
                message_type: "dead_letter",
                headers: Some(headers),
                ..Default::default()
            })
            .await?;
        trail.push(AuditEvent::DeadLettered {
            at: audit::now(),
            reason: dl.reason.clone(),
        });
    }
    if let Some(result) = &d.result {
        let body = serde_json::to_vec(result).expect("result serializes");
        publisher
            .publish(&Outgoing {
                exchange: t.results_exchange.clone(),
                routing_key: result.status.routing_key(),
                body: body.clone(),
                correlation_id: result.action_id.clone(),
                message_type: "result",
                ..Default::default()
            })
            .await?;
        trail.push(AuditEvent::ResultPublished {
            at: audit::now(),
            status: result.status.to_string(),
            routing_key: result.status.routing_key(),
            rationale: result.rationale.clone(),
        });
        if let Some(queue) = d.reply.routing_key() {
            let reply = Outgoing {
                exchange: String::new(),
                routing_key: queue.to_owned(),
                body,
                correlation_id: result.action_id.clone(),
                message_type: "result",
                best_effort: matches!(d.reply, ReplyTarget::DirectReplyTo(_)),
                ..Default::default()
            };
            if let Err(e) = publisher.publish(&reply).await {
                if e.is_connection() {
                    return Err(e);
                }
                let kind = match d.reply {
                    ReplyTarget::DirectReplyTo(_) => "direct reply-to",
                    _ => "agent reply queue",
                };
                tracing::warn!(error = %e, kind, "reply not delivered; the result is on the results exchange");
            }
        }
    }
    for alert in &d.alerts {
        publisher
            .publish(&Outgoing {
                exchange: t.alerts_exchange.clone(),
                routing_key: alert.routing_key(),
                body: serde_json::to_vec(alert).expect("alert serializes"),
                correlation_id: alert.action_id.clone(),
                message_type: "alert",
                ..Default::default()
            })
            .await?;
        trail.push(AuditEvent::AlertSent {
            at: audit::now(),
            team: alert.team.clone(),
            priority: alert.priority.as_str().to_owned(),
        });
    }
    // The command's events together, confirmed before the command is acked.
    let record = AuditRecord {
        kind: "command".into(),
        action_id: d.result.as_ref().and_then(|r| r.action_id.clone()),
        agent: d
            .result
            .as_ref()
            .and_then(|r| r.agent.as_ref().map(|a| a.id.clone()))
            .or_else(|| inbound.user_id.clone()),
        instance: instance.to_owned(),
        at: audit::now(),
        events: trail,
    };
    // After the result and alerts: an audit exchange that refuses the record can't hold them
    // back (the record is retried, then dead-lettered on its own).
    audit::publish_record(
        publisher,
        &settings.audit.exchange,
        "audit.command",
        &t.dead_letter_exchange,
        &record,
        poller_user,
    )
    .await
}
