//! The fault suite: real processes (the poller and bridge simulator binaries), the real broker,
//! real signals. Each scenario runs hundreds of commands, then checks per action_id: a final
//! result, at most one non-replay result, and at most one bridge execution (the simulator's
//! call log), and prints the counts (docs/RELIABILITY.md quotes them).
//!
//! These restart the broker and kill processes, so they are `#[ignore]`d in the parallel suite
//! and run one at a time by `scripts/test.sh`:
//!   cargo test --test api -- --ignored --test-threads=1 --nocapture faults::
//!
//! The broker they restart is the one on 127.0.0.1:5672, unless `FAULT_BROKER_NODE` and
//! `FAULT_BROKER_PORT` name a node of their own (`scripts/cluster.sh solo-start` starts one):
//! `scripts/test.sh` runs them on such a node, beside the tests that share the one on 5672.

use crate::common::free_port;
use crate::common::{cmd, suffix, test_settings, Cleanup};
use command_poller::outcome::ResultMessage;
use futures::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_command-poller");

/// The broker node the suite restarts: `FAULT_BROKER_NODE` (a `rabbitmqctl -n` name), or the
/// local default node.
fn broker_node() -> Option<String> {
    std::env::var("FAULT_BROKER_NODE").ok()
}

/// The suite's broker: `FAULT_BROKER_PORT` on 127.0.0.1, or the shared one on 5672.
fn broker_url() -> String {
    match std::env::var("FAULT_BROKER_PORT") {
        Ok(port) => format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        Err(_) => crate::common::AMQP.to_owned(),
    }
}

/// `rabbitmqctl` aimed at the suite's broker node.
fn rabbitmqctl() -> Command {
    let mut c = Command::new("rabbitmqctl");
    if let Some(node) = broker_node() {
        c.args(["-n", &node]);
    }
    c
}

/// One scenario's world: names, processes, the simulator behind a switchable proxy.
pub(crate) struct World {
    pub(crate) name: &'static str,
    /// The broker nodes (the one on 127.0.0.1:5672, or a cluster's): the pollers, the test's
    /// publisher and its results collector fail over between them.
    pub(crate) urls: Vec<String>,
    pub(crate) sfx: String,
    pub(crate) settings: command_poller::settings::Settings,
    secret: String,
    sim_port: u16,
    proxy_port: u16,
    proxy_up: Arc<AtomicBool>,
    sim: Child,
    pub(crate) pollers: Vec<Child>,
    pub(crate) results: Arc<Mutex<Vec<ResultMessage>>>,
    pub(crate) extra_env: Vec<(String, String)>,
    pub(crate) config_dir: std::path::PathBuf,
    pub(crate) logs: Vec<std::path::PathBuf>,
    _cleanup: Cleanup,
}

/// The shipped config for a fault world: no automatic trips (the mixed load would trip them:
/// that feature has its own tests) and no compliance rate limit (one broker user sends all).
fn fault_config(edit: impl Fn(String) -> String) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fault-config-{}", suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut text = std::fs::read_to_string("config/default.toml").unwrap();
    let trips = text
        .find("# Automatic trips:")
        .expect("the trips section of config/default.toml");
    let audit = text.find("[audit]").unwrap();
    text.replace_range(trips..audit, "");
    // The load comes from one agent: its per-agent limits and E01's pattern would veto it.
    let text = text
        .replace(
            "max_per_agent = { count = 5, window_secs = 3600 }",
            "max_per_agent = { count = 100000, window_secs = 3600 }",
        )
        .replace("max_burst = { count = 3, window_secs = 600 }\n", "")
        .replace(
            "max_unapproved_recent = { count = 2, window_secs = 3600 }\n",
            "",
        );
    assert!(
        !text.contains("max_burst = { count = 3")
            && !text.contains("max_unapproved_recent = { count = 2")
    );
    std::fs::write(dir.join("default.toml"), edit(text)).unwrap();
    // APP_ENVIRONMENT=local, as for every test poller: guest is an operator (the levers of
    // the cluster scenarios).
    std::fs::copy("config/local.toml", dir.join("local.toml")).unwrap();
    dir
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.config_dir);
        for p in &mut self.pollers {
            let _ = p.kill();
            let _ = p.wait();
        }
        let _ = self.sim.kill();
        let _ = self.sim.wait();
        // Kept after a failure, or when asked (FAULT_KEEP_LOGS=1) to study a passing run.
        if !std::thread::panicking() && std::env::var_os("FAULT_KEEP_LOGS").is_none() {
            for l in &self.logs {
                let _ = std::fs::remove_file(l);
            }
        }
    }
}

/// A TCP proxy in front of the simulator: while down, nothing listens (connection refused).
async fn proxy(port: u16, target: u16, up: Arc<AtomicBool>) {
    loop {
        while !up.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        while up.load(Ordering::SeqCst) {
            let Ok(Ok((mut inbound, _))) =
                tokio::time::timeout(Duration::from_millis(50), listener.accept()).await
            else {
                continue;
            };
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
        drop(listener);
    }
}

/// Collects results from the results queue, reconnecting across broker restarts. Delivery to
/// this consumer is at least once too (an ack lost in a restart redelivers the message), so a
/// result is counted once per `message_id`, as a real consumer would.
async fn collect(urls: Vec<String>, queue: String, into: Arc<Mutex<Vec<ResultMessage>>>) {
    // Every broker call has a deadline: a call that never answers (a connection half-dead
    // across a broker restart) must not stall the collector silently.
    const STEP: Duration = Duration::from_secs(5);
    async fn step<T, E>(f: impl std::future::Future<Output = Result<T, E>>) -> Option<T> {
        tokio::time::timeout(STEP, f).await.ok()?.ok()
    }
    let mut seen = std::collections::HashSet::new();
    let nodes = command_poller::broker::Endpoints::new(&urls).unwrap();
    loop {
        let Some((conn, _)) =
            step(command_poller::broker::connect(&nodes, "fault-collector")).await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let attached = async {
            let ch = step(conn.create_channel()).await?;
            let watch = step(conn.create_channel()).await?;
            let c = step(ch.basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ))
            .await?;
            Some((c, watch))
        }
        .await;
        let Some((mut c, watch)) = attached else {
            let _ = tokio::time::timeout(STEP, conn.close(200, "retrying".into())).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut quiet_since = Instant::now();
        loop {
            // Don't rely on the stream ending when the broker goes away: check the connection,
            // and that a quiet consumer is still attached (a consumer can stop receiving
            // without its stream ending or the connection noticing: results then sit in the
            // queue with no consumer).
            let next = tokio::time::timeout(Duration::from_millis(500), c.next()).await;
            let d = match next {
                Ok(Some(Ok(d))) => d,
                Ok(_) => break,
                Err(_) if !conn.status().connected() => break,
                Err(_) if quiet_since.elapsed() < Duration::from_secs(2) => continue,
                Err(_) => {
                    quiet_since = Instant::now();
                    let check = watch.queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    );
                    match step(check).await {
                        Some(q) if q.message_count() > 0 && q.consumer_count() == 0 => {
                            eprintln!(
                                "collector: {} results wait with no consumer: re-attaching",
                                q.message_count()
                            );
                            break;
                        }
                        Some(_) => continue,
                        None => {
                            eprintln!("collector: the broker did not answer a check: reconnecting");
                            break;
                        }
                    }
                }
            };
            quiet_since = Instant::now();
            let id = d
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.to_string())
                .expect("the poller gives every result a message_id");
            if seen.insert(id) {
                if let Ok(r) = serde_json::from_slice::<ResultMessage>(&d.data) {
                    into.lock().unwrap().push(r);
                }
            }
            if step(d.acker.ack(BasicAckOptions::default()))
                .await
                .is_none()
            {
                break;
            }
        }
        let _ = tokio::time::timeout(STEP, conn.close(200, "reconnecting".into())).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl World {
    async fn new(name: &'static str) -> World {
        Self::with_latency(name, 30).await
    }

    /// A world whose bridge takes `latency_ms` per execution.
    async fn with_latency(name: &'static str, latency_ms: u64) -> World {
        Self::on(name, latency_ms, vec![broker_url()]).await
    }

    /// A world on the broker nodes `urls`, whose bridge takes `latency_ms` per execution.
    pub(crate) async fn on(name: &'static str, latency_ms: u64, urls: Vec<String>) -> World {
        let sfx = suffix();
        // The shipped delivery limit and claim timings: crashes must not dead-letter commands.
        let mut settings = test_settings(&sfx);
        settings.amqp.urls = urls.clone();
        let cleanup = Cleanup(settings.clone());
        // Declare the topology first (the results queue must exist before results flow).
        let conn = connect_any(&urls).await;
        let ch = conn.create_channel().await.unwrap();
        command_poller::broker::declare(&ch, &settings.topology)
            .await
            .unwrap();
        command_poller::broker::declare_audit(
            &conn,
            &settings.audit,
            &settings.topology.replication,
        )
        .await
        .unwrap();
        let _ = conn.close(200, "ok".into()).await;
        let secret = format!("fault-secret-{sfx}-with-enough-bytes");
        let sim_port = free_port();
        let sim = crate::common::isolated(BIN)
            .args([
                "bridge-simulator",
                "--listen",
                &format!("127.0.0.1:{sim_port}"),
                "--latency-ms",
                &latency_ms.to_string(),
            ])
            .env("BRIDGE_SECRET", &secret)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let proxy_port = free_port();
        let proxy_up = Arc::new(AtomicBool::new(true));
        tokio::spawn(proxy(proxy_port, sim_port, proxy_up.clone()));
        let results = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(collect(
            urls.clone(),
            settings.topology.results_queue.clone(),
            results.clone(),
        ));
        let config_dir = fault_config(|t| t);
        let w = World {
            name,
            urls,
            sfx,
            settings,
            secret,
            sim_port,
            proxy_port,
            proxy_up,
            sim,
            pollers: Vec::new(),
            results,
            extra_env: Vec::new(),
            config_dir,
            logs: Vec::new(),
            _cleanup: cleanup,
        };
        w.wait_http(sim_port, "/_sim/calls").await;
        w
    }

    fn env(&self, replica: &str) -> Vec<(String, String)> {
        let s = &self.settings;
        let mut v = crate::common::poller_env(s);
        v.extend(
            [
                (
                    "POLLER__AMQP__CONNECTION_NAME",
                    format!("fault-{}", self.sfx),
                ),
                ("POLLER__AMQP__RECONNECT_MAX_MS", "1000".into()),
                ("POLLER__INSTANCE_ID", format!("{}-{replica}", self.name)),
                ("POLLER__BRIDGE__MODE", "apps_script".into()),
                (
                    "POLLER__BRIDGE__URL",
                    format!("http://127.0.0.1:{}/exec", self.proxy_port),
                ),
                ("POLLER__BRIDGE__RETRY_BUDGET_SECS", "60".into()),
                ("POLLER__BRIDGE__REQUEST_TIMEOUT_SECS", "5".into()),
                ("POLLER__HEALTH__LISTEN", "127.0.0.1:0".into()),
                ("POLLER__PROCESSING__MAX_IN_FLIGHT", "32".into()),
                ("BRIDGE_SECRET", self.secret.clone()),
                ("POLLER_CONFIG_DIR", self.config_dir.display().to_string()),
                ("POLLER__AMQP__URLS", self.urls.join(",")),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
        );
        v.extend(self.extra_env.iter().cloned());
        v
    }

    pub(crate) fn spawn_poller(&mut self, replica: &str) -> usize {
        let path =
            std::env::temp_dir().join(format!("fault-{}-{}-{replica}.log", self.name, self.sfx));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        self.logs.push(path);
        let child = crate::common::isolated(BIN)
            .arg("run")
            .envs(self.env(replica))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.pollers.push(child);
        self.pollers.len() - 1
    }

    pub(crate) fn kill9(&mut self, i: usize) {
        let pid = self.pollers[i].id().to_string();
        assert!(Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .unwrap()
            .success());
        let _ = self.pollers[i].wait();
    }

    async fn wait_http(&self, port: u16, path: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_get(port, path).await.is_none() {
            assert!(Instant::now() < deadline, "nothing answers on {port}{path}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `queue` exists and has a consumer (passive declares on fresh channels: a
    /// declare of a missing queue closes its channel).
    pub(crate) async fn wait_consumer(&self, queue: &str) {
        let conn = connect_any(&self.urls).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ch = conn.create_channel().await.unwrap();
            let declared = ch
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await;
            if let Ok(q) = declared {
                let _ = ch.close(200, "ok".into()).await;
                if q.consumer_count() > 0 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no consumer on {queue} within 60 s (see the poller's log: {:?})",
                self.logs
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = conn.close(200, "ok".into()).await;
    }

    /// Publishes `bodies` as an agent would ([`publish_all`]).
    pub(crate) async fn publish(&self, bodies: &[Vec<u8>]) {
        publish_all(
            &self.urls,
            &self.settings.topology.commands_exchange,
            bodies,
        )
        .await
    }

    pub(crate) fn distinct_results(&self) -> usize {
        let r = self.results.lock().unwrap();
        let mut ids: Vec<&str> = r.iter().filter_map(|r| r.action_id.as_deref()).collect();
        ids.sort();
        ids.dedup();
        ids.len()
    }

    pub(crate) async fn wait_results(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.distinct_results() < n {
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every one of `ids` has a result.
    pub(crate) async fn wait_ids(&self, ids: &[String], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let have: std::collections::HashSet<String> = self
                .results
                .lock()
                .unwrap()
                .iter()
                .filter_map(|r| r.action_id.as_ref().map(ToString::to_string))
                .collect();
            if ids.iter().all(|id| have.contains(id)) || Instant::now() > deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) async fn sim_calls(&self) -> command_poller::bridge::simulator::CallLog {
        let body = http_get(self.sim_port, "/_sim/calls")
            .await
            .expect("simulator answers");
        serde_json::from_str(&body).unwrap()
    }

    pub(crate) async fn sim_faults(&self, json: serde_json::Value) {
        http_post(self.sim_port, "/_sim/faults", &json.to_string()).await;
    }

    /// Checks and prints: every id has a result, at most one non-replay result each, at most
    /// one bridge execution each.
    pub(crate) async fn report(&self, ids: &[String]) -> Row {
        let results = self.results.lock().unwrap().clone();
        let calls = self.sim_calls().await;
        let mut non_replay: HashMap<&str, usize> = HashMap::new();
        let mut any: HashMap<&str, usize> = HashMap::new();
        let mut replays = 0;
        let sent: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
        for r in &results {
            let Some(id) = r.action_id.as_deref().filter(|id| sent.contains(id)) else {
                continue;
            };
            *any.entry(id).or_default() += 1;
            if r.replay {
                replays += 1;
            } else {
                *non_replay.entry(id).or_default() += 1;
            }
        }
        let lost: Vec<&String> = ids
            .iter()
            .filter(|id| !any.contains_key(id.as_str()))
            .collect();
        let duplicate_results = non_replay.values().filter(|n| **n > 1).count();
        // POSTs of an action an earlier attempt had sent (a killed replica's), as the poller
        // marked them; the simulator's dedup answered them without acting again.
        let reposts = results
            .iter()
            .filter(|r| !r.replay && r.bridge.as_ref().is_some_and(|b| b.repost))
            .count();
        let duplicate_executions = calls.executions.values().filter(|n| **n > 1).count();
        let row = Row {
            scenario: self.name,
            sent: ids.len(),
            with_result: ids.len() - lost.len(),
            replays,
            duplicate_results,
            duplicate_executions,
            lost: lost.len(),
            reposts,
        };
        // How often a poller found its commands consumer stalled and re-attached.
        let in_logs = |what: &str| -> usize {
            self.logs
                .iter()
                .filter_map(|p| std::fs::read_to_string(p).ok())
                .map(|l| l.matches(what).count())
                .sum()
        };
        let stalls = in_logs("the commands consumer stalled");
        // Results and alerts the broker nacked and the poller published again (a cluster
        // electing a leader), instead of requeueing their commands.
        let nacks = in_logs("publish nacked by the broker; trying again");
        println!(
            "RELIABILITY | {} | sent {} | results {} | replays {} | duplicate results {} | duplicates executed {} | lost {} | re-POSTs {} | stall re-attachments {} | nacked publishes retried {}",
            row.scenario, row.sent, row.with_result, row.replays, row.duplicate_results, row.duplicate_executions, row.lost, row.reposts, stalls, nacks
        );
        if row.lost + row.duplicate_results + row.duplicate_executions > 0 {
            self.print_log_warnings();
        }
        if !lost.is_empty() {
            self.explain_lost(&lost).await;
        }
        assert!(
            lost.is_empty(),
            "{}: lost {:?}",
            self.name,
            &lost[..lost.len().min(10)]
        );
        assert_eq!(
            duplicate_executions, 0,
            "{}: an action executed twice",
            self.name
        );
        assert_eq!(
            duplicate_results, 0,
            "{}: an action got two non-replay results",
            self.name
        );
        row
    }
}

impl World {
    /// Replicas share the Redis store (an embedded file can't be shared), under this world's
    /// key prefix; returns the prefix.
    pub(crate) fn share_redis(&mut self) -> String {
        let prefix = format!("fault-{}", self.sfx);
        self.extra_env.extend([
            ("POLLER__IDEMPOTENCY__BACKEND".into(), "redis".into()),
            (
                "POLLER__IDEMPOTENCY__URL".into(),
                crate::common::REDIS.into(),
            ),
            ("POLLER__IDEMPOTENCY__KEY_PREFIX".into(), prefix.clone()),
            // A shared store needs the same sealing key on every replica.
            (
                "POLLER_STORE_KEY".into(),
                format!("fault-store-key-{}-with-enough-bytes", self.sfx),
            ),
        ]);
        prefix
    }

    /// Where each lost command is: dead-lettered (and why, after how many deliveries), still
    /// in the commands queue, or nowhere; and the pollers' log lines that name it. CI keeps no
    /// temp files, so a failed run must say it all.
    async fn explain_lost(&self, lost: &[&String]) {
        let t = &self.settings.topology;
        let conn = connect_any(&self.urls).await;
        let ch = conn.create_channel().await.unwrap();
        if let Ok((messages, consumers)) = depth(&ch, &t.commands_queue).await {
            eprintln!("lost: the commands queue holds {messages} messages, {consumers} consumers");
        }
        // Read the dead-letter queue without acking (the world's cleanup deletes it).
        let mut dead: HashMap<String, String> = HashMap::new();
        while let Ok(Some(m)) = ch
            .basic_get(
                t.dead_letter_queue.as_str().into(),
                BasicGetOptions::default(),
            )
            .await
        {
            let body: serde_json::Value =
                serde_json::from_slice(&m.delivery.data).unwrap_or_default();
            let id = body["action_id"].as_str().unwrap_or_default().to_owned();
            let headers = m
                .delivery
                .properties
                .headers()
                .as_ref()
                .map(|h| format!("{:?}", h.inner().keys().collect::<Vec<_>>()))
                .unwrap_or_default();
            let reason = m
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-first-death-reason").cloned())
                .map(|v| format!("{v:?}"))
                .unwrap_or_else(|| format!("no x-first-death-reason; headers {headers}"));
            dead.insert(id, reason);
        }
        let logs: Vec<(String, String)> = self
            .logs
            .iter()
            .map(|p| {
                (
                    p.display().to_string(),
                    std::fs::read_to_string(p).unwrap_or_default(),
                )
            })
            .collect();
        for id in lost {
            match dead.get(id.as_str()) {
                Some(why) => eprintln!("lost {id}: in the dead-letter queue ({why})"),
                None => eprintln!("lost {id}: not in the dead-letter queue"),
            }
            let needle = format!("\"{id}\"");
            for (path, text) in &logs {
                for l in text
                    .lines()
                    .filter(|l| l.contains(&needle) || l.contains(id.as_str()))
                    .take(12)
                {
                    eprintln!("  {path}: {}", &l[..l.len().min(400)]);
                }
            }
        }
        let _ = conn.close(200, "ok".into()).await;
    }

    /// What the pollers warned about, for a failed run (CI keeps no temp files).
    fn print_log_warnings(&self) {
        let mut seen = std::collections::HashSet::new();
        for path in &self.logs {
            if !seen.insert(path) {
                continue;
            }
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            eprintln!(
                "--- {} ({} warnings and errors, the last 40):",
                path.display(),
                lines.len()
            );
            for l in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{l}");
            }
        }
    }
}

pub(crate) struct Row {
    scenario: &'static str,
    sent: usize,
    with_result: usize,
    replays: usize,
    duplicate_results: usize,
    duplicate_executions: usize,
    lost: usize,
    reposts: usize,
}

/// Publishes `bodies` as an agent would: persistent, mandatory, confirmed. What the broker
/// nacks or leaves unconfirmed (a cluster losing the queue's leader mid-publish) is
/// published again, as an agent must: the poller answers a repeat from its store.
pub(crate) async fn publish_all(urls: &[String], exchange: &str, bodies: &[Vec<u8>]) {
    publish_all_as(urls, exchange, bodies, "guest").await
}

/// [`publish_all`] as the broker user `user` (the one in `urls`): the broker checks the
/// `user_id` each command carries against it.
pub(crate) async fn publish_all_as(
    urls: &[String],
    exchange: &str,
    bodies: &[Vec<u8>],
    user: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut pending: Vec<&Vec<u8>> = bodies.iter().collect();
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} commands still unconfirmed after 90 s",
            pending.len()
        );
        pending = publish_round(urls, exchange, &pending, user).await;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// One round: returns what was not confirmed.
async fn publish_round<'b>(
    urls: &[String],
    exchange: &str,
    bodies: &[&'b Vec<u8>],
    user: &str,
) -> Vec<&'b Vec<u8>> {
    let conn = connect_any(urls).await;
    let mut failed = Vec::new();
    let Ok(ch) = conn.create_channel().await else {
        return bodies.to_vec();
    };
    if ch.confirm_select(Default::default()).await.is_err() {
        return bodies.to_vec();
    }
    let mut confirms = Vec::new();
    for b in bodies {
        let sent = ch
            .basic_publish(
                exchange.into(),
                command_poller::agent::routing_key_for(b).as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                b,
                BasicProperties::default()
                    .with_user_id(user.into())
                    .with_delivery_mode(2),
            )
            .await;
        match sent {
            Ok(c) => confirms.push((*b, c)),
            Err(_) => failed.push(*b),
        }
    }
    // One deadline for the round: a confirm held by a cut-off leader may never come.
    let round = tokio::time::Instant::now() + Duration::from_secs(20);
    let (mut nacked, mut unanswered) = (0, 0);
    for (b, c) in confirms {
        match tokio::time::timeout_at(round, c).await {
            Ok(Ok(confirmation)) if confirmation.is_ack() => assert!(
                confirmation.take_message().is_none(),
                "a command was returned unroutable: no queue is bound to the commands exchange"
            ),
            Ok(_) => {
                nacked += 1;
                failed.push(b)
            }
            Err(_) => {
                unanswered += 1;
                failed.push(b)
            }
        }
    }
    if !failed.is_empty() {
        eprintln!(
            "publisher: {} of {} to publish again ({nacked} nacked, {unanswered} unconfirmed in 20 s)",
            failed.len(),
            bodies.len()
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, "ok".into())).await;
    failed
}

async fn http(port: u16, req: String) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.contains(" 2").then(|| body.to_owned())
}

async fn http_get(port: u16, path: &str) -> Option<String> {
    http(port, format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")).await
}

async fn http_post(port: u16, path: &str, body: &str) {
    http(port, format!("POST {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())).await;
}

/// `queue`'s ready messages and consumers (a passive declare: a missing queue closes `ch`).
pub(crate) async fn depth(ch: &lapin::Channel, queue: &str) -> Result<(u32, u32), lapin::Error> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map(|q| (q.message_count(), q.consumer_count()))
}

/// Connects to the first of `urls` that answers (within 60 s: a cluster may be electing).
pub(crate) async fn connect_any(urls: &[String]) -> Connection {
    let nodes = command_poller::broker::Endpoints::new(urls).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match command_poller::broker::connect(&nodes, "fault-test").await {
            Ok((conn, _)) => return conn,
            Err(e) => assert!(Instant::now() < deadline, "no broker node answers: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) fn load(prefix: &str, n: usize) -> (Vec<String>, Vec<Vec<u8>>) {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let bodies = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let (t, svc, sev) = match i % 10 {
                0 => ("REFRESH_TOKEN", "google", "MEDIUM"),
                1 => ("CONNECT_INTEGRATION", "salesforce", "HIGH"),
                _ => ("CHECK_INTEGRATION_STATUS", "mailchimp", "LOW"),
            };
            cmd(id, t, svc, sev).to_string().into_bytes()
        })
        .collect();
    (ids, bodies)
}

#[tokio::test]
#[ignore = "fault suite: run by scripts/test.sh, one at a time"]
async fn poller_killed_with_sigkill_mid_load_and_restarted() {
    let mut w = World::new("sigkill").await;
    let (ids, bodies) = load("kill", 400);
    w.publish(&bodies).await;
    let mut p = w.spawn_poller("a");
    for round in 1..=3 {
        w.wait_results(round * 80, Duration::from_secs(60)).await;
        w.kill9(p);
        p = w.spawn_poller("a");
    }
    w.wait_ids(&ids, Duration::from_secs(120)).await;
    w.report(&ids).await;
}

/// Restores the broker even if the test fails midway.
struct BrokerGuard;
impl Drop for BrokerGuard {
    fn drop(&mut self) {
        let _ = rabbitmqctl().arg("start_app").output();
    }
}

#[tokio::test]
#[ignore = "fault suite: run by scripts/test.sh, one at a time"]
async fn broker_restarted_mid_load() {
    let mut w = World::new("broker-restart").await;
    let (ids, bodies) = load("brk", 300);
    w.publish(&bodies).await;
    w.spawn_poller("a");
    w.wait_results(60, Duration::from_secs(60)).await;
    let _guard = BrokerGuard;
    restart_broker();
    w.wait_ids(&ids, Duration::from_secs(180)).await;
    w.report(&ids).await;
}

/// Stops the broker's application for 2 s and starts it again (the BrokerGuard restores it on a
/// panic).
fn restart_broker() {
    assert!(rabbitmqctl()
        .arg("stop_app")
        .output()
        .unwrap()
        .status
        .success());
    std::thread::sleep(Duration::from_secs(2));
    assert!(rabbitmqctl()
        .arg("start_app")
        .output()
        .unwrap()
        .status
        .success());
}

#[tokio::test]
#[ignore = "fault suite: run by scripts/test.sh, one at a time"]
async fn broker_restarted_five_times_mid_load() {
    // Could the poller's consumers stall silently the way the test collector's did (stream
    // neither ending nor erroring, connection "connected", messages waiting with no consumer)?
    // Five restarts, each once results flow again: every command must still end with a result.
    let mut w = World::new("broker-restart-x5").await;
    // Slower, so five restarts land in the middle of the load.
    w.extra_env.extend([
        ("POLLER__PROCESSING__MAX_IN_FLIGHT".into(), "8".into()),
        ("POLLER__BRIDGE__MAX_CONCURRENCY".into(), "4".into()),
    ]);
    let (ids, bodies) = load("brk5", 1000);
    w.publish(&bodies).await;
    w.spawn_poller("a");
    let _guard = BrokerGuard;
    let mut seen = 0;
    for round in 1..=5 {
        w.wait_results(seen + 30, Duration::from_secs(90)).await;
        seen = w.distinct_results();
        assert!(
            seen < ids.len(),
            "round {round}: the load finished before the restart"
        );
        restart_broker();
    }
    w.wait_ids(&ids, Duration::from_secs(180)).await;
    w.report(&ids).await;
}

#[tokio::test]
#[ignore = "fault suite: run by scripts/test.sh, one at a time"]
async fn bridge_down_refused_then_500s_then_html_then_back() {
    let mut w = World::new("bridge-down").await;
    let (ids, bodies) = load("brg", 300);
    w.spawn_poller("a");
    w.publish(&bodies[..50]).await;
    w.wait_results(30, Duration::from_secs(60)).await;
    // Connection refused for 3 s while commands keep coming.
    w.proxy_up.store(false, Ordering::SeqCst);
    w.publish(&bodies[50..150]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Back up, but answering 500s, then Apps Script HTML error pages.
    w.sim_faults(serde_json::json!({"post": (0..40).map(|_| serde_json::json!({"kind": "status", "code": 500})).collect::<Vec<_>>()})).await;
    w.proxy_up.store(true, Ordering::SeqCst);
    w.sim_faults(serde_json::json!({"post": (0..20).map(|_| serde_json::json!({"kind": "html", "message": "Service invoked too many times in a short time: exec. Try Utilities.sleep(1000) between calls."})).collect::<Vec<_>>()})).await;
    w.publish(&bodies[150..]).await;
    w.wait_ids(&ids, Duration::from_secs(180)).await;
    w.report(&ids).await;
}

#[tokio::test]
#[ignore = "fault suite: run by scripts/test.sh, one at a time"]
async fn a_judge_hanging_then_failing_then_back() {
    use axum::routing::post;
    // An LLM judge that hangs, then errors, then approves.
    let phase = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post({
            let phase = phase.clone();
            move || {
                let phase = phase.clone();
                async move {
                    match phase.load(Ordering::SeqCst) {
                        0 => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            (axum::http::StatusCode::OK, String::new())
                        }
                        1 => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "down".to_string()),
                        _ => (
                            axum::http::StatusCode::OK,
                            serde_json::json!({"choices":[{"message":{"content":"{\"decision\":\"approve\",\"reason\":\"ok\"}"}}]}).to_string(),
                        ),
                    }
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let llm = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let judge = format!(
        "[[panel.judges]]\nname = \"business\"\nkind = \"llm\"\ntimeout_ms = 1500\nbase_url = \"http://{llm}/v1\"\nmodel = \"m\"\nprompt_file = \"config/prompts/business.md\"\n\n"
    );
    let dir = fault_config(move |text| {
        let cut = text.find("[[panel.judges]]\nname = \"business\"").unwrap();
        let end = cut + text[cut..].find("[bridge]").unwrap();
        // Quorum 3: the LLM judge's answer always matters.
        format!("{}{}{}", &text[..cut], judge, &text[end..]).replace("quorum = 2", "quorum = 3")
    });
    let mut w = World::new("judge-hang").await;
    std::fs::remove_dir_all(&w.config_dir).unwrap();
    w.config_dir = dir;
    w.spawn_poller("a");
    let ids: Vec<String> = (0..200).map(|i| format!("jdg-{i}")).collect();
    // HIGH severity sends these status checks to the judges.
    let bodies: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| {
            cmd(id, "CHECK_INTEGRATION_STATUS", "mailchimp", "HIGH")
                .to_string()
                .into_bytes()
        })
        .collect();
    w.publish(&bodies[..70]).await;
    w.wait_results(20, Duration::from_secs(60)).await;
    phase.store(1, Ordering::SeqCst);
    w.publish(&bodies[70..140]).await;
    w.wait_results(90, Duration::from_secs(60)).await;
    phase.store(2, Ordering::SeqCst);
    w.publish(&bodies[140..]).await;
    w.wait_ids(&ids, Duration::from_secs(120)).await;
    let row = w.report(&ids).await;
    // Fail closed: nothing the hanging or failing judge touched was executed.
    let results = w.results.lock().unwrap().clone();
    let executed = w.sim_calls().await.executions.len();
    let success = results
        .iter()
        .filter(|r| r.status == command_poller::outcome::Status::Success)
        .count();
    assert_eq!(
        executed, success,
        "only approved commands reached the bridge"
    );
    assert!(
        results
            .iter()
            .any(|r| r.status == command_poller::outcome::Status::NeedsApproval),
        "the hanging judge blocked approvals"
    );
    assert!(success > 0, "approvals came back with the judge");
    let _ = row;
}

#[tokio::test]
#[ignore = "fault suite: run by scripts/test.sh, one at a time"]
async fn two_replicas_consuming_one_killed() {
    let mut w = World::new("two-replicas").await;
    w.share_redis();
    let (ids, bodies) = load("two", 400);
    w.publish(&bodies).await;
    let a = w.spawn_poller("a");
    w.spawn_poller("b");
    w.wait_results(120, Duration::from_secs(60)).await;
    w.kill9(a);
    w.wait_ids(&ids, Duration::from_secs(180)).await;
    w.report(&ids).await;
}

/// The holders of live bridge slots in the Redis store under `prefix`.
async fn slot_holders(redis: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<String> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    redis::cmd("ZRANGEBYSCORE")
        .arg(format!("{prefix}:bridge:slots"))
        .arg(format!("({now_ms}"))
        .arg("+inf")
        .query_async(redis)
        .await
        .unwrap()
}

#[tokio::test]
#[ignore = "fault suite: run by scripts/test.sh, one at a time"]
async fn a_replica_killed_holding_bridge_slots_gives_them_back_within_the_lease() {
    // A slow bridge, so slots are held for a while; a fleet limit of 4 over two replicas.
    let mut w = World::with_latency("slot-lease", 300).await;
    let prefix = w.share_redis();
    const LEASE_SECS: u64 = 3;
    w.extra_env.extend([
        ("POLLER__BRIDGE__MAX_CONCURRENCY".into(), "4".into()),
        (
            "POLLER__BRIDGE__SLOT_LEASE_SECS".into(),
            LEASE_SECS.to_string(),
        ),
    ]);
    let mut redis = redis::Client::open(crate::common::REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (ids, bodies) = load("lease", 150);
    w.publish(&bodies).await;
    let a = w.spawn_poller("a");
    w.spawn_poller("b");
    w.wait_results(20, Duration::from_secs(60)).await;
    // Kill A while it holds slots (its holders are named after its instance).
    let a_name = format!("{}-a/", w.name);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let held = slot_holders(&mut redis, &prefix).await;
        assert!(held.len() <= 4, "over the fleet limit: {held:?}");
        if held.iter().any(|h| h.starts_with(&a_name)) {
            break;
        }
        assert!(Instant::now() < deadline, "replica a never held a slot");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    w.kill9(a);
    let killed = Instant::now();
    // A's slots come back within the lease: no live slot is A's any more.
    let back = loop {
        let held = slot_holders(&mut redis, &prefix).await;
        assert!(held.len() <= 4, "over the fleet limit: {held:?}");
        if !held.iter().any(|h| h.starts_with(&a_name)) {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(LEASE_SECS + 10),
            "the dead replica's slots did not come back: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // And B takes all four. Not always at once: A's unacked commands come back to the head of
    // the queue and fill B's window, each waiting for A's claim to expire (claim_ttl_secs 15)
    // before B may run it; when B's own commands run out first, B has nothing to send until
    // then (a run measured 12.2 s where every slot had been free since the lease).
    let full = loop {
        let held = slot_holders(&mut redis, &prefix).await;
        assert!(held.len() <= 4, "over the fleet limit: {held:?}");
        if held.len() == 4 && !held.iter().any(|h| h.starts_with(&a_name)) {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15 + LEASE_SECS + 10),
            "the other replica never used all four slots: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "RELIABILITY | slot-lease | the killed replica's bridge slots free after {} ms (lease {LEASE_SECS} s); all four held by the other replica after {} ms",
        back.as_millis(),
        full.as_millis()
    );
    assert!(
        back <= Duration::from_secs(LEASE_SECS) + Duration::from_millis(1500),
        "slots back after {back:?}, lease {LEASE_SECS} s"
    );
    w.wait_ids(&ids, Duration::from_secs(180)).await;
    let row = w.report(&ids).await;
    let calls = w.sim_calls().await;
    assert!(
        calls.max_concurrent <= 4,
        "the bridge saw {} calls at once over the fleet limit of 4",
        calls.max_concurrent
    );
    let _ = row;
}

#[tokio::test]
#[ignore = "fault suite: run by scripts/test.sh, one at a time"]
async fn a_poison_message_ends_in_the_dead_letter_queue_and_the_rest_flows() {
    // CONNECT commands alert a team with no queue: their outcome can never be published, every
    // time. They must end in the dead-letter queue after the delivery limit, the rest flowing.
    let dir = std::env::temp_dir().join(format!("fault-poison-{}", suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = std::fs::read_to_string("config/policy.toml")
        .unwrap()
        .replace(
            "teams = [\"security\", \"engineering\"]",
            "teams = [\"nobody-listens\"]",
        );
    std::fs::write(dir.join("policy.toml"), policy).unwrap();
    let mut w = World::new("poison").await;
    w.extra_env.push((
        "POLLER__POLICY__FILE".into(),
        dir.join("policy.toml").display().to_string(),
    ));
    w.extra_env
        .push(("POLLER__TOPOLOGY__DELIVERY_LIMIT".into(), "3".into()));
    w.extra_env.push((
        "POLLER__PROCESSING__PUBLISH_FAILURE_PAUSE_MS".into(),
        "100".into(),
    ));
    // The queue already exists with delivery limit 10: use fresh names for this world's queue.
    let sfx2 = suffix();
    let q = format!("t.{sfx2}.poison-commands");
    w.extra_env
        .push(("POLLER__TOPOLOGY__COMMANDS_QUEUE".into(), q.clone()));
    w.spawn_poller("a");
    // Send only once the poller consumes its own queue: before that the exchange routes only to
    // World::new's queue, which nobody reads.
    w.wait_consumer(&q).await;
    let poison = cmd("poison-1", "CONNECT_INTEGRATION", "salesforce", "HIGH")
        .to_string()
        .into_bytes();
    let (_, mut bodies) = load("flow", 200);
    bodies.retain(|b| !String::from_utf8_lossy(b).contains("CONNECT_INTEGRATION"));
    let keep: Vec<String> = bodies
        .iter()
        .map(|b| {
            serde_json::from_slice::<serde_json::Value>(b).unwrap()["action_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    w.publish(std::slice::from_ref(&poison)).await;
    w.publish(&bodies).await;
    w.wait_ids(&keep, Duration::from_secs(120)).await;
    // The rest flowed (this fails with the poller's warnings if it did not).
    w.report(&keep).await;
    // The poison message is in the dead-letter queue with the reason.
    let conn = connect_any(&w.urls).await;
    let ch = conn.create_channel().await.unwrap();
    // Past the broker's own retry: at-least-once dead-lettering forwards a dead letter again
    // when its confirm hasn't come within dead_letter_worker_publisher_confirm_timeout (2 min).
    // A CI run once saw no dead letter within 60 s (cause not established).
    let deadline = Instant::now() + Duration::from_secs(150);
    let dead = loop {
        if let Some(m) = ch
            .basic_get(
                w.settings.topology.dead_letter_queue.as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            break m;
        }
        if Instant::now() > deadline {
            w.print_log_warnings();
            panic!(
                "the poison message never reached the dead-letter queue; the commands queue (messages, consumers): {:?}",
                depth(&ch, &q).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(dead.delivery.data, poison);
    let reason = dead.delivery.properties.headers().as_ref().and_then(|h| {
        h.inner()
            .iter()
            .find(|(k, _)| k.as_str() == "x-first-death-reason")
            .map(|(_, v)| match v {
                lapin::types::AMQPValue::LongString(s) => s.to_string(),
                other => format!("{other:?}"),
            })
    });
    assert_eq!(reason.as_deref(), Some("delivery_limit"));
    println!("RELIABILITY | poison | poison message dead-lettered with x-first-death-reason = delivery_limit");
    let _ = conn.close(200, "ok".into()).await;
    let _ = std::fs::remove_dir_all(dir);
    // Clean up the extra queue.
    let conn = connect_any(&w.urls).await;
    let ch = conn.create_channel().await.unwrap();
    let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
}

#[tokio::test]
#[ignore = "fault suite: run by scripts/test.sh, one at a time"]
async fn a_flood_of_junk_leaves_the_poller_running_and_responsive() {
    let mut w = World::new("junk-flood").await;
    w.spawn_poller("a");
    let (ids, good) = load("good", 200);
    let mut bodies = Vec::new();
    for (i, g) in good.into_iter().enumerate() {
        bodies.push(g);
        for j in 0..5 {
            bodies.push(match (i + j) % 4 {
                0 => vec![0xff; 70 * 1024],
                1 => b"not json at all".to_vec(),
                2 => format!("{}1{}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
                _ => br#"{"action_id":"x","command_type":"REFRESH_TOKEN","command_type":"CONNECT_INTEGRATION"}"#.to_vec(),
            });
        }
    }
    w.publish(&bodies).await;
    w.wait_ids(&ids, Duration::from_secs(180)).await;
    w.report(&ids).await;
    println!(
        "RELIABILITY | junk-flood | {} junk messages interleaved",
        bodies.len() - ids.len()
    );
}
