//! The poller under test and its replicas, in this process; commands; waiting on events with
//! a deadline.

use super::broker::*;
use super::collect::*;
use command_poller::bridge::signing::Secret;
use command_poller::bridge::simulator::{self, SimulatorConfig, SimulatorHandle};
use command_poller::bridge::{AppsScriptBridge, Bridge, BridgeClientConfig};
use command_poller::broker;
use command_poller::compose::build_panel;
use command_poller::judging::Panel;
use command_poller::outcome::{Alert, ResultMessage};
use command_poller::policy::Policy;
use command_poller::settings::Settings;
use command_poller::store::Stores;
use command_poller::worker::Poller;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub struct Harness {
    pub settings: Settings,
    pub sim: Arc<SimulatorHandle>,
    pub inbox: Arc<Mutex<Inbox>>,
    pub agent: Channel,
    pub agent_conn: Connection,
    pub shutdown: CancellationToken,
    pub poller_task: Option<tokio::task::JoinHandle<()>>,
    pub poller_state: Arc<command_poller::worker::PollerState>,
    pub secret: Secret,
    /// Shared by this harness's replicas (as Redis or PostgreSQL would be).
    pub store: Arc<dyn command_poller::store::ResultStore>,
    /// The store behind all its boundaries (results, bridge slots, rate windows).
    pub stores: Stores,
    _cleanup: Cleanup,
}

pub struct Options {
    /// The idempotency store, with bridge slots and rate windows of this harness's own;
    /// default: an embedded store in a temp file.
    pub store: Option<Arc<dyn command_poller::store::ResultStore>>,
    /// A backend behind all its boundaries (the fleet limits shared through it); wins over
    /// `store`.
    pub stores: Option<Stores>,
    pub panel: Option<Panel>,
    pub sim_latency: Duration,
    pub tweak: Box<dyn FnOnce(&mut Settings) + Send>,
    pub start_poller: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            store: None,
            stores: None,
            panel: None,
            sim_latency: Duration::ZERO,
            tweak: Box::new(|_| {}),
            start_poller: true,
        }
    }
}

pub fn bridge_client(
    settings: &Settings,
    sim: &SimulatorHandle,
    secret: Secret,
) -> Arc<dyn Bridge> {
    let b = &settings.bridge;
    Arc::new(
        AppsScriptBridge::new(BridgeClientConfig {
            url: sim.url(),
            secret,
            request_timeout: b.request_timeout,
            retry_budget: b.retry_budget,
            min_backoff: b.min_backoff,
            max_backoff: b.max_backoff,
        })
        .unwrap(),
    )
}

impl Harness {
    pub async fn start(opts: Options) -> Harness {
        let sfx = suffix();
        let mut settings = test_settings(&sfx);
        (opts.tweak)(&mut settings);
        let cleanup = Cleanup(settings.clone());
        let secret = Secret::new(format!("test-secret-{sfx}"));
        let mut cfg = SimulatorConfig::new(secret.clone());
        cfg.latency = opts.sim_latency;
        let sim = Arc::new(
            simulator::start(cfg, ([127, 0, 0, 1], 0).into())
                .await
                .unwrap(),
        );

        // Declare the topology first so the collectors can bind before the poller starts.
        let conn = Connection::connect(AMQP, Default::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        broker::declare(&ch, &settings.topology).await.unwrap();
        broker::declare_audit(&conn, &settings.audit, &settings.topology.replication)
            .await
            .unwrap();
        bootstrap_control(&conn, &settings).await;
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let t = &settings.topology;
        tokio::spawn(collect(
            conn.create_channel().await.unwrap(),
            t.results_queue.clone(),
            inbox.clone(),
            Kind::Results,
        ));
        for team in &t.alert_teams {
            tokio::spawn(collect(
                conn.create_channel().await.unwrap(),
                format!("{}.{team}", t.alerts_exchange),
                inbox.clone(),
                Kind::Alerts,
            ));
        }
        tokio::spawn(collect(
            conn.create_channel().await.unwrap(),
            t.dead_letter_queue.clone(),
            inbox.clone(),
            Kind::DeadLetters,
        ));

        let agent_conn = Connection::connect(AMQP, Default::default()).await.unwrap();
        let agent = agent_conn.create_channel().await.unwrap();
        agent
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();

        // The store a test asks for (Redis, PostgreSQL), or an embedded one of its own.
        let stores = match (opts.stores, opts.store) {
            (Some(stores), _) => stores,
            (None, Some(results)) => Stores::local(results),
            (None, None) => command_poller::store::open_all(&settings.idempotency)
                .await
                .expect("store opens"),
        };
        let mut h = Harness {
            settings,
            sim,
            inbox,
            agent,
            agent_conn,
            shutdown: CancellationToken::new(),
            poller_task: None,
            poller_state: Arc::new(Default::default()),
            secret: secret.clone(),
            store: stores.results.clone(),
            stores,
            _cleanup: cleanup,
        };
        if opts.start_poller {
            h.start_poller(opts.panel, secret).await;
        }
        h
    }

    pub fn poller(&self, panel: Option<Panel>, secret: Secret) -> Poller {
        let policy = Arc::new(Policy::load(&self.settings.policy.file).unwrap());
        let panel = panel.unwrap_or_else(|| {
            build_panel(
                &self.settings.panel,
                &self.settings.secrets.judge_api_keys,
                self.stores.windows.clone(),
            )
            .expect("panel builds")
        });
        let bridge = bridge_client(&self.settings, &self.sim, secret);
        Poller::new(
            self.settings.clone(),
            policy,
            panel,
            bridge,
            self.stores.clone(),
            None,
        )
    }

    pub async fn start_poller(&mut self, panel: Option<Panel>, secret: Secret) {
        let poller = self.poller(panel, secret);
        self.poller_state = poller.state();
        let token = self.shutdown.clone();
        self.poller_task = Some(tokio::spawn(async move { poller.run(token).await }));
    }

    /// Publishes like an agent: user_id guest (the test connection's user) unless overridden.
    pub async fn publish(&self, payload: &[u8], props: BasicProperties) {
        let key = command_poller::agent::routing_key_for(payload);
        let c = self
            .agent
            .basic_publish(
                self.settings.topology.commands_exchange.as_str().into(),
                key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                payload,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(
            matches!(c, lapin::Confirmation::Ack(None)),
            "command not routed: {c:?}"
        );
    }

    pub async fn send(&self, payload: &serde_json::Value) {
        self.publish(
            payload.to_string().as_bytes(),
            BasicProperties::default()
                .with_user_id("guest".into())
                .with_content_type("application/json".into()),
        )
        .await
    }

    pub async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Inbox) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(&self.inbox.lock().unwrap()) {
                return v;
            }
            if Instant::now() > deadline {
                let inbox = self.inbox.lock().unwrap();
                panic!(
                    "timed out waiting for {what}; have {} results, {} alerts, {} dead letters; results: {:?}; dead letters (their x-death): {:?}",
                    inbox.results.len(),
                    inbox.alerts.len(),
                    inbox.dead.len(),
                    inbox.results.iter().map(|(_, r)| (&r.action_id, r.status)).collect::<Vec<_>>(),
                    inbox.dead.iter().map(|d| (&d.routing_key, d.headers.as_ref().and_then(|h| h.inner().get("x-first-death-reason")).map(|r| format!("{r:?}")))).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the poller is connected (it has declared and bound its topology).
    pub async fn wait_connected(&self) {
        self.wait_until("the poller to connect", Duration::from_secs(10), |_| {
            self.poller_state
                .connected
                .load(std::sync::atomic::Ordering::SeqCst)
                .then_some(())
        })
        .await
    }

    pub async fn result(&self, action_id: &str) -> ResultMessage {
        self.wait_until(
            &format!("result of {action_id}"),
            Duration::from_secs(20),
            |i| {
                i.results
                    .iter()
                    .find(|(_, r)| r.action_id.as_deref() == Some(action_id))
                    .map(|(_, r)| r.clone())
            },
        )
        .await
    }

    /// The first result for `agent`'s `action_id` (other agents may use the same id).
    pub async fn result_of(&self, agent: &str, action_id: &str) -> ResultMessage {
        self.wait_until(
            &format!("result of {agent}/{action_id}"),
            Duration::from_secs(20),
            |i| {
                i.results
                    .iter()
                    .find(|(_, r)| {
                        r.action_id.as_deref() == Some(action_id)
                            && r.agent.as_ref().is_some_and(|a| a.id == agent)
                    })
                    .map(|(_, r)| r.clone())
            },
        )
        .await
    }

    pub fn results_for(&self, action_id: &str) -> usize {
        self.inbox
            .lock()
            .unwrap()
            .results
            .iter()
            .filter(|(_, r)| r.action_id.as_deref() == Some(action_id))
            .count()
    }

    pub fn alerts_for(&self, action_id: &str) -> Vec<(Received, Alert)> {
        self.inbox
            .lock()
            .unwrap()
            .alerts
            .iter()
            .filter(|(_, a)| a.action_id.as_deref() == Some(action_id))
            .cloned()
            .collect()
    }

    /// Messages ready in the commands queue (passive declare).
    pub async fn queue_depth(&self) -> u32 {
        let ch = self.agent_conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                self.settings.topology.commands_queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = ch.close(200, "ok".into()).await;
        q.message_count()
    }

    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.poller_task.take() {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("poller stops")
                .unwrap();
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn cmd(
    action_id: &str,
    command_type: &str,
    service: &str,
    severity: &str,
) -> serde_json::Value {
    serde_json::json!({
        "action_id": action_id,
        "command_type": command_type,
        "params": {"service": service},
        "severity": severity,
    })
}

/// Gives a stray message time to arrive before a test asserts that none did.
pub async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Another replica of the poller in this process, with its own instance id.
pub struct ReplicaHandle {
    pub state: Arc<command_poller::worker::PollerState>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    pub instance: String,
}

impl ReplicaHandle {
    pub fn mode(&self) -> command_poller::control::Mode {
        self.state.gate.mode()
    }
    pub fn connected(&self) -> bool {
        self.state
            .connected
            .load(std::sync::atomic::Ordering::SeqCst)
    }
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
    }
}

impl Harness {
    pub fn spawn_replica(&self, name: &str, panel: Option<Panel>) -> ReplicaHandle {
        self.spawn_replica_with(name, panel, self.stores.clone())
    }

    /// A replica with a store of its own (its own connections to a shared Redis or
    /// PostgreSQL, as another process would have).
    pub fn spawn_replica_with(
        &self,
        name: &str,
        panel: Option<Panel>,
        stores: Stores,
    ) -> ReplicaHandle {
        let mut settings = self.settings.clone();
        settings.instance_id = format!("{}-{name}", self.settings.instance_id);
        let policy = Arc::new(Policy::load(&settings.policy.file).unwrap());
        let panel = panel.unwrap_or_else(|| {
            build_panel(
                &settings.panel,
                &settings.secrets.judge_api_keys,
                stores.windows.clone(),
            )
            .expect("panel builds")
        });
        let bridge = bridge_client(&settings, &self.sim, self.secret.clone());
        let poller = Poller::new(settings.clone(), policy, panel, bridge, stores, None);
        let state = poller.state();
        let shutdown = self.shutdown.child_token();
        let token = shutdown.clone();
        let task = tokio::spawn(async move { poller.run(token).await });
        ReplicaHandle {
            state,
            shutdown,
            task,
            instance: settings.instance_id,
        }
    }

    /// The fleet's status, as an operator asks for it (every replica's answer and the stored
    /// state).
    pub async fn status(&self) -> command_poller::control::operator::Report {
        self.operator()
            .run(status_request())
            .await
            .expect("status answered")
    }

    pub fn operator(&self) -> command_poller::control::operator::Operator<'_> {
        command_poller::control::operator::Operator::new(
            &self.settings,
            &super::broker::node(AMQP),
            Duration::from_millis(1500),
        )
    }
}

/// A status request with a new request id.
pub fn status_request() -> command_poller::control::ControlCommand {
    command_poller::control::ControlCommand::Status {
        request_id: command_poller::control::operator::new_request_id(),
    }
}

/// A port free on 127.0.0.1 right now (for a process the test starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A consumer of `queue` on `ch` that acks nothing (the broker counts each delivery as done):
/// for reading what the poller published, or direct reply-to.
pub async fn consume_all(ch: &lapin::Channel, queue: &str) -> lapin::Consumer {
    ch.basic_consume(
        queue.into(),
        "".into(),
        lapin::options::BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap()
}

/// Polls `f` until it holds, or panics after `timeout`.
pub async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Environment overrides that point a `command-poller` process at `s`'s broker names, instance
/// and store (for tests and benchmarks that run the binary).
pub fn poller_env(s: &Settings) -> Vec<(String, String)> {
    let t = &s.topology;
    [
        // The test broker's guest user is an operator only in config/local.toml.
        ("APP_ENVIRONMENT", "local".to_owned()),
        // Many pollers at once on this machine: any free loopback port.
        ("POLLER__HEALTH__STATUS_LISTEN", "127.0.0.1:0".to_owned()),
        (
            "POLLER__TOPOLOGY__COMMANDS_EXCHANGE",
            t.commands_exchange.clone(),
        ),
        ("POLLER__TOPOLOGY__COMMANDS_QUEUE", t.commands_queue.clone()),
        (
            "POLLER__TOPOLOGY__DEAD_LETTER_EXCHANGE",
            t.dead_letter_exchange.clone(),
        ),
        (
            "POLLER__TOPOLOGY__DEAD_LETTER_QUEUE",
            t.dead_letter_queue.clone(),
        ),
        (
            "POLLER__TOPOLOGY__RESULTS_EXCHANGE",
            t.results_exchange.clone(),
        ),
        (
            "POLLER__TOPOLOGY__ALERTS_EXCHANGE",
            t.alerts_exchange.clone(),
        ),
        ("POLLER__TOPOLOGY__RESULTS_QUEUE", t.results_queue.clone()),
        (
            "POLLER__TOPOLOGY__DELIVERY_LIMIT",
            t.delivery_limit.to_string(),
        ),
        ("POLLER__TOPOLOGY__MAX_LENGTH", t.max_length.to_string()),
        (
            "POLLER__TOPOLOGY__MAX_LENGTH_BYTES",
            t.max_length_bytes.to_string(),
        ),
        ("POLLER__CONTROL__EXCHANGE", s.control.exchange.clone()),
        (
            "POLLER__CONTROL__STATE_EXCHANGE",
            s.control.state_exchange.clone(),
        ),
        (
            "POLLER__CONTROL__STATE_QUEUE",
            s.control.state_queue.clone(),
        ),
        (
            "POLLER__CONTROL__EVENTS_QUEUE",
            s.control.events_queue.clone(),
        ),
        ("POLLER__AUDIT__EXCHANGE", s.audit.exchange.clone()),
        ("POLLER__AUDIT__QUEUE", s.audit.queue.clone()),
        ("POLLER__APPROVAL__EXCHANGE", s.approval.exchange.clone()),
        ("POLLER__APPROVAL__QUEUE", s.approval.queue.clone()),
        (
            "POLLER__AMQP__CONNECTION_NAME",
            s.amqp.connection_name.clone(),
        ),
        ("POLLER__INSTANCE_ID", s.instance_id.clone()),
        (
            "POLLER__IDEMPOTENCY__PATH",
            s.idempotency.path.display().to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The audit sink for `settings`' audit stream, appending to `file`, until `stop`.
pub fn spawn_sink(
    settings: &Settings,
    file: &std::path::Path,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let (s, f) = (settings.clone(), file.to_owned());
    tokio::spawn(async move {
        let cfg = command_poller::audit::sink::SinkConfig::from_settings(&s);
        if let Err(e) = command_poller::audit::sink::run(&cfg, &f, stop).await {
            panic!("audit sink: {e}");
        }
    })
}

/// Declares the control topology and writes its first entry (RUNNING) as the operator guest
/// (when guest is one),
/// as `command-poller resume` does on a new deployment: a stream that holds nothing is only
/// known empty after [`command_poller::control::state_log::EMPTY_GRACE`].
pub async fn bootstrap_control(conn: &Connection, settings: &Settings) {
    use command_poller::control::state_log::{self, Change};
    let ch = conn.create_channel().await.unwrap();
    broker::declare_control(&ch, &settings.control, &settings.topology.replication)
        .await
        .unwrap();
    if !settings.control.operators.iter().any(|o| o == "guest") {
        // Only an operator's entry anchors the state: left empty (a new system, after the
        // grace, with `empty_stream = "running"`).
        let _ = ch.close(200, "declared".into()).await;
        return;
    }
    let publisher = command_poller::broker::Publisher::open(conn).await.unwrap();
    let genesis = command_poller::control::ControlState {
        by: "guest".into(),
        reason: "test bootstrap".into(),
        ..command_poller::control::ControlState::initial()
    };
    state_log::write(
        &publisher,
        &settings.control,
        None,
        Change::Mode { base: 0 },
        &genesis,
        "guest",
    )
    .await
    .unwrap();
    let _ = ch.close(200, "declared".into()).await;
}

/// Appends `body` to the stored-state stream as the operator (guest).
pub async fn append_state(h: &Harness, body: &[u8]) {
    let conn = lapin::Connection::connect(AMQP, Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    // Declared as the poller would, in case nothing ran yet.
    command_poller::broker::declare_control(
        &ch,
        &h.settings.control,
        &h.settings.topology.replication,
    )
    .await
    .unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    ch.basic_publish(
        h.settings.control.state_exchange.as_str().into(),
        "".into(),
        Default::default(),
        body,
        lapin::BasicProperties::default().with_user_id("guest".into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let _ = conn.close(200, "ok".into()).await;
}
