//! CPU per command, as shipped, and the gate CI runs on it.
//!
//! The release binary drains preloaded CHECK_INTEGRATION_STATUS commands (ALLOW, the
//! benchmark's bridge simulator at 0 ms, the shipped log filter) with the embedded store or with
//! Redis (as production runs); its CPU time while it does is read from /proc. Beside it, in the
//! same run, a raw lapin relay (consume, two confirmed persistent publishes, ack: the poller's
//! result and audit record) runs as a process of its own (this benchmark started again with
//! [`RELAY_ENV`]), and its CPU per message is read the same way. The ratio of the two is the
//! figure the gate compares with `benches/cpu-baseline.toml`: rates vary with the machine's
//! load from run to run, CPU time per command much less.

use super::{binary_env, checks, collect, cpu_of, median, preload, World, PREFETCH};
use crate::common::{self, suffix, AMQP};
use futures::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection};
use std::time::{Duration, Instant};

/// Set in the relay process's environment: `<input queue>,<output queue>,<messages>`.
pub const RELAY_ENV: &str = "BENCH_RELAY";
/// The baseline the gate compares with.
const BASELINE: &str = "benches/cpu-baseline.toml";
/// How much worse than the baseline the ratio may be before the gate fails.
const TOLERANCE: f64 = 1.30;
/// Commands per gate run (about a second of the poller's CPU: /proc counts in 10 ms ticks).
const GATE_N: usize = 2000;
/// Messages per relay run of the gate: the relay needs about a tenth of the poller's CPU, so
/// five times the messages keep its tick count comparable.
const GATE_RELAY_N: usize = 10_000;
/// Runs of each in the gate (the median ratio is compared). The relay's CPU per message varies
/// by about a fifth from run to run with the broker's pace (docs/PERFORMANCE.md).
const GATE_REPEATS: usize = 5;
/// What the relay publishes per message: the result and the audit record, as the poller does
/// for every command.
const RELAY_PUBLISHES: usize = 2;

/// Where the release binary keeps its claims and results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Embedded,
    Redis,
}

impl Store {
    /// As `BENCH_CPU_STORES` and the profiles' file names spell it.
    pub fn key(self) -> &'static str {
        match self {
            Store::Embedded => "embedded",
            Store::Redis => "redis",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Store::Embedded => "embedded store",
            Store::Redis => "Redis",
        }
    }
}

/// What the commands of a CPU run are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// CHECK_INTEGRATION_STATUS: ALLOW, straight to the bridge.
    Allow,
    /// REFRESH_TOKEN at its MEDIUM floor: judged by the shipped rule panel (its compliance
    /// judge counts the agent's requests in the store), then, approved by the majority, to the
    /// bridge.
    Judged,
    /// CHECK_INTEGRATION_STATUS over the agent's admission limit (one an hour, spent by the
    /// warm-up command): REJECTED rate_limited at intake, never claimed, judged or executed.
    Refused,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Allow => "ALLOW",
            Kind::Judged => "judged by the rule panel",
            Kind::Refused => "refused at intake (rate_limited)",
        }
    }

    fn commands(self, prefix: &str, n: usize) -> Vec<Vec<u8>> {
        match self {
            Kind::Allow | Kind::Refused => checks(prefix, n),
            Kind::Judged => (0..n)
                .map(|i| {
                    common::cmd(
                        &format!("{prefix}-{i}"),
                        "REFRESH_TOKEN",
                        "google",
                        "MEDIUM",
                    )
                    .to_string()
                    .into_bytes()
                })
                .collect(),
        }
    }
}

/// One run of the release binary on `store`: commands per second, and CPU per command in µs
/// (what it used idle after start-up not counted).
pub async fn binary(n: usize, store: Store) -> (f64, f64) {
    binary_of(n, store, Kind::Allow).await
}

/// One run of the release binary on `store` with commands of `kind`.
pub async fn binary_of(n: usize, store: Store, kind: Kind) -> (f64, f64) {
    let w = World::new(|_| {}, Duration::ZERO).await;
    let (mut env, log) = binary_env(&w, "cpu", true);
    if kind == Kind::Refused {
        env.extend([
            ("POLLER__INTAKE__PER_AGENT_LIMIT__COUNT".into(), "1".into()),
            (
                "POLLER__INTAKE__PER_AGENT_LIMIT__WINDOW_SECS".into(),
                "3600".into(),
            ),
        ]);
    }
    if store == Store::Redis {
        env.extend([
            ("POLLER__IDEMPOTENCY__BACKEND".into(), "redis".into()),
            ("POLLER__IDEMPOTENCY__URL".into(), common::REDIS.into()),
            (
                "POLLER__IDEMPOTENCY__KEY_PREFIX".into(),
                format!("bench-{}", suffix()),
            ),
            (
                "POLLER_STORE_KEY".into(),
                "a-benchmark-store-key-of-enough-bytes".into(),
            ),
        ]);
    }
    // A diagnostic: `BENCH_POLLER_ENV="K=V,K2=V2"` adds to the binary's environment.
    if let Ok(extra) = std::env::var("BENCH_POLLER_ENV") {
        env.extend(extra.split(',').filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        }));
    }
    let mut cmd = common::isolated(super::poller_binary());
    let dir = std::env::var("BENCH_CPU_DIR").unwrap_or_else(|_| ".".into());
    match kind {
        Kind::Judged => {
            cmd.current_dir(judged_config(&dir, &w.store_dir));
        }
        Kind::Allow | Kind::Refused => {
            cmd.current_dir(dir);
        }
    }
    let mut child = cmd
        .arg("run")
        .env_remove("RUST_LOG")
        .envs(env)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = child.id();
    let arrivals = collect(w.settings.topology.results_queue.clone(), false).await;
    // Started and idle: what start-up cost is not counted.
    let warm = checks("cpu-warm", 1);
    preload(&w.settings.topology.commands_exchange.clone(), &warm).await;
    arrivals.wait(1, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let perf = profile(pid, store);
    let before = cpu_of(pid);
    preload(
        &w.settings.topology.commands_exchange.clone(),
        &kind.commands("cpu", n),
    )
    .await;
    arrivals.wait(n + 1, Duration::from_secs(300)).await;
    let used = cpu_of(pid) - before;
    if let Some(mut perf) = perf {
        // perf writes its file on SIGINT.
        let _ = std::process::Command::new("kill")
            .args(["-INT", &perf.id().to_string()])
            .status();
        let _ = perf.wait();
    }
    let _ = child.kill();
    let _ = child.wait();
    (arrivals.rate(), used.as_secs_f64() * 1e6 / n as f64)
}

/// A copy of `checkout`'s config/ under `into`, for the judged runs: the shipped rule panel with
/// its compliance judge's per-agent counts set high enough for one agent's thousands of
/// REFRESH_TOKEN (it still counts each in the store, as shipped), so they are approved and run
/// rather than parked, which would trip Emergency-INT-E01 and pause the poller. The directory
/// the binary runs in.
fn judged_config(checkout: &str, into: &std::path::Path) -> std::path::PathBuf {
    let root = into.join("judged");
    let config = root.join("config");
    std::fs::create_dir_all(&config).unwrap();
    for f in ["default.toml", "policy.toml", "local.toml"] {
        std::fs::copy(format!("{checkout}/config/{f}"), config.join(f)).unwrap();
    }
    let mut local = std::fs::read_to_string(config.join("local.toml")).unwrap();
    local.push_str(JUDGED_PANEL);
    std::fs::write(config.join("local.toml"), local).unwrap();
    root
}

/// The shipped panel (config/default.toml), the compliance judge's counts raised.
const JUDGED_PANEL: &str = r#"
[panel]
quorum = 2

[[panel.judges]]
name = "security"
kind = "rules"
timeout_ms = 5000
[panel.judges.rules]
require_verified_agent = true
allowed_services = ["mailchimp", "meta", "google"]
deny_understated_severity = true

[[panel.judges]]
name = "compliance"
kind = "rules"
timeout_ms = 5000
[panel.judges.rules]
max_per_agent = { count = 1000000, window_secs = 3600 }
max_burst = { count = 1000000, window_secs = 600 }
max_unapproved_recent = { count = 2, window_secs = 3600 }
denied_command_types = ["CONNECT_INTEGRATION"]

[[panel.judges]]
name = "business"
kind = "rules"
timeout_ms = 5000
[panel.judges.rules]
allowed_services = ["mailchimp", "meta", "google"]
"#;

/// With `BENCH_PERF=<prefix>`, `perf record` on the poller while it works, with call graphs,
/// into `<prefix>-<embedded|redis>.data` (docs/PERFORMANCE.md: the flame graphs).
fn profile(pid: u32, store: Store) -> Option<std::process::Child> {
    let prefix = std::env::var("BENCH_PERF").ok()?;
    let file = format!("{prefix}-{}.data", store.key());
    let child = std::process::Command::new("perf")
        .args([
            "record",
            "-F",
            "997",
            "--call-graph",
            "dwarf,16384",
            "-o",
            &file,
            "-p",
        ])
        .arg(pid.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("perf (Debian's linux-perf)");
    // perf attaches before the commands arrive.
    std::thread::sleep(Duration::from_millis(300));
    Some(child)
}

/// One run of the raw relay as a process of its own over `n` preloaded messages: messages per
/// second and CPU per message in µs.
pub async fn relay(n: usize) -> (f64, f64) {
    let sfx = suffix();
    let (input, out) = (format!("bench.{sfx}.in"), format!("bench.{sfx}.out"));
    let conn = Connection::connect(AMQP, Default::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(b"quorum".to_vec())),
    );
    let queues = [input.clone(), out.clone(), format!("{out}.extra")];
    for q in &queues {
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
    ch.confirm_select(Default::default()).await.unwrap();
    for b in checks("relay", n) {
        ch.basic_publish(
            "".into(),
            input.as_str().into(),
            Default::default(),
            &b,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    }
    ch.wait_for_confirms().await.unwrap();
    let arrivals = collect(out.clone(), false).await;
    let exe = std::env::current_exe().unwrap();
    let child = tokio::process::Command::new(exe)
        .env(RELAY_ENV, format!("{input},{out},{n}"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let output = child.wait_with_output().await.unwrap();
    assert!(output.status.success(), "the relay process failed");
    let cpu_us: f64 = String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("relay cpu_us="))
        .expect("the relay prints its CPU time")
        .trim()
        .parse()
        .unwrap();
    arrivals.wait(n, Duration::from_secs(60)).await;
    for q in &queues {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    let _ = conn.close(200, "ok".into()).await;
    (arrivals.rate(), cpu_us / n as f64)
}

/// The relay process: `spec` is [`RELAY_ENV`]'s value. Relays `n` messages, then prints the
/// CPU time it used from its subscription on (`relay cpu_us=...`).
pub async fn relay_process(spec: &str) {
    let parts: Vec<&str> = spec.split(',').collect();
    let (input, out, n): (String, String, usize) =
        (parts[0].into(), parts[1].into(), parts[2].parse().unwrap());
    let consume = Connection::connect(AMQP, Default::default()).await.unwrap();
    let publish = Connection::connect(AMQP, Default::default()).await.unwrap();
    let cch = consume.create_channel().await.unwrap();
    cch.basic_qos(PREFETCH, Default::default()).await.unwrap();
    let pch = publish.create_channel().await.unwrap();
    pch.confirm_select(Default::default()).await.unwrap();
    let before = cpu_of(std::process::id());
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
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut taken = 0;
    while taken < n {
        let Some(Ok(d)) = consumer.next().await else {
            panic!("the relay's consumer ended after {taken} of {n}");
        };
        taken += 1;
        let (pch, body, out, done) = (pch.clone(), body.clone(), out.clone(), done_tx.clone());
        tokio::spawn(async move {
            relay_one(d, pch, body, out, RELAY_PUBLISHES).await;
            let _ = done.send(());
        });
    }
    for _ in 0..n {
        done_rx.recv().await.unwrap();
    }
    let used = cpu_of(std::process::id()) - before;
    println!("relay cpu_us={}", used.as_micros());
}

/// The relay's work for one delivery: `publishes` persistent, mandatory, confirmed publishes of
/// `body` (the first to `out`, the others, as the poller's audit record, to `<out>.extra`), then
/// the ack.
pub async fn relay_one(
    d: lapin::message::Delivery,
    pch: lapin::Channel,
    body: Vec<u8>,
    out: String,
    publishes: usize,
) {
    for i in 0..publishes {
        let target = if i == 0 {
            out.clone()
        } else {
            format!("{out}.extra")
        };
        let c = pch
            .basic_publish(
                "".into(),
                target.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(c.is_ack());
    }
    d.acker.ack(Default::default()).await.unwrap();
}

/// The baseline ratio committed in [`BASELINE`].
fn baseline() -> f64 {
    let text = std::fs::read_to_string(BASELINE)
        .unwrap_or_else(|e| panic!("{BASELINE}: {e} (run from the repository's root)"));
    let table: toml::Table = text.parse().unwrap_or_else(|e| panic!("{BASELINE}: {e}"));
    table["ratio"]
        .as_float()
        .unwrap_or_else(|| panic!("{BASELINE}: `ratio` is not a number"))
}

/// The gate: the release binary on Redis against the relay, alternately, [`GATE_REPEATS`]
/// times; fails (returns false) when the median ratio of CPU per command to CPU per relayed
/// message is more than [`TOLERANCE`] times the committed baseline.
pub async fn gate() -> bool {
    let t0 = Instant::now();
    let (mut ratios, mut poller, mut relayed) = (vec![], vec![], vec![]);
    for _ in 0..GATE_REPEATS {
        let (relay_rate, relay_us) = relay(GATE_RELAY_N).await;
        let (rate, us) = binary(GATE_N, Store::Redis).await;
        println!(
            "  run: release binary on Redis {rate:.0} cmd/s, {us:.0} µs of CPU per command; relay {relay_rate:.0} msg/s, {relay_us:.1} µs per message; ratio {:.2}",
            us / relay_us
        );
        ratios.push(us / relay_us);
        poller.push(us);
        relayed.push(relay_us);
    }
    let (ratio, base) = (median(ratios), baseline());
    let limit = base * TOLERANCE;
    println!(
        "CPU gate: the release binary used {:.0} µs of CPU per command (median), the relay {:.1} µs per message: ratio {ratio:.2}; baseline {base:.2} ({BASELINE}), limit {limit:.2}; {:.0} s",
        median(poller),
        median(relayed),
        t0.elapsed().as_secs_f64()
    );
    if ratio > limit {
        println!(
            "CPU gate FAILED: {:.0}% above the baseline. A change that makes the poller slower says so by moving the baseline in a commit of its own.",
            (ratio / base - 1.0) * 100.0
        );
        false
    } else {
        println!("CPU gate passed");
        true
    }
}
