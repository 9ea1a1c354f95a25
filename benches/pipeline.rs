//! Benchmarks against the real broker on 127.0.0.1:5672, side by side with the raw broker
//! ceiling in the same run. `cargo bench -p poller-bench` (docs/PERFORMANCE.md).
//!
//! The poller as a process is the shipped release binary ([`poller_binary`]); in process, the
//! library with its test doubles.
//! Each figure is the median of REPEATS runs; ratios are taken within one run.

#[path = "../tests/api/common/mod.rs"]
mod common;
#[path = "pipeline/cpu.rs"]
mod cpu;

use command_poller::bridge::signing::Secret;
use command_poller::bridge::simulator::{self, SimulatorConfig, SimulatorHandle};
use command_poller::compose::build_panel;
use command_poller::control::operator::{new_request_id, Operator};
use command_poller::control::ControlCommand;
use command_poller::judging::{Judge, JudgeError, JudgeRequest, Panel, Verdict};
use command_poller::outcome::ResultMessage;
use command_poller::policy::Policy;
use command_poller::worker::Poller;
use common::{bridge_client, cmd, suffix, test_settings, Cleanup, AMQP};
use futures::future::BoxFuture;
use futures::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const REPEATS: usize = 3;
const PREFETCH: u16 = 64;

/// The binary the benchmark runs as a process: `BENCH_CPU_BIN` (another build, to compare), or
/// the workspace's release build of `command-poller` (without test doubles, as the image ships
/// it: `cargo build --release --bin command-poller`, which scripts/test.sh runs first). A
/// release binary older than any source it is built from is refused: the figures would be
/// another code's. (Building it from here instead made cargo rebuild every dependency: the
/// environment cargo gives a bench is not the shell's.)
fn poller_binary() -> &'static str {
    static BINARY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BINARY.get_or_init(|| {
        if let Ok(bin) = std::env::var("BENCH_CPU_BIN") {
            return bin;
        }
        let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
        let bin = std::path::Path::new(&target).join("release/command-poller");
        let built = std::fs::metadata(&bin)
            .and_then(|m| m.modified())
            .unwrap_or_else(|_| {
                panic!(
                "no release binary at {}: run `cargo build --release --bin command-poller` first",
                bin.display()
            )
            });
        let newest = newest_source(std::path::Path::new("."));
        assert!(
            built >= newest,
            "{} is older than the sources: run `cargo build --release --bin command-poller` first",
            bin.display()
        );
        bin.display().to_string()
    })
}

/// The newest modification time among the binary's sources: `Cargo.toml`, `Cargo.lock` and the
/// `.rs` files and manifests under `src/` and `crates/`.
fn newest_source(root: &std::path::Path) -> std::time::SystemTime {
    fn walk(dir: &std::path::Path, newest: &mut std::time::SystemTime) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, newest);
            } else if p.extension().is_some_and(|x| x == "rs" || x == "toml") {
                if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                    *newest = (*newest).max(t);
                }
            }
        }
    }
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    for f in ["Cargo.toml", "Cargo.lock"] {
        if let Ok(t) = std::fs::metadata(root.join(f)).and_then(|m| m.modified()) {
            newest = newest.max(t);
        }
    }
    for d in ["src", "crates"] {
        walk(&root.join(d), &mut newest);
    }
    newest
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

type Arrival = (Instant, Option<ResultMessage>);

/// Arrival times at an output queue (with the result, when parsed).
#[derive(Clone, Default)]
struct Arrivals(Arc<Mutex<Vec<Arrival>>>);

impl Arrivals {
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    async fn wait(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.len() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} arrived",
                self.len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    /// Messages per second between the first and the last arrival.
    fn rate(&self) -> f64 {
        let v = self.0.lock().unwrap();
        let (first, last) = (v.first().unwrap().0, v.last().unwrap().0);
        (v.len() - 1) as f64 / (last - first).as_secs_f64()
    }
}

async fn collect(queue: String, parse: bool) -> Arrivals {
    let a = Arrivals::default();
    let conn = Connection::connect(AMQP, Default::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
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
        .unwrap();
    let out = a.clone();
    tokio::spawn(async move {
        let _conn = conn;
        while let Some(Ok(d)) = c.next().await {
            let r = if parse {
                serde_json::from_slice::<ResultMessage>(&d.data).ok()
            } else {
                None
            };
            out.0.lock().unwrap().push((Instant::now(), r));
        }
    });
    a
}

async fn preload(exchange: &str, bodies: &[Vec<u8>]) {
    let conn = Connection::connect(AMQP, Default::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    for chunk in bodies.chunks(500) {
        let mut confirms = Vec::new();
        for b in chunk {
            confirms.push(
                ch.basic_publish(
                    exchange.into(),
                    command_poller::agent::routing_key_for(b).as_str().into(),
                    BasicPublishOptions::default(),
                    b,
                    BasicProperties::default()
                        .with_user_id("guest".into())
                        .with_delivery_mode(2)
                        .with_content_type("application/json".into()),
                )
                .await
                .unwrap(),
            );
        }
        for c in confirms {
            c.await.unwrap();
        }
    }
    let _ = conn.close(200, "ok".into()).await;
}

fn checks(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            cmd(
                &format!("{prefix}-{i}"),
                "CHECK_INTEGRATION_STATUS",
                "mailchimp",
                "LOW",
            )
            .to_string()
            .into_bytes()
        })
        .collect()
}

/// A world: suffixed names declared, a simulator, and pollers on demand.
struct World {
    settings: command_poller::settings::Settings,
    sim: Arc<SimulatorHandle>,
    secret: Secret,
    secret_text: String,
    stop: CancellationToken,
    states: Vec<Arc<command_poller::worker::PollerState>>,
    store_dir: std::path::PathBuf,
    _cleanup: Cleanup,
}

impl World {
    async fn new(
        tweak: impl FnOnce(&mut command_poller::settings::Settings),
        latency: Duration,
    ) -> World {
        let sfx = suffix();
        let mut settings = test_settings(&sfx);
        settings.processing.max_in_flight = PREFETCH;
        // The benchmark measures the pipeline, not the trip (one broker user sends everything).
        settings.control.trips.clear();
        settings.panel.judges.retain(|j| j.name() != "compliance");
        settings.panel.quorum = 2;
        tweak(&mut settings);
        let cleanup = Cleanup(settings.clone());
        let conn = Connection::connect(AMQP, Default::default()).await.unwrap();
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
        let secret_text = format!("bench-{sfx}-with-enough-bytes");
        let secret = Secret::new(secret_text.clone());
        let mut cfg = SimulatorConfig::new(secret.clone());
        cfg.latency = latency;
        let sim = Arc::new(
            simulator::start(cfg, ([127, 0, 0, 1], 0).into())
                .await
                .unwrap(),
        );
        let store_dir = std::env::temp_dir().join(format!("bench-{sfx}"));
        World {
            settings,
            sim,
            secret,
            secret_text,
            stop: CancellationToken::new(),
            states: Vec::new(),
            store_dir,
            _cleanup: cleanup,
        }
    }

    async fn start_poller(&mut self, name: &str, panel: Option<Panel>) {
        self.start_poller_with(name, panel, None, None).await
    }

    async fn start_poller_with(
        &mut self,
        name: &str,
        panel: Option<Panel>,
        store: Option<command_poller::store::Stores>,
        bridge: Option<Arc<dyn command_poller::bridge::Bridge>>,
    ) {
        let mut s = self.settings.clone();
        s.instance_id = format!("bench-{name}");
        s.idempotency.path = self.store_dir.join(format!("{name}.redb"));
        let policy = Arc::new(Policy::load(&s.policy.file).unwrap());
        let stores = match store {
            Some(st) => st,
            None => command_poller::store::open_all(&s.idempotency)
                .await
                .unwrap(),
        };
        let panel = panel.unwrap_or_else(|| {
            build_panel(&s.panel, &s.secrets.judge_api_keys, stores.windows.clone()).unwrap()
        });
        let poller = Poller::new(
            s,
            policy,
            panel,
            bridge.unwrap_or_else(|| bridge_client(&self.settings, &self.sim, self.secret.clone())),
            stores,
            None,
        );
        let state = poller.state();
        let stop = self.stop.clone();
        tokio::spawn(async move { poller.run(stop).await });
        let deadline = Instant::now() + Duration::from_secs(20);
        while !state.connected.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.states.push(state);
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_dir_all(&self.store_dir);
    }
}

/// Benchmark 1: The ceiling: a raw lapin relay, consume → publish persistent confirmed (mandatory) → ack
/// after the confirm, at the same prefetch, publishing result-sized messages.
async fn ceiling(n: usize, publishes: usize) -> f64 {
    let sfx = suffix();
    let (input, out) = (format!("bench.{sfx}.in"), format!("bench.{sfx}.out"));
    let conn = Connection::connect(AMQP, Default::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(b"quorum".to_vec())),
    );
    for q in [&input, &out, &format!("{out}.extra")] {
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            quorum.clone(),
        )
        .await
        .unwrap();
    }
    let pub_ch = conn.create_channel().await.unwrap();
    pub_ch.confirm_select(Default::default()).await.unwrap();
    for b in checks("relay", n) {
        pub_ch
            .basic_publish(
                "".into(),
                input.as_str().into(),
                Default::default(),
                &b,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
    }
    pub_ch.wait_for_confirms().await.unwrap();
    let arrivals = collect(out.clone(), false).await;
    let relay_conn = Connection::connect(AMQP, Default::default()).await.unwrap();
    let relay_pub = Connection::connect(AMQP, Default::default()).await.unwrap();
    let cch = relay_conn.create_channel().await.unwrap();
    cch.basic_qos(PREFETCH, Default::default()).await.unwrap();
    let pch = relay_pub.create_channel().await.unwrap();
    pch.confirm_select(Default::default()).await.unwrap();
    let mut consumer = cch
        .basic_consume(
            input.as_str().into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let body = vec![b'x'; 700];
    let relay = tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let (pch, body, out) = (pch.clone(), body.clone(), out.clone());
            tokio::spawn(cpu::relay_one(d, pch, body, out, publishes));
        }
    });
    arrivals.wait(n, Duration::from_secs(120)).await;
    relay.abort();
    for q in [
        &input,
        &format!("bench.{sfx}.out"),
        &format!("bench.{sfx}.out.extra"),
    ] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    arrivals.rate()
}

/// Benchmark 2: The poller on preloaded CHECK commands, bridge at zero latency. With
/// `in_memory`, the idempotency store is a map (to measure the embedded store's share).
async fn overhead(n: usize, in_memory: bool, stub_bridge: bool) -> f64 {
    let mut w = World::new(|_| {}, Duration::ZERO).await;
    preload(
        &w.settings.topology.commands_exchange.clone(),
        &checks("ovh", n),
    )
    .await;
    let arrivals = collect(w.settings.topology.results_queue.clone(), false).await;
    let store = in_memory.then(|| {
        command_poller::store::Stores::local(Arc::new(command_poller::testing::MemStore::default()))
    });
    let bridge = stub_bridge.then(|| {
        Arc::new(command_poller::testing::RecordingBridge::default())
            as Arc<dyn command_poller::bridge::Bridge>
    });
    w.start_poller_with("a", None, store, bridge).await;
    arrivals.wait(n, Duration::from_secs(180)).await;
    arrivals.rate()
}

/// Benchmark 2b: the `command-poller` binary as users run it (the shipped configuration with
/// `APP_ENVIRONMENT=local`, its own embedded simulator replaced by the benchmark's at 0 ms, logs
/// to a file at the shipped filter) draining the same preloaded CHECK commands. `filter`
/// overrides the log filter (a diagnostic: what the logging costs).
/// The release binary's environment in `w` (its embedded store `<store>.redb`, any free health
/// port, the shipped log filter; with `simulator`, the benchmark's simulator as its bridge,
/// otherwise its own embedded one at 0 ms), and the file its log goes to.
fn binary_env(w: &World, store: &str, simulator: bool) -> (Vec<(String, String)>, std::fs::File) {
    std::fs::create_dir_all(&w.store_dir).unwrap();
    let log = std::fs::File::create(w.store_dir.join("poller.log")).unwrap();
    let mut env: Vec<(String, String)> = common::poller_env(&w.settings);
    env.extend([
        (
            "POLLER__IDEMPOTENCY__PATH".into(),
            w.store_dir
                .join(format!("{store}.redb"))
                .display()
                .to_string(),
        ),
        ("POLLER__HEALTH__LISTEN".into(), "127.0.0.1:0".into()),
        ("BRIDGE_SECRET".into(), w.secret_text.clone()),
    ]);
    if simulator {
        env.push(("POLLER__BRIDGE__MODE".into(), "apps_script".into()));
        env.push(("POLLER__BRIDGE__URL".into(), w.sim.url().to_string()));
    }
    // The shipped log filter (a caller may set another).
    env.retain(|(k, _)| k != "POLLER__LOGGING__FILTER" && k != "RUST_LOG");
    (env, log)
}

async fn binary_overhead(n: usize, filter: Option<&str>, embedded_simulator: bool) -> f64 {
    let w = World::new(|_| {}, Duration::ZERO).await;
    preload(
        &w.settings.topology.commands_exchange.clone(),
        &checks("bin", n),
    )
    .await;
    let arrivals = collect(w.settings.topology.results_queue.clone(), false).await;
    let (mut env, log) = binary_env(&w, "bin", !embedded_simulator);
    if let Some(f) = filter {
        env.push(("POLLER__LOGGING__FILTER".into(), f.into()));
    }
    let mut child = common::isolated(poller_binary())
        .arg("run")
        .env_remove("RUST_LOG")
        .envs(env)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    arrivals.wait(n, Duration::from_secs(180)).await;
    let _ = child.kill();
    let _ = child.wait();
    arrivals.rate()
}

/// CPU time (user + system) the process `pid` has used so far, from /proc.
fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name (which may hold spaces), from its closing parenthesis.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(100);
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// Benchmark 3: A slow bridge: 200 ms, concurrency limit 25. Returns (commands/s, simulator peak).
async fn slow_bridge(n: usize) -> (f64, usize) {
    let mut w = World::new(
        |s| s.bridge.max_concurrency = 25,
        Duration::from_millis(200),
    )
    .await;
    preload(
        &w.settings.topology.commands_exchange.clone(),
        &checks("slow", n),
    )
    .await;
    let arrivals = collect(w.settings.topology.results_queue.clone(), false).await;
    w.start_poller("a", None).await;
    arrivals.wait(n, Duration::from_secs(120)).await;
    (arrivals.rate(), w.sim.calls().max_concurrent)
}

struct Timed(&'static str, Duration);
impl Judge for Timed {
    fn name(&self) -> &str {
        self.0
    }
    fn evaluate<'a>(&'a self, _r: &'a JudgeRequest) -> BoxFuture<'a, Result<Verdict, JudgeError>> {
        Box::pin(async move {
            tokio::time::sleep(self.1).await;
            Ok(Verdict::Approve {
                reason: "ok".into(),
            })
        })
    }
}

/// Benchmark 4: REFRESH_TOKEN with judges at 50 ms, 50 ms and 2 s: p50 of the panel's decision time
/// (command published → result received, minus the bridge time).
async fn judges(n: usize) -> f64 {
    let mut w = World::new(|_| {}, Duration::ZERO).await;
    let panel = Panel::new(
        vec![
            (
                Arc::new(Timed("a", Duration::from_millis(50))) as Arc<dyn Judge>,
                Duration::from_secs(5),
            ),
            (
                Arc::new(Timed("b", Duration::from_millis(50))) as Arc<dyn Judge>,
                Duration::from_secs(5),
            ),
            (
                Arc::new(Timed("c", Duration::from_secs(2))) as Arc<dyn Judge>,
                Duration::from_secs(5),
            ),
        ],
        2,
    );
    let arrivals = collect(w.settings.topology.results_queue.clone(), true).await;
    w.start_poller("a", Some(panel)).await;
    let mut sent = HashMap::new();
    let exchange = w.settings.topology.commands_exchange.clone();
    for i in 0..n {
        let id = format!("jdg-{i}");
        let b = cmd(&id, "REFRESH_TOKEN", "google", "MEDIUM")
            .to_string()
            .into_bytes();
        sent.insert(id, Instant::now());
        preload(&exchange, &[b]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    arrivals.wait(n, Duration::from_secs(60)).await;
    let v = arrivals.0.lock().unwrap();
    median(
        v.iter()
            .filter_map(|(at, r)| {
                let r = r.as_ref()?;
                let bridge = r.bridge.as_ref().map(|b| b.ms).unwrap_or(0) as f64;
                Some((*at - sent[r.action_id.as_deref()?]).as_secs_f64() * 1000.0 - bridge)
            })
            .collect(),
    )
}

/// Benchmark 5: Latency at half the measured capacity: p50 and p99 of (result received − command
/// published) minus the simulated bridge time (10 ms here).
async fn latency(capacity: f64, seconds: f64) -> (f64, f64) {
    let mut w = World::new(|_| {}, Duration::from_millis(10)).await;
    let arrivals = collect(w.settings.topology.results_queue.clone(), true).await;
    w.start_poller("a", None).await;
    let rate = capacity / 2.0;
    let n = (rate * seconds) as usize;
    let conn = Connection::connect(AMQP, Default::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut sent = HashMap::new();
    let t0 = Instant::now();
    for i in 0..n {
        let due = t0 + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let id = format!("lat-{i}");
        let b = cmd(&id, "CHECK_INTEGRATION_STATUS", "mailchimp", "LOW")
            .to_string()
            .into_bytes();
        sent.insert(id, Instant::now());
        ch.basic_publish(
            w.settings.topology.commands_exchange.as_str().into(),
            "command.check_integration_status".into(),
            Default::default(),
            &b,
            BasicProperties::default()
                .with_user_id("guest".into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap();
    }
    arrivals.wait(n, Duration::from_secs(60)).await;
    let v = arrivals.0.lock().unwrap();
    let lat: Vec<f64> = v
        .iter()
        .filter_map(|(at, r)| {
            let r = r.as_ref()?;
            Some((*at - sent[r.action_id.as_deref()?]).as_secs_f64() * 1000.0 - 10.0)
        })
        .collect();
    (percentile(lat.clone(), 0.5), percentile(lat, 0.99))
}

/// Benchmark 6: Peak RSS of the real binary with max_in_flight 256 under load.
async fn memory(n: usize, in_flight: u16) -> f64 {
    let w = World::new(
        |s| s.processing.max_in_flight = in_flight,
        Duration::from_millis(5),
    )
    .await;
    preload(
        &w.settings.topology.commands_exchange.clone(),
        &checks("mem", n),
    )
    .await;
    let arrivals = collect(w.settings.topology.results_queue.clone(), false).await;
    std::fs::create_dir_all(&w.store_dir).unwrap();
    let mut child = common::isolated(poller_binary())
        .arg("run")
        .envs(common::poller_env(&w.settings))
        .envs([
            ("POLLER__PROCESSING__MAX_IN_FLIGHT", in_flight.to_string()),
            // 256 in flight over 25 bridge slots: shorter bridge deadlines keep the longest a
            // live command can take within idempotency.wait_for_in_flight_ms, which
            // check-config (and so `run`) requires.
            ("POLLER__BRIDGE__REQUEST_TIMEOUT_SECS", "10".to_string()),
            ("POLLER__BRIDGE__RETRY_BUDGET_SECS", "10".to_string()),
            (
                "POLLER__IDEMPOTENCY__PATH",
                w.store_dir.join("mem.redb").display().to_string(),
            ),
            ("POLLER__BRIDGE__MODE", "apps_script".into()),
            ("POLLER__BRIDGE__URL", w.sim.url().to_string()),
            ("POLLER__HEALTH__LISTEN", "127.0.0.1:0".into()),
            ("POLLER__LOGGING__FILTER", "warn".into()),
            ("BRIDGE_SECRET", w.secret_text.clone()),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(w.store_dir.join("mem-poller.log")).unwrap())
        .spawn()
        .unwrap();
    arrivals.wait(n, Duration::from_secs(180)).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    kb / 1024.0
}

/// Benchmark 7: Pause with two replicas under load: ms from sending `pause` to the last bridge call
/// starting (the simulator's last POST).
async fn pause() -> f64 {
    let mut w = World::new(|_| {}, Duration::from_millis(50)).await;
    preload(
        &w.settings.topology.commands_exchange.clone(),
        &checks("pause", 3000),
    )
    .await;
    w.start_poller("a", None).await;
    w.start_poller("b", None).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent_ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as u64 / 1_000_000;
    let op = Operator::new(&w.settings, &common::node(AMQP), Duration::from_millis(500));
    let report = op
        .run(ControlCommand::Pause {
            reason: "bench".into(),
            request_id: new_request_id(),
        })
        .await
        .unwrap();
    assert_eq!(report.replicas.len(), 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last = w.sim.calls().last_post_at_ms;
    last.saturating_sub(sent_ms) as f64
}

/// Benchmark 8: Scale under one fleet limit: `replicas` replicas share the Redis store's bridge
/// limit of 25 (each with its own connection, as separate processes would), bridge 200 ms, 32
/// commands in flight per replica. `judged`: REFRESH_TOKEN through three judges answering in
/// 300 ms (an LLM panel's pace), so one replica is bound by judging, not by the bridge; else
/// CHECK_INTEGRATION_STATUS straight to the bridge. Returns (commands/s, the simulator's peak of
/// calls at once).
async fn scale(n: usize, replicas: usize, judged: bool) -> (f64, usize) {
    let prefix = format!("bench-scale-{}", suffix());
    let mut w = World::new(
        |s| {
            s.bridge.max_concurrency = 25;
            s.processing.max_in_flight = 32;
            s.idempotency.backend = command_poller::store::Backend::Redis;
            s.idempotency.url = common::REDIS.into();
            s.idempotency.key_prefix = prefix;
            s.secrets.store_key = Some(Secret::new(String::from(
                "bench-store-key-with-enough-bytes",
            )));
        },
        Duration::from_millis(200),
    )
    .await;
    let bodies: Vec<Vec<u8>> = if judged {
        (0..n)
            .map(|i| {
                cmd(&format!("scale-{i}"), "REFRESH_TOKEN", "google", "MEDIUM")
                    .to_string()
                    .into_bytes()
            })
            .collect()
    } else {
        checks("scale", n)
    };
    preload(&w.settings.topology.commands_exchange.clone(), &bodies).await;
    let arrivals = collect(w.settings.topology.results_queue.clone(), false).await;
    for r in 0..replicas {
        let stores = command_poller::store::open_all(&w.settings.idempotency)
            .await
            .unwrap();
        let panel = judged.then(|| {
            let judge = |name: &'static str| {
                (
                    Arc::new(Timed(name, Duration::from_millis(300))) as Arc<dyn Judge>,
                    Duration::from_secs(5),
                )
            };
            Panel::new(vec![judge("a"), judge("b"), judge("c")], 2)
        });
        w.start_poller_with(&format!("r{r}"), panel, Some(stores), None)
            .await;
    }
    arrivals.wait(n, Duration::from_secs(180)).await;
    (arrivals.rate(), w.sim.calls().max_concurrent)
}

/// Benchmark 9: one agent floods, another keeps its pace. Agent A's `flood` commands are queued
/// first; agent B (a broker user of its own) then sends one command a second for `seconds`, to
/// two replicas sharing a Redis store. Returns B's p50 and p99 latency (ms, publish to result)
/// and how long A's flood took to drain (s). With `limit`, intake admits A at most
/// `LIMIT_COUNT` commands a second and rejects the rest (`rate_limited`).
async fn flood(flood: usize, seconds: usize, limit: bool) -> (f64, f64, f64) {
    const LIMIT_COUNT: usize = 50;
    let prefix = format!("bench-flood-{}", suffix());
    let mut w = World::new(
        |s| {
            s.idempotency.backend = command_poller::store::Backend::Redis;
            s.idempotency.url = common::REDIS.into();
            s.idempotency.key_prefix = prefix;
            s.secrets.store_key = Some(Secret::new(String::from(
                "bench-store-key-with-enough-bytes",
            )));
            s.intake.per_agent_limit = limit.then_some(command_poller::settings::AdmissionLimit {
                count: LIMIT_COUNT,
                window: Duration::from_secs(1),
            });
        },
        Duration::from_millis(10),
    )
    .await;
    let b_user = common::BrokerUser::create();
    preload(
        &w.settings.topology.commands_exchange.clone(),
        &checks("flood-a", flood),
    )
    .await;
    let arrivals = collect(w.settings.topology.results_queue.clone(), true).await;
    let t0 = Instant::now();
    for r in 0..2 {
        let stores = command_poller::store::open_all(&w.settings.idempotency)
            .await
            .unwrap();
        w.start_poller_with(&format!("f{r}"), None, Some(stores), None)
            .await;
    }
    let conn = Connection::connect(&b_user.url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut sent = HashMap::new();
    let start = Instant::now();
    for i in 0..seconds {
        tokio::time::sleep_until((start + Duration::from_secs(i as u64)).into()).await;
        let id = format!("flood-b-{i}");
        let b = cmd(&id, "CHECK_INTEGRATION_STATUS", "mailchimp", "LOW")
            .to_string()
            .into_bytes();
        sent.insert(id, Instant::now());
        ch.basic_publish(
            w.settings.topology.commands_exchange.as_str().into(),
            "command.check_integration_status".into(),
            Default::default(),
            &b,
            BasicProperties::default()
                .with_user_id(b_user.0.as_str().into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap();
    }
    arrivals
        .wait(flood + seconds, Duration::from_secs(300))
        .await;
    let v = arrivals.0.lock().unwrap().clone();
    let drained = v
        .iter()
        .filter(|(_, r)| {
            r.as_ref()
                .and_then(|r| r.action_id.as_deref())
                .is_some_and(|id| id.starts_with("flood-a-"))
        })
        .map(|(at, _)| *at)
        .max()
        .unwrap();
    let limited = v
        .iter()
        .filter(|(_, r)| {
            r.as_ref()
                .is_some_and(|r| r.error_field.as_deref() == Some("rate_limited"))
        })
        .count();
    let lat: Vec<f64> = v
        .iter()
        .filter_map(|(at, r)| {
            let id = r.as_ref()?.action_id.as_deref()?;
            let t = sent.get(id)?;
            assert_eq!(
                r.as_ref()?.status,
                command_poller::outcome::Status::Success,
                "{id}"
            );
            Some((*at - *t).as_secs_f64() * 1000.0)
        })
        .collect();
    assert_eq!(lat.len(), seconds, "every one of B's commands");
    println!(
        "    flood of {flood} ({}): A rejected rate_limited {limited}, drained in {:.1} s; B's {} latencies {:?} ms",
        if limit { "limit 50/s" } else { "no limit" },
        (drained - t0).as_secs_f64(),
        lat.len(),
        lat.iter().map(|l| l.round() as u64).collect::<Vec<_>>()
    );
    let _ = conn.close(200, "ok".into()).await;
    (
        percentile(lat.clone(), 0.5),
        percentile(lat, 0.99),
        (drained - t0).as_secs_f64(),
    )
}

fn wanted(name: &str) -> bool {
    std::env::var("BENCH_ONLY")
        .map(|v| v.split(',').any(|w| w == name))
        .unwrap_or(true)
}

#[tokio::main]
async fn main() {
    // The raw relay of the CPU figures runs as a process of its own: this one, started again.
    if let Ok(spec) = std::env::var(cpu::RELAY_ENV) {
        cpu::relay_process(&spec).await;
        return;
    }
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this without it, and the
    // benchmark is not a test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmark: run with `cargo bench -p poller-bench`");
        return;
    }
    // Cargo runs a bench in its package's directory: the paths here (config/, benches/) are the
    // workspace's.
    std::env::set_current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).unwrap();
    // Found (and checked to be current) before any measurement starts.
    println!("poller binary: {}", poller_binary());
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let mem_total = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned();
    println!(
        "machine: {} cores, {mem_total}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!("commands per throughput run: {n}; repeats: {REPEATS}; prefetch: {PREFETCH}");
    let mut rows: Vec<String> = Vec::new();
    // Without the overhead run, latency is measured at half of this.
    let mut capacity: f64 = std::env::var("BENCH_CAPACITY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(700.0);
    if wanted("overhead") {
        let mut ceil2 = vec![];
        let mut stub = vec![];
        let (mut bin, mut bin_ratio, mut bin_quiet, mut bin_embedded) =
            (vec![], vec![], vec![], vec![]);
        let (mut ceil, mut ovh, mut ratio, mut mem_ovh, mut mem_ratio) =
            (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..REPEATS {
            let c = ceiling(n, 1).await;
            let c2 = ceiling(n, 2).await;
            let o = overhead(n, false, false).await;
            let m = overhead(n, true, false).await;
            let b = overhead(n, true, true).await;
            let r = binary_overhead(n, None, false).await;
            let q = binary_overhead(n, Some("warn,lapin=off"), false).await;
            let e = binary_overhead(n, None, true).await;
            bin_embedded.push(e);
            stub.push(b);
            bin.push(r);
            bin_ratio.push(r / c);
            bin_quiet.push(q);
            println!("  run: ceiling {c:.0}/s (two publishes per message: {c2:.0}/s), poller {o:.0}/s (ratio {:.2}), release binary {r:.0}/s (ratio {:.2}; at log filter warn {q:.0}/s; with its own embedded simulator {e:.0}/s), poller with an in-memory store {m:.0}/s (ratio {:.2}), and no bridge HTTP {b:.0}/s", o / c, r / c, m / c);
            ceil2.push(c2);
            ceil.push(c);
            ovh.push(o);
            ratio.push(o / c);
            mem_ovh.push(m);
            mem_ratio.push(m / c);
        }
        capacity = median(ovh.clone());
        rows.push(format!(
            "| ceiling: raw lapin relay | {:.0} msg/s | |",
            median(ceil)
        ));
        rows.push(format!(
            "| poller, ALLOW, bridge 0 ms (embedded store) | {capacity:.0} cmd/s | |"
        ));
        rows.push(format!(
            "| overhead ratio (same run) | {:.2} | >= 0.5 |",
            median(ratio)
        ));
        rows.push(format!(
            "| release binary, shipped config, ALLOW, bridge 0 ms | {:.0} cmd/s, ratio {:.2} | |",
            median(bin),
            median(bin_ratio)
        ));
        rows.push(format!(
            "| release binary at log filter warn (diagnostic) | {:.0} cmd/s | |",
            median(bin_quiet)
        ));
        rows.push(format!(
            "| release binary with its own embedded simulator, the shipped default (diagnostic) | {:.0} cmd/s | |",
            median(bin_embedded)
        ));
        rows.push(format!(
            "| poller with the store in memory (diagnostic) | {:.0} cmd/s, ratio {:.2} | |",
            median(mem_ovh),
            median(mem_ratio)
        ));
        rows.push(format!(
            "| poller with the store in memory and no bridge HTTP (diagnostic) | {:.0} cmd/s | |",
            median(stub)
        ));
        rows.push(format!("| relay with two confirmed publishes per message (diagnostic: the poller's publish pattern) | {:.0} msg/s | |", median(ceil2)));
    }
    if wanted("slow") {
        let (mut slow, mut peak) = (vec![], 0);
        for _ in 0..REPEATS {
            let (r, p) = slow_bridge(1000).await;
            println!("  run: slow bridge {r:.1}/s, simulator peak {p}");
            slow.push(r);
            peak = peak.max(p);
        }
        let m = median(slow);
        rows.push(format!("| slow bridge (200 ms, limit 25) | {m:.1} cmd/s ({:.0}% of 125), simulator peak {peak} | >= 90%, peak <= 25 |", m / 125.0 * 100.0));
    }
    if wanted("judges") {
        let mut jud = vec![];
        for _ in 0..REPEATS {
            let j = judges(30).await;
            println!("  run: panel p50 {j:.1} ms");
            jud.push(j);
        }
        rows.push(format!(
            "| judges 50/50/2000 ms: panel p50 | {:.1} ms | < 100 ms |",
            median(jud)
        ));
    }
    if wanted("latency") {
        let (mut p50s, mut p99s) = (vec![], vec![]);
        for _ in 0..REPEATS {
            let (p50, p99) = latency(capacity, 5.0).await;
            println!(
                "  run: latency overhead p50 {p50:.2} ms, p99 {p99:.2} ms at {:.0}/s",
                capacity / 2.0
            );
            p50s.push(p50);
            p99s.push(p99);
        }
        rows.push(format!("| latency overhead at half capacity ({:.0}/s) | p50 {:.2} ms, p99 {:.2} ms | p50 <= 2 ms, p99 <= 15 ms |", capacity / 2.0, median(p50s), median(p99s)));
    }
    if wanted("memory") {
        for in_flight in [64, 256] {
            let mut mem = vec![];
            for _ in 0..REPEATS {
                let m = memory(n, in_flight).await;
                println!("  run: peak RSS {m:.1} MiB with max_in_flight {in_flight}");
                mem.push(m);
            }
            rows.push(format!(
                "| peak RSS, release binary, max_in_flight {in_flight} | {:.1} MiB | <= 64 MiB at 64 |",
                median(mem)
            ));
        }
    }
    if wanted("pause") {
        let mut pauses = vec![];
        for _ in 0..REPEATS {
            let p = pause().await;
            println!("  run: pause → last bridge call {p:.0} ms");
            pauses.push(p);
        }
        rows.push(format!(
            "| pause → last bridge call, 2 replicas | {:.0} ms | < 100 ms |",
            median(pauses)
        ));
    }
    if wanted("scale") {
        for (judged, n, what) in [
            (false, 1500, "CHECK, bridge-bound"),
            (true, 1000, "REFRESH_TOKEN, judges 300 ms"),
        ] {
            let mut rates: [Vec<f64>; 3] = Default::default();
            let mut peak = 0;
            for _ in 0..REPEATS {
                let mut run = vec![];
                for replicas in 1..=3 {
                    let (rate, p) = scale(n, replicas, judged).await;
                    rates[replicas - 1].push(rate);
                    peak = peak.max(p);
                    run.push(format!("{replicas}: {rate:.1}/s (peak {p})"));
                }
                println!("  run: scale, {what}: {}", run.join(", "));
            }
            let [one, two, three] = rates.map(median);
            rows.push(format!(
                "| scale, {what}, fleet bridge limit 25: 1 / 2 / 3 replicas | {one:.1} / {two:.1} / {three:.1} cmd/s, bridge peak {peak} (highest of all runs) | peak <= 25 |"
            ));
        }
    }
    if wanted("cpu") {
        // `BENCH_CPU_STORES=redis` (or `embedded`) runs one of the two.
        let only = std::env::var("BENCH_CPU_STORES").unwrap_or_default();
        for store in [cpu::Store::Embedded, cpu::Store::Redis]
            .into_iter()
            .filter(|s| only.is_empty() || only.contains(s.key()))
        {
            let (mut rates, mut per) = (vec![], vec![]);
            for _ in 0..REPEATS {
                let (rate, us) = cpu::binary(n, store).await;
                println!(
                    "  run: the release binary on the {} took {rate:.0} cmd/s and used {us:.0} µs of CPU per command",
                    store.name()
                );
                rates.push(rate);
                per.push(us);
            }
            rows.push(format!(
                "| CPU per command: the release binary, ALLOW, bridge 0 ms, {} (idle start-up not counted) | {:.0} µs ({:.0} cmd/s) | <= 250 µs on Redis |",
                store.name(),
                median(per),
                median(rates)
            ));
        }
        // `BENCH_CPU_KINDS=` (empty) skips these; `judged` or `refused` runs one.
        let kinds = std::env::var("BENCH_CPU_KINDS").unwrap_or_else(|_| "judged,refused".into());
        for (kind, key, target) in [
            (cpu::Kind::Judged, "judged", "<= 400 µs"),
            (cpu::Kind::Refused, "refused", "<= 100 µs"),
        ] {
            if !kinds.split(',').any(|k| k == key) {
                continue;
            }
            let (mut rates, mut per) = (vec![], vec![]);
            for _ in 0..REPEATS {
                let (rate, us) = cpu::binary_of(n, cpu::Store::Redis, kind).await;
                println!(
                    "  run: the release binary on the Redis, {}, took {rate:.0} cmd/s and used {us:.0} µs of CPU per command",
                    kind.name()
                );
                rates.push(rate);
                per.push(us);
            }
            rows.push(format!(
                "| CPU per command: the release binary, {}, bridge 0 ms, Redis | {:.0} µs ({:.0} cmd/s) | {target} |",
                kind.name(),
                median(per),
                median(rates)
            ));
        }
        let (mut rates, mut per) = (vec![], vec![]);
        for _ in 0..REPEATS {
            let (rate, us) = cpu::relay(n).await;
            println!(
                "  run: the raw relay took {rate:.0} msg/s and used {us:.1} µs of CPU per message"
            );
            rates.push(rate);
            per.push(us);
        }
        rows.push(format!(
            "| CPU per message: the raw relay (two confirmed publishes per message), a process of its own | {:.1} µs ({:.0} msg/s) | |",
            median(per),
            median(rates)
        ));
    }
    if wanted("flood") {
        let flood_n: usize = std::env::var("BENCH_FLOOD")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000);
        for limit in [false, true] {
            let (mut p50s, mut p99s, mut drains) = (vec![], vec![], vec![]);
            for _ in 0..REPEATS {
                let (p50, p99, drain) = flood(flood_n, 20, limit).await;
                println!(
                    "  run: flood {}: B p50 {p50:.0} ms, p99 {p99:.0} ms; A drained in {drain:.1} s",
                    if limit { "with the limit" } else { "without a limit" }
                );
                p50s.push(p50);
                p99s.push(p99);
                drains.push(drain);
            }
            rows.push(format!(
                "| agent A floods {flood_n}, agent B sends 1/s for 20 s, 2 replicas on Redis, {}: B's p50 / p99 | {:.0} / {:.0} ms (A drained in {:.1} s) | |",
                if limit { "per_agent_limit 50 per 1 s" } else { "no per-agent limit" },
                median(p50s),
                median(p99s),
                median(drains)
            ));
        }
    }
    let gate_failed = std::env::var("BENCH_ONLY").is_ok_and(|v| v.split(',').any(|w| w == "gate"))
        && !cpu::gate().await;
    println!();
    println!("| figure | median of {REPEATS} | target |");
    println!("| --- | --- | --- |");
    for r in rows {
        println!("{r}");
    }
    if gate_failed {
        std::process::exit(1);
    }
}
