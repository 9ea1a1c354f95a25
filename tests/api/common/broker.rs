//! Broker fixtures: the test broker, settings whose every name is unique to one test, cleanup
//! on drop, throwaway users, and dropping connections on purpose.

use super::harness::Harness;
use command_poller::settings::Settings;
use lapin::options::*;
use lapin::{BasicProperties, Connection};
use std::path::Path;
use std::time::Duration;

pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// One broker node, `url`, as the clients take it.
pub fn node(url: &str) -> command_poller::broker::Endpoints {
    command_poller::broker::Endpoints::new([url]).expect("an amqp URL")
}
/// The private test instances `scripts/ensure-stores.sh` starts (never the machine's own).
pub const REDIS_PORT: u16 = 6390;
pub const REDIS: &str = "redis://127.0.0.1:6390";
/// The private Redis that speaks TLS only (`scripts/ensure-stores.sh`).
pub const REDIS_TLS_PORT: u16 = 6391;
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
    s.approval.exchange = format!("t.{sfx}.approvals");
    s.approval.queue = format!("t.{sfx}.approvals");
    s.approval.sweep_interval = Duration::from_millis(200);
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
        s.approval.queue.clone(),
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
        s.approval.exchange.clone(),
    ];
    (queues, exchanges)
}

/// Deletes the test's broker objects when dropped, even after a panic.
pub struct Cleanup(pub Settings);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0.idempotency.path);
        // The embedded store's sealing key, written beside it (`<path>.key`).
        let mut key = self.0.idempotency.path.clone().into_os_string();
        key.push(".key");
        let _ = std::fs::remove_file(key);
        let (queues, exchanges) = names(&self.0);
        let url = self.0.amqp.urls.first().cloned().unwrap_or(AMQP.to_owned());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // A deadline: a suite's own node may be down or paused by then.
            let cleanup = async move {
                // The settings' first node: the shared broker, or a suite's own.
                let Ok(conn) = Connection::connect(&url, Default::default()).await else {
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
            };
            // The timer is made inside the runtime (made outside, it panics and the thread with it).
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(30), cleanup).await;
            });
        })
        .join();
    }
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

/// Variables a developer may have set for their own poller: the `POLLER__*` overrides, the
/// environment name, the log filter and the secrets the shipped configuration names.
const DEVELOPER_VARIABLES: [&str; 5] = [
    "APP_ENVIRONMENT",
    "RUST_LOG",
    "BRIDGE_SECRET",
    "POLLER_STORE_KEY",
    "AUDIT_CHAIN_KEY",
];

/// A command that runs `program` (the poller binary, or a wrapper around it) without any of
/// the developer's own poller configuration: tests set what they need explicitly.
pub fn isolated(program: &str) -> std::process::Command {
    let mut c = std::process::Command::new(program);
    for (k, _) in std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v))) {
        if k.starts_with("POLLER__") || DEVELOPER_VARIABLES.contains(&k.as_str()) {
            c.env_remove(k);
        }
    }
    c
}
