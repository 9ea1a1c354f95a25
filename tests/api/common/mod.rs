//! Test harness: the real poller (in-process, from the library) against the real RabbitMQ on
//! 127.0.0.1:5672, with its own randomly suffixed exchanges and queues (deleted on drop), the
//! bridge simulator on 127.0.0.1:0, and scripted judges where a test needs them.
#![allow(dead_code)]

use command_poller::bridge::signing::Secret;
use command_poller::bridge::simulator::{self, SimulatorConfig, SimulatorHandle};
use command_poller::bridge::{AppsScriptBridge, Bridge, BridgeClientConfig};
use command_poller::broker;
use command_poller::judging::{Judge, JudgeError, JudgeRequest, Panel, Verdict};
use command_poller::outcome::{Alert, ResultMessage};
use command_poller::policy::Policy;
use command_poller::settings::Settings;
use command_poller::worker::{build_panel, Poller};
use futures::future::BoxFuture;
use futures::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The private test instances `scripts/ensure-stores.sh` starts (never the machine's own).
pub const REDIS_PORT: u16 = 6390;
pub const REDIS: &str = "redis://127.0.0.1:6390";
pub const POSTGRES: &str = "postgres://postgres@127.0.0.1:5440/test";

pub fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

/// Default settings with every broker name made unique to this test.
pub fn test_settings(sfx: &str) -> Settings {
    let mut s =
        Settings::load_isolated(Path::new("config"), "local").expect("config/default.toml loads");
    let t = &mut s.topology;
    t.commands_exchange = format!("t.{sfx}.commands");
    t.commands_queue = format!("t.{sfx}.commands");
    t.dead_letter_exchange = format!("t.{sfx}.dlx");
    t.dead_letter_queue = format!("t.{sfx}.dead");
    t.results_exchange = format!("t.{sfx}.results");
    t.alerts_exchange = format!("t.{sfx}.alerts");
    t.results_queue = format!("t.{sfx}.results");
    s.control.exchange = format!("t.{sfx}.control");
    s.control.state_exchange = format!("t.{sfx}.control.state");
    s.control.state_queue = format!("t.{sfx}.control.state.log");
    s.control.events_queue = format!("t.{sfx}.control.events");
    s.audit.exchange = format!("t.{sfx}.audit");
    s.audit.queue = format!("t.{sfx}.audit");
    s.amqp.connection_name = format!("poller-{sfx}");
    s.amqp.reconnect_min = Duration::from_millis(50);
    s.amqp.reconnect_max = Duration::from_millis(500);
    s.instance_id = format!("test-{sfx}");
    s.processing.publish_failure_pause = Duration::from_millis(50);
    s.processing.drain_timeout = Duration::from_secs(10);
    s.idempotency.path = std::env::temp_dir().join(format!("poller-store-{sfx}.redb"));
    s.bridge.min_backoff = Duration::from_millis(20);
    s.bridge.max_backoff = Duration::from_millis(200);
    s.bridge.retry_budget = Duration::from_secs(5);
    s.bridge.request_timeout = Duration::from_secs(5);
    s
}

/// Every queue and exchange name a settings value uses.
fn names(s: &Settings) -> (Vec<String>, Vec<String>) {
    let t = &s.topology;
    let c = &s.control;
    let mut queues = vec![
        t.commands_queue.clone(),
        t.dead_letter_queue.clone(),
        t.results_queue.clone(),
        c.state_queue.clone(),
        c.events_queue.clone(),
        s.audit.queue.clone(),
    ];
    queues.extend(
        t.alert_teams
            .iter()
            .map(|team| format!("{}.{team}", t.alerts_exchange)),
    );
    let exchanges = vec![
        t.commands_exchange.clone(),
        t.dead_letter_exchange.clone(),
        t.results_exchange.clone(),
        t.alerts_exchange.clone(),
        c.exchange.clone(),
        c.state_exchange.clone(),
        s.audit.exchange.clone(),
    ];
    (queues, exchanges)
}

/// Deletes the test's broker objects when dropped, even after a panic.
pub struct Cleanup(pub Settings);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0.idempotency.path);
        let (queues, exchanges) = names(&self.0);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok(conn) = Connection::connect(AMQP, Default::default()).await else {
                    return;
                };
                for q in queues {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = ch
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                }
                for e in exchanges {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = ch
                            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                            .await;
                    }
                }
                let _ = conn.close(200, "cleanup".into()).await;
            });
        })
        .join();
    }
}

/// What a judge in a test does.
#[derive(Clone)]
pub enum Script {
    Approve,
    Deny,
    Fail,
    Hang,
}

pub struct ScriptedJudge {
    pub name: String,
    pub script: Script,
    pub delay: Duration,
}

impl Judge for ScriptedJudge {
    fn name(&self) -> &str {
        &self.name
    }
    fn evaluate<'a>(&'a self, _r: &'a JudgeRequest) -> BoxFuture<'a, Result<Verdict, JudgeError>> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            match self.script {
                Script::Approve => Ok(Verdict::Approve {
                    reason: format!("{} approves", self.name),
                }),
                Script::Deny => Ok(Verdict::Deny {
                    reason: format!("{} denies", self.name),
                }),
                Script::Fail => Err(JudgeError::Transport("scripted failure".into())),
                Script::Hang => {
                    futures::future::pending::<()>().await;
                    unreachable!()
                }
            }
        })
    }
}

pub fn scripted_panel(judges: Vec<(&str, Script, u64)>, timeout: Duration, quorum: usize) -> Panel {
    Panel::new(
        judges
            .into_iter()
            .map(|(n, s, ms)| {
                (
                    Arc::new(ScriptedJudge {
                        name: n.into(),
                        script: s,
                        delay: Duration::from_millis(ms),
                    }) as Arc<dyn Judge>,
                    timeout,
                )
            })
            .collect(),
        quorum,
    )
}

/// A received message, with the properties tests look at.
#[derive(Debug, Clone)]
pub struct Received {
    pub routing_key: String,
    pub body: Vec<u8>,
    pub headers: Option<FieldTable>,
    pub correlation_id: Option<String>,
    pub delivery_mode: Option<u8>,
}

impl Received {
    pub fn header(&self, k: &str) -> Option<String> {
        self.headers
            .as_ref()?
            .inner()
            .iter()
            .find(|(key, _)| key.as_str() == k)
            .map(|(_, v)| match v {
                AMQPValue::LongString(s) => s.to_string(),
                other => format!("{other:?}"),
            })
    }
}

#[derive(Default)]
pub struct Inbox {
    pub results: Vec<(Received, ResultMessage)>,
    pub alerts: Vec<(Received, Alert)>,
    pub dead: Vec<Received>,
}

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
    pub store: Arc<dyn command_poller::idempotency::ResultStore>,
    _cleanup: Cleanup,
}

pub struct Options {
    /// The idempotency store; default: an embedded store in a temp file.
    pub store: Option<Arc<dyn command_poller::idempotency::ResultStore>>,
    pub panel: Option<Panel>,
    pub sim_latency: Duration,
    pub tweak: Box<dyn FnOnce(&mut Settings) + Send>,
    pub start_poller: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            store: None,
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

async fn collect(ch: Channel, queue: String, inbox: Arc<Mutex<Inbox>>, kind: u8) {
    let mut c = ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume test queue");
    while let Some(Ok(d)) = c.next().await {
        let r = Received {
            routing_key: d.routing_key.to_string(),
            body: d.data.clone(),
            headers: d.properties.headers().clone(),
            correlation_id: d
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string()),
            delivery_mode: *d.properties.delivery_mode(),
        };
        let mut inbox = inbox.lock().unwrap();
        match kind {
            0 => {
                let m: ResultMessage = serde_json::from_slice(&d.data).expect("result parses");
                inbox.results.push((r, m));
            }
            1 => {
                let a: Alert = serde_json::from_slice(&d.data).expect("alert parses");
                inbox.alerts.push((r, a));
            }
            _ => inbox.dead.push(r),
        }
    }
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
        broker::declare_audit(&conn, &settings.audit).await.unwrap();
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let t = &settings.topology;
        tokio::spawn(collect(
            conn.create_channel().await.unwrap(),
            t.results_queue.clone(),
            inbox.clone(),
            0,
        ));
        for team in &t.alert_teams {
            tokio::spawn(collect(
                conn.create_channel().await.unwrap(),
                format!("{}.{team}", t.alerts_exchange),
                inbox.clone(),
                1,
            ));
        }
        tokio::spawn(collect(
            conn.create_channel().await.unwrap(),
            t.dead_letter_queue.clone(),
            inbox.clone(),
            2,
        ));

        let agent_conn = Connection::connect(AMQP, Default::default()).await.unwrap();
        let agent = agent_conn.create_channel().await.unwrap();
        agent
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();

        let settings_for_store = settings.idempotency.clone();
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
            // The store a test asks for (Redis, PostgreSQL), or an embedded one of its own.
            store: match opts.store {
                Some(store) => store,
                None => command_poller::idempotency::open(&settings_for_store)
                    .await
                    .expect("store opens"),
            },
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
            build_panel(&self.settings.panel, &self.settings.secrets.judge_api_keys)
                .expect("panel builds")
        });
        let bridge = bridge_client(&self.settings, &self.sim, secret);
        Poller::new(
            self.settings.clone(),
            policy,
            panel,
            bridge,
            self.store.clone(),
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
                    "timed out waiting for {what}; have {} results, {} alerts, {} dead letters: {:?}",
                    inbox.results.len(),
                    inbox.alerts.len(),
                    inbox.dead.len(),
                    inbox.results.iter().map(|(_, r)| (&r.action_id, r.status)).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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
        let mut settings = self.settings.clone();
        settings.instance_id = format!("{}-{name}", self.settings.instance_id);
        let policy = Arc::new(Policy::load(&settings.policy.file).unwrap());
        let panel = panel.unwrap_or_else(|| {
            build_panel(&settings.panel, &settings.secrets.judge_api_keys).expect("panel builds")
        });
        let bridge = bridge_client(&settings, &self.sim, self.secret.clone());
        let poller = Poller::new(
            settings.clone(),
            policy,
            panel,
            bridge,
            self.store.clone(),
            None,
        );
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

    pub fn operator(&self) -> command_poller::control::operator::Operator<'_> {
        command_poller::control::operator::Operator::new(
            &self.settings,
            AMQP,
            Duration::from_millis(1500),
        )
    }
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

/// A throwaway broker user (an "agent"), deleted on drop.
pub struct BrokerUser(pub String);
impl BrokerUser {
    pub fn create() -> Self {
        let name = format!("t-agent-{}", suffix());
        let run = |args: &[&str]| {
            assert!(
                std::process::Command::new("rabbitmqctl")
                    .args(args)
                    .output()
                    .unwrap()
                    .status
                    .success(),
                "{args:?}"
            )
        };
        run(&["add_user", &name, "agent-pass"]);
        run(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"]);
        Self(name)
    }
    pub fn url(&self) -> String {
        format!("amqp://{}:agent-pass@127.0.0.1:5672/%2f", self.0)
    }
}
impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.0])
            .output();
    }
}

impl BrokerUser {
    /// Publishes `payload` to the harness's commands exchange as this user (broker-checked
    /// `user_id`), with a confirm.
    pub async fn send(&self, h: &Harness, payload: &serde_json::Value) {
        let conn = Connection::connect(&self.url(), Default::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        let key = format!(
            "command.{}",
            payload["command_type"]
                .as_str()
                .unwrap_or("unknown")
                .to_ascii_lowercase()
        );
        ch.basic_publish(
            h.settings.topology.commands_exchange.as_str().into(),
            key.as_str().into(),
            Default::default(),
            payload.to_string().as_bytes(),
            BasicProperties::default()
                .with_user_id(self.0.as_str().into())
                .with_content_type("application/json".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        let _ = conn.close(200, "sent".into()).await;
    }
}

/// Closes the broker connections whose name starts with `name_prefix` (a simulated failure);
/// returns how many.
pub fn close_connections(name_prefix: &str) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut closed = 0;
    for line in text.lines() {
        if line.contains(&format!("\"connection_name\",\"{name_prefix}")) {
            let pid = line.split('\t').next().unwrap();
            let st = std::process::Command::new("rabbitmqctl")
                .args(["close_connection", pid, "test: simulated broker failure"])
                .status()
                .unwrap();
            assert!(st.success());
            closed += 1;
        }
    }
    closed
}
