//! The chaos soak (`scripts/soak.sh --minutes N`): three replicas (real poller processes) on the
//! three-node cluster, sharing a Redis of their own; three agents (broker users) sending all
//! three command types at a steady rate with bursts; an LLM judge on the panel; an approver
//! approving, denying or leaving to expire what the judges would not approve; the audit sink
//! chaining every record; and, one after another at random, an operator pausing, halting or
//! quarantining an agent and lifting it again, reloading the policy, and faults: a replica
//! SIGKILLed and restarted, a broker node stopped and started, a node cut off and healed, the
//! Redis restarted, the bridge slow, failing with 500s or answering Apps Script's HTML error
//! page, the LLM judge slow, failing or answering HTML.
//!
//! At the end every command is checked ([`Verdicts`]): a final result (none lost, at most one
//! non-replay result besides its NEEDS_APPROVAL, at most one execution by the bridge's own call
//! log); none executed under a lever (from every replica's acknowledgement to the lift, less
//! [`IN_FLIGHT_GRACE`] for a POST already on its way); none executed without its approval (the
//! panel's, unanimous, or the approver's), none denied or left to expire executed, each ending
//! as its decision said; and the audit chain verifying and holding each command's final
//! result. It prints a table (`SOAK | ...` lines) and fails on any violation.
//! `SOAK_SEED` replays a run's choices; `SOAK_MINUTES` sets its length (default 3).
//!
//! Ignored in the parallel suite; `scripts/soak.sh` starts the cluster and runs it.

use crate::cluster::{cluster, pull, spawn, world, Cluster};
use crate::common::{free_port, spawn_sink, suffix};
use crate::faults::{publish_all_as, World};
use command_poller::approval::approver::Approver;
use command_poller::approval::wire::{ReplyOutcome, Request};
use command_poller::outcome::{ResultMessage, Status};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

const REPLICAS: [&str; 3] = ["a", "b", "c"];
/// A POST the poller sent just before a lever landed may reach the bridge just after every
/// replica acknowledged it; later than this, it ran under the lever.
const IN_FLIGHT_GRACE: Duration = Duration::from_secs(2);
/// Commands per agent per steady tick (every second), and per agent per burst (every 20 s).
const STEADY: usize = 5;
const BURST: usize = 50;
/// Agents: guest and two broker users of the soak's own.
const AGENTS: usize = 3;
/// A REFRESH_TOKEN whose justification carries this is denied by the LLM judge: only the
/// approver can let it through.
const ASK_A_HUMAN: &str = "ask-a-human";
/// How long a parked command waits for the approver (the policy's `approval_ttl_secs`).
const APPROVAL_TTL_SECS: u64 = 20;
/// The LLM judge's deadline on the panel; a slow judge takes longer.
const JUDGE_TIMEOUT_MS: u64 = 1500;
const PASSWORD: &str = "soak-pass";

/// A small deterministic generator (xorshift64*): a run is replayed from its seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn secs(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo * 1000 + self.below((hi - lo) * 1000 + 1))
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A Redis of the soak's own (restarting the shared one would disturb the other suites),
/// append-only with every write synced, so a restart loses nothing, as a production Redis
/// configured for the poller's claims must not.
struct Redis {
    port: u16,
    dir: std::path::PathBuf,
    child: Child,
}

impl Redis {
    fn start() -> Redis {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("soak-redis-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Self::spawn(port, &dir);
        Redis { port, dir, child }
    }

    fn spawn(port: u16, dir: &std::path::Path) -> Child {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server not up on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    fn restart(&mut self, down: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down);
        self.child = Self::spawn(self.port, &self.dir);
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `rabbitmqctl` on the first cluster node that answers.
fn ctl(args: &[&str]) -> bool {
    (1..=3).any(|n| {
        Command::new("rabbitmqctl")
            .args(["-q", "-n", &format!("rabbitc{n}@localhost")])
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Broker users of the soak's own on the cluster (agents and the approver), deleted on drop.
struct Users(Vec<String>);

impl Users {
    fn create(names: &[String]) -> Users {
        for n in names {
            assert!(ctl(&["add_user", n, PASSWORD]), "add_user {n}");
            assert!(
                ctl(&["set_permissions", "-p", "/", n, ".*", ".*", ".*"]),
                "set_permissions {n}"
            );
        }
        Users(names.to_vec())
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        for n in &self.0 {
            ctl(&["delete_user", n]);
        }
    }
}

/// The cluster's URLs with `user`'s credentials instead of guest's.
fn urls_as(urls: &[String], user: &str) -> Vec<String> {
    if user == "guest" {
        return urls.to_vec();
    }
    urls.iter()
        .map(|u| u.replace("guest:guest@", &format!("{user}:{PASSWORD}@")))
        .collect()
}

/// What a command is, from its id (`soak-<agent>-<n>`): the n-th command of an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// REFRESH_TOKEN, for the panel (unanimous).
    Judged,
    /// REFRESH_TOKEN the LLM judge denies: only the approver lets it through.
    AskAHuman,
    /// CONNECT_INTEGRATION: BLOCK, never executed.
    Blocked,
    /// CHECK_INTEGRATION_STATUS: ALLOW.
    Allowed,
}

fn kind_of(n: usize) -> Kind {
    match n % 10 {
        0 if n.is_multiple_of(40) => Kind::AskAHuman,
        0 => Kind::Judged,
        1 => Kind::Blocked,
        _ => Kind::Allowed,
    }
}

fn parse_id(id: &str) -> (usize, usize) {
    let mut parts = id.trim_start_matches("soak-").split('-');
    let agent = parts.next().unwrap().parse().unwrap();
    let n = parts.next().unwrap().parse().unwrap();
    (agent, n)
}

fn body(id: &str, n: usize) -> Vec<u8> {
    let mut c = match kind_of(n) {
        Kind::Judged | Kind::AskAHuman => {
            crate::common::cmd(id, "REFRESH_TOKEN", "google", "MEDIUM")
        }
        Kind::Blocked => crate::common::cmd(id, "CONNECT_INTEGRATION", "salesforce", "HIGH"),
        Kind::Allowed => crate::common::cmd(id, "CHECK_INTEGRATION_STATUS", "mailchimp", "LOW"),
    };
    if kind_of(n) == Kind::AskAHuman {
        c["justification"] = format!("{ASK_A_HUMAN}: the campaign owner signs this off").into();
    }
    c.to_string().into_bytes()
}

/// The load: every agent a steady tick and a burst every 20 s, each command with an id of its
/// own. Returns every id sent.
async fn load(
    agents: Vec<(String, Vec<String>)>,
    exchange: String,
    stop: Arc<AtomicBool>,
) -> Vec<String> {
    let mut sent = Vec::new();
    let mut next = vec![0usize; agents.len()];
    let mut tick = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let count = if tick % 20 == 19 { BURST } else { STEADY };
        for (a, (user, urls)) in agents.iter().enumerate() {
            let (ids, bodies): (Vec<String>, Vec<Vec<u8>>) = (next[a]..next[a] + count)
                .map(|n| {
                    let id = format!("soak-{a}-{n}");
                    let b = body(&id, n);
                    (id, b)
                })
                .unzip();
            next[a] += count;
            publish_all_as(urls, &exchange, &bodies, user).await;
            sent.extend(ids);
        }
        tick += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    sent
}

/// The LLM judge's behaviour: what the soak's judge events switch between.
const JUDGE_OK: u8 = 0;
const JUDGE_SLOW: u8 = 1;
const JUDGE_500: u8 = 2;
const JUDGE_HTML: u8 = 3;

/// An OpenAI-compatible chat endpoint: approves, except a command asking for a human (denied),
/// or slow, failing or answering an HTML page as `mode` says. Returns its base URL.
async fn llm_judge(mode: Arc<AtomicU8>) -> String {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let answer = |decision: &str| {
        serde_json::json!({"choices": [{"message": {"content":
            serde_json::json!({"decision": decision, "reason": "soak"}).to_string()}}]})
        .to_string()
    };
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |request: String| {
            let mode = mode.load(Ordering::SeqCst);
            async move {
                match mode {
                    JUDGE_SLOW => {
                        tokio::time::sleep(Duration::from_millis(JUDGE_TIMEOUT_MS * 3)).await;
                        answer("approve").into_response()
                    }
                    JUDGE_500 => (StatusCode::INTERNAL_SERVER_ERROR, "overloaded").into_response(),
                    JUDGE_HTML => (
                        [(header::CONTENT_TYPE, "text/html")],
                        "<!DOCTYPE html><html><body>Service unavailable</body></html>",
                    )
                        .into_response(),
                    _ if request.contains(ASK_A_HUMAN) => answer("deny").into_response(),
                    _ => answer("approve").into_response(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/v1")
}

/// The fleet's configuration: the fault suite's, with the business judge an LLM judge, the
/// approver among the approvers, and REFRESH_TOKEN needing every judge (a judge that can't
/// answer parks it) and parked for [`APPROVAL_TTL_SECS`].
fn configure(w: &mut World, judge_url: &str, approver: &str) {
    let judge = format!(
        "[[panel.judges]]\nname = \"business\"\nkind = \"llm\"\ntimeout_ms = {JUDGE_TIMEOUT_MS}\nbase_url = \"{judge_url}\"\nmodel = \"m\"\nprompt_file = \"config/prompts/business.md\"\n\n"
    );
    let dir = &w.config_dir;
    let path = dir.join("default.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let cut = text.find("[[panel.judges]]\nname = \"business\"").unwrap();
    let end = cut + text[cut..].find("[bridge]").unwrap();
    std::fs::write(&path, format!("{}{}{}", &text[..cut], judge, &text[end..])).unwrap();
    let local = dir.join("local.toml");
    let text = std::fs::read_to_string(&local).unwrap();
    let listed = "approvers = [\"approver\", \"guest\"]";
    assert!(text.contains(listed));
    std::fs::write(
        &local,
        text.replace(
            listed,
            &format!("approvers = [\"approver\", \"guest\", \"{approver}\"]"),
        ),
    )
    .unwrap();
    let policy = std::fs::read_to_string("config/policy.toml").unwrap();
    let rule = "[commands.REFRESH_TOKEN]\naction = \"JUDGE\"";
    assert!(policy.contains(rule) && policy.contains("decision_rule = \"majority\""));
    let policy = policy
        .replace(
            rule,
            &format!("[commands.REFRESH_TOKEN]\napproval_ttl_secs = {APPROVAL_TTL_SECS}\naction = \"JUDGE\""),
        )
        .replacen("decision_rule = \"majority\"", "decision_rule = \"unanimous\"", 1);
    std::fs::write(dir.join("policy.toml"), policy).unwrap();
    w.extra_env.push((
        "POLLER__POLICY__FILE".into(),
        dir.join("policy.toml").display().to_string(),
    ));
}

/// What the approver chose for a parked command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ask {
    Approve,
    Deny,
    Leave,
}

/// The approver's decision on one parked command, and the fleet's answer (none: every send
/// failed, so whether it landed is unknown).
#[derive(Debug, Clone)]
struct Decision {
    ask: Ask,
    reply: Option<ReplyOutcome>,
    message: String,
}

/// Sends `req` as the approver until a replica answers or the approval has long expired.
async fn decide(
    settings: &command_poller::approval::ApprovalSettings,
    urls: &[String],
    req: Request,
    expires_ms: u64,
) -> (Option<ReplyOutcome>, String) {
    let endpoints = command_poller::broker::Endpoints::new(urls).unwrap();
    let approver = Approver {
        settings,
        endpoints,
        wait: Duration::from_secs(10),
    };
    let mut last = String::new();
    while now_ms() < expires_ms + 10_000 {
        match approver.send(&req).await {
            Ok(reply) => return (Some(reply.outcome), reply.message),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    (None, last)
}

/// The approver: every parked command it sees gets a decision, after a pause of 0 to 8 s:
/// half approved, a quarter denied, a quarter left to expire. Runs until `stop`.
async fn approver(
    results: Arc<Mutex<Vec<ResultMessage>>>,
    settings: command_poller::approval::ApprovalSettings,
    urls: Vec<String>,
    seed: u64,
    stop: CancellationToken,
) -> BTreeMap<String, Decision> {
    let mut rng = Rng(seed ^ 0x9E37_79B9_7F4A_7C15);
    let mut seen = HashSet::new();
    let mut decisions = BTreeMap::new();
    let mut sends = tokio::task::JoinSet::new();
    let settings = Arc::new(settings);
    let mut read = 0;
    while !stop.is_cancelled() {
        let parked: Vec<ResultMessage> = {
            let r = results.lock().unwrap();
            let new = r[read..]
                .iter()
                .filter(|r| r.status == Status::NeedsApproval && !r.replay)
                .cloned()
                .collect();
            read = r.len();
            new
        };
        for r in parked {
            let (Some(id), Some(ticket)) = (r.action_id.as_ref(), r.approval.as_ref()) else {
                continue;
            };
            let id = id.to_string();
            if !seen.insert(id.clone()) {
                continue;
            }
            let ask = match rng.below(4) {
                0 | 1 => Ask::Approve,
                2 => Ask::Deny,
                _ => Ask::Leave,
            };
            let pause = rng.secs(0, 8);
            let req = match ask {
                Ask::Approve => Request::Approve {
                    approval_id: ticket.approval_id.clone(),
                    digest: ticket.digest.clone(),
                    reason: "soak: approved".into(),
                },
                Ask::Deny | Ask::Leave => Request::Deny {
                    approval_id: ticket.approval_id.clone(),
                    reason: "soak: denied".into(),
                },
            };
            let expires_ms = time::OffsetDateTime::parse(
                &ticket.expires_at,
                &time::format_description::well_known::Rfc3339,
            )
            .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as u64)
            .unwrap();
            let (settings, urls) = (settings.clone(), urls.clone());
            sends.spawn(async move {
                if ask == Ask::Leave {
                    return (
                        id,
                        Decision {
                            ask,
                            reply: None,
                            message: String::new(),
                        },
                    );
                }
                tokio::time::sleep(pause).await;
                let (reply, message) = decide(&settings, &urls, req, expires_ms).await;
                (
                    id,
                    Decision {
                        ask,
                        reply,
                        message,
                    },
                )
            });
        }
        while let Some(done) = sends.try_join_next() {
            let (id, d) = done.unwrap();
            decisions.insert(id, d);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    while let Some(done) = sends.join_next().await {
        let (id, d) = done.unwrap();
        decisions.insert(id, d);
    }
    decisions
}

/// A lever in force: from every replica's acknowledgement to the moment its lift was sent;
/// for a quarantine, over one agent's commands only.
struct Window {
    what: String,
    agent: Option<usize>,
    from_ms: u64,
    to_ms: u64,
}

struct Tally {
    events: BTreeMap<&'static str, usize>,
    windows: Vec<Window>,
    /// Each replica's current process in `World::pollers`.
    replica_index: [usize; 3],
    started: Instant,
}

/// Pulls `on`, holds it for `hold`, pulls `off`; records the window.
async fn lever_window(
    w: &World,
    t: &mut Tally,
    (on, off): (&str, &str),
    agent: Option<usize>,
    hold: Duration,
) {
    pull(w, on, REPLICAS.len()).await;
    let from_ms = now_ms();
    tokio::time::sleep(hold).await;
    let to_ms = now_ms();
    pull(w, off, REPLICAS.len()).await;
    t.windows.push(Window {
        what: on.to_owned(),
        agent,
        from_ms,
        to_ms,
    });
}

/// A blocking call (a script, a process's exit) that must not hold up the load, the results
/// collector or the broker connections' heartbeats on the runtime.
fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// What the events act on besides the fleet.
struct Stage<'a> {
    redis: &'a mut Redis,
    judge: &'a AtomicU8,
    agents: &'a [String],
}

/// The events by the names `SOAK_SKIP` takes, in the order [`event`] draws them.
const EVENTS: [&str; 10] = [
    "kill",
    "stop-node",
    "partition",
    "redis",
    "bridge",
    "pause",
    "halt",
    "quarantine",
    "judge",
    "reload",
];

/// The events a `SOAK_SKIP` value leaves out (each drawn becomes a quiet spell), by their
/// numbers in [`event`]; an unknown name is an error naming the known ones.
fn skipped(names: &str) -> Result<HashSet<usize>, String> {
    names
        .split(',')
        .filter(|n| !n.is_empty())
        .map(|n| {
            EVENTS
                .iter()
                .position(|e| *e == n)
                .ok_or_else(|| format!("SOAK_SKIP: no event {n:?}; one of {EVENTS:?}"))
        })
        .collect()
}

#[test]
fn skipped_events_are_named_as_the_script_names_them() {
    assert_eq!(skipped(""), Ok(HashSet::new()));
    assert_eq!(skipped("partition"), Ok(HashSet::from([2])));
    assert_eq!(skipped("kill,reload"), Ok(HashSet::from([0, 9])));
    assert!(skipped("partiton").unwrap_err().contains("\"partition\""));
}

/// `scripts/cluster.sh start` after a fault (it must succeed), with what it said on standard
/// error (a node rebuilt from empty data, a second pass) and how long it took.
fn restart_cluster(t: &Tally) {
    let t0 = Instant::now();
    let out = off_runtime(|| {
        Command::new("scripts/cluster.sh")
            .arg("start")
            .output()
            .expect("scripts/cluster.sh runs")
    });
    let said = String::from_utf8_lossy(&out.stderr);
    for line in said.lines().filter(|l| l.starts_with("cluster:")) {
        println!(
            "SOAK | {:>6.1} s | {line}",
            t.started.elapsed().as_secs_f64()
        );
    }
    println!(
        "SOAK | {:>6.1} s | cluster.sh start took {:.0} s",
        t.started.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "scripts/cluster.sh start: {}{said}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// One event, chosen at random, carried out and undone before the next.
async fn event(
    w: &mut World,
    rng: &mut Rng,
    s: &mut Stage<'_>,
    t: &mut Tally,
    skip: &HashSet<usize>,
) {
    let drawn = rng.below(11) as usize;
    let drawn = if skip.contains(&drawn) { 10 } else { drawn };
    let name = match drawn {
        0 => {
            let i = rng.below(REPLICAS.len() as u64) as usize;
            let index = t.replica_index[i];
            off_runtime(|| w.kill9(index));
            tokio::time::sleep(rng.secs(0, 2)).await;
            t.replica_index[i] = w.spawn_poller(REPLICAS[i]);
            "replica SIGKILLed and restarted"
        }
        1 => {
            let n = (1 + rng.below(3)).to_string();
            off_runtime(|| cluster(&["safe-to-stop", &n]));
            off_runtime(|| cluster(&["stop-node", &n]));
            tokio::time::sleep(rng.secs(5, 15)).await;
            // `start` (not `start-node`): it also rejoins a node that had to be rebuilt.
            restart_cluster(t);
            "broker node stopped and started"
        }
        2 => {
            let n = (1 + rng.below(3)).to_string();
            off_runtime(|| cluster(&["partition", &n]));
            tokio::time::sleep(rng.secs(15, 30)).await;
            off_runtime(|| cluster(&["heal"]));
            // Until the cut-off node is back among the others (pause_minority paused it; one
            // that can't rejoin is rebuilt and joined again).
            restart_cluster(t);
            "broker node cut off and healed"
        }
        3 => {
            let down = rng.secs(1, 3);
            off_runtime(|| s.redis.restart(down));
            "Redis restarted"
        }
        4 => {
            let faults = match rng.below(3) {
                0 => {
                    serde_json::json!({"post": vec![serde_json::json!({"kind": "delay", "ms": 3000}); 10]})
                }
                1 => {
                    serde_json::json!({"post": vec![serde_json::json!({"kind": "status", "code": 500}); 6]})
                }
                _ => {
                    serde_json::json!({"post": vec![serde_json::json!({"kind": "html", "message": "Exception: Service invoked too many times"}); 4]})
                }
            };
            w.sim_faults(faults).await;
            "bridge slow, failing or answering HTML"
        }
        5 => {
            let hold = rng.secs(4, 10);
            lever_window(w, t, ("pause", "resume"), None, hold).await;
            "paused, then resumed"
        }
        6 => {
            let hold = rng.secs(4, 10);
            lever_window(w, t, ("halt", "lift"), None, hold).await;
            "halted, then lifted"
        }
        7 => {
            let hold = rng.secs(4, 10);
            let a = rng.below(s.agents.len() as u64) as usize;
            let (on, off) = (
                format!("quarantine {}", s.agents[a]),
                format!("release {}", s.agents[a]),
            );
            lever_window(w, t, (&on, &off), Some(a), hold).await;
            "an agent quarantined, then released"
        }
        8 => {
            let mode = [JUDGE_SLOW, JUDGE_500, JUDGE_HTML][rng.below(3) as usize];
            s.judge.store(mode, Ordering::SeqCst);
            tokio::time::sleep(rng.secs(5, 15)).await;
            s.judge.store(JUDGE_OK, Ordering::SeqCst);
            "LLM judge slow, failing or answering HTML"
        }
        9 => {
            pull(w, "reload", REPLICAS.len()).await;
            "policy reloaded"
        }
        _ => {
            tokio::time::sleep(rng.secs(3, 8)).await;
            "quiet"
        }
    };
    println!(
        "SOAK | {:>6.1} s | {name}",
        t.started.elapsed().as_secs_f64()
    );
    *t.events.entry(name).or_default() += 1;
}

/// Waits until every one of `ids` has a result that is not NEEDS_APPROVAL.
async fn wait_finals(w: &World, ids: &[String], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let done: HashSet<String> = w
            .results
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.status != Status::NeedsApproval)
            .filter_map(|r| r.action_id.as_ref().map(ToString::to_string))
            .collect();
        if ids.iter().all(|id| done.contains(id)) || Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Everything the end of the run found wrong, by check, with the commands concerned.
#[derive(Default)]
struct Verdicts {
    violations: BTreeMap<&'static str, Vec<String>>,
    counts: BTreeMap<String, usize>,
}

impl Verdicts {
    fn fail(&mut self, check: &'static str, what: String) {
        self.violations.entry(check).or_default().push(what);
    }
    fn count(&mut self, what: impl Into<String>) {
        *self.counts.entry(what.into()).or_default() += 1;
    }
}

/// The approval checks: each command against the results, the approver's decisions and the
/// bridge's executions.
fn check_approvals(
    ids: &[String],
    results: &[ResultMessage],
    decisions: &BTreeMap<String, Decision>,
    executions: &HashMap<String, u32>,
    v: &mut Verdicts,
) {
    let mut by_id: HashMap<&str, Vec<&ResultMessage>> = HashMap::new();
    for r in results {
        if let Some(id) = r.action_id.as_deref() {
            by_id.entry(id).or_default().push(r);
        }
    }
    for id in ids {
        let (_, n) = parse_id(id);
        let kind = kind_of(n);
        let rs = by_id.get(id.as_str()).cloned().unwrap_or_default();
        let parked = rs
            .iter()
            .filter(|r| r.status == Status::NeedsApproval && !r.replay)
            .count();
        let finals: Vec<&&ResultMessage> = rs
            .iter()
            .filter(|r| r.status != Status::NeedsApproval)
            .collect();
        let final_status = finals
            .iter()
            .find(|r| !r.replay)
            .or(finals.first())
            .map(|r| r.status);
        let executed = executions.get(id.as_str()).copied().unwrap_or(0) > 0;
        v.count(format!("{kind:?} sent"));
        if executed {
            v.count(format!("{kind:?} executed"));
        }
        if parked > 1 {
            v.fail("parked twice", id.clone());
        }
        if finals.iter().filter(|r| !r.replay).count() > 1 {
            v.fail("two final results", id.clone());
        }
        let Some(status) = final_status else {
            v.fail("no final result", format!("{id} ({parked} parked)"));
            continue;
        };
        if kind == Kind::Blocked && executed {
            v.fail("a BLOCK command executed", id.clone());
        }
        let decision = decisions.get(id.as_str());
        if parked == 0 {
            if kind == Kind::AskAHuman && executed {
                v.fail("executed though the LLM judge denied it", id.clone());
            }
            if kind == Kind::Judged && executed {
                let panel = finals
                    .iter()
                    .find_map(|r| r.panel.as_ref())
                    .is_some_and(|p| p.approved && p.approvals == p.size);
                // Reported from the bridge's memory: the attempt that ran it (and its panel's
                // votes) died before storing its result.
                let looked_up = finals
                    .iter()
                    .any(|r| r.bridge.as_ref().is_some_and(|b| b.looked_up));
                if looked_up {
                    v.count("executed by a replica that died, reported from the bridge's memory");
                }
                if !panel && !looked_up {
                    v.fail("executed without every judge's approval", id.clone());
                }
            }
            continue;
        }
        v.count(format!("parked, ended {}", status.as_str()));
        let Some(d) = decision else {
            v.fail("parked, never seen by the approver", id.clone());
            continue;
        };
        v.count(format!("approver {:?} → {:?}", d.ask, d.reply));
        if d.reply == Some(ReplyOutcome::Refused) {
            v.count(format!("refused: {}", d.message));
        }
        match (d.ask, d.reply) {
            (Ask::Approve, Some(ReplyOutcome::Approved)) => {
                if matches!(status, Status::Denied | Status::Expired) {
                    v.fail(
                        "approved, yet ended DENIED or EXPIRED",
                        format!("{id} {status:?}"),
                    );
                }
            }
            (Ask::Approve, None) => {}
            (Ask::Approve, Some(other)) => {
                if executed {
                    v.fail(
                        "executed though its approval was refused",
                        format!("{id} {other:?}: {}", d.message),
                    );
                }
            }
            (Ask::Deny, Some(ReplyOutcome::Denied)) => {
                if executed || status != Status::Denied {
                    v.fail(
                        "denied, yet executed or not DENIED",
                        format!("{id} {status:?}"),
                    );
                }
            }
            (Ask::Deny, _) => {
                if executed {
                    v.fail("executed though the approver denied it", id.clone());
                }
            }
            (Ask::Leave, _) => {
                if executed || status != Status::Expired {
                    v.fail(
                        "left to expire, yet executed or not EXPIRED",
                        format!("{id} {status:?}"),
                    );
                }
            }
        }
    }
}

/// The audit chain: it verifies, and holds each command's final status (waits up to
/// `timeout` for the sink to catch up).
async fn check_audit(
    file: &std::path::Path,
    key: Option<&command_poller::bridge::signing::Secret>,
    finals: &HashMap<String, Status>,
    timeout: Duration,
    v: &mut Verdicts,
) {
    use command_poller::audit::chain;
    let deadline = Instant::now() + timeout;
    let missing = loop {
        let mut held: HashMap<String, HashSet<String>> = HashMap::new();
        if let Ok(rows) = chain::select(file, |r| r["kind"] == "command") {
            for row in rows {
                let r = &row["record"];
                let Some(id) = r["action_id"].as_str() else {
                    continue;
                };
                for e in r["events"].as_array().into_iter().flatten() {
                    if e["type"] == "result_published" {
                        if let Some(s) = e["status"].as_str() {
                            held.entry(id.to_owned()).or_default().insert(s.to_owned());
                        }
                    }
                }
            }
        }
        let missing: Vec<String> = finals
            .iter()
            .filter(|(id, s)| !held.get(*id).is_some_and(|h| h.contains(s.as_str())))
            .map(|(id, s)| format!("{id} {}", s.as_str()))
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    for m in missing {
        v.fail("final result missing from the audit chain", m);
    }
    match chain::verify_with(file, key) {
        Ok(report) if report.ok() => {
            *v.counts
                .entry("audit records chained and verified".into())
                .or_default() += report.records as usize;
        }
        Ok(report) => v.fail(
            "the audit chain does not verify",
            format!("{:?}", report.first_bad),
        ),
        Err(e) => v.fail("the audit chain can't be read", e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "chaos soak: run by scripts/soak.sh"]
async fn chaos_soak() {
    let minutes: f64 = std::env::var("SOAK_MINUTES").map_or(3.0, |m| m.parse().unwrap());
    let seed: u64 = std::env::var("SOAK_SEED").map_or_else(
        |_| now_ms() | 1,
        |s| s.parse().expect("SOAK_SEED is a number"),
    );
    println!(
        "SOAK | seed {seed} | {minutes} minutes (SOAK_SEED={seed} replays the choices) | skipped: {}",
        std::env::var("SOAK_SKIP").unwrap_or_default()
    );
    let skip = skipped(&std::env::var("SOAK_SKIP").unwrap_or_default()).unwrap();
    let mut rng = Rng(seed);
    let _cluster = Cluster::up();
    let sfx = suffix();
    let approver_user = format!("soak-approver-{sfx}");
    let agent_users: Vec<String> = std::iter::once("guest".to_owned())
        .chain((1..AGENTS).map(|a| format!("soak-agent{a}-{sfx}")))
        .collect();
    let mut names = agent_users[1..].to_vec();
    names.push(approver_user.clone());
    let _users = Users::create(&names);
    let mut redis = Redis::start();
    let judge_mode = Arc::new(AtomicU8::new(JUDGE_OK));
    let judge_url = llm_judge(judge_mode.clone()).await;
    let mut w = world("soak", 50).await;
    configure(&mut w, &judge_url, &approver_user);
    w.extra_env
        .push(("POLLER__IDEMPOTENCY__URL".into(), redis.url()));
    spawn(&mut w, 1, &REPLICAS).await;
    let chain_file = w.config_dir.join("audit.jsonl");
    let sink_stop = CancellationToken::new();
    let sink = spawn_sink(&w.settings, &chain_file, sink_stop.clone());
    let approver_stop = CancellationToken::new();
    let decisions = tokio::spawn(approver(
        w.results.clone(),
        w.settings.approval.clone(),
        urls_as(&w.urls, &approver_user),
        seed,
        approver_stop.clone(),
    ));
    let mut t = Tally {
        events: BTreeMap::new(),
        windows: Vec::new(),
        replica_index: [0, 1, 2],
        started: Instant::now(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(load(
        agent_users
            .iter()
            .map(|u| (u.clone(), urls_as(&w.urls, u)))
            .collect(),
        w.settings.topology.commands_exchange.clone(),
        stop.clone(),
    ));
    let end = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    {
        let mut stage = Stage {
            redis: &mut redis,
            judge: &judge_mode,
            agents: &agent_users,
        };
        while Instant::now() < end {
            tokio::time::sleep(rng.secs(1, 4)).await;
            event(&mut w, &mut rng, &mut stage, &mut t, &skip).await;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let ids = load.await.unwrap();
    // Parked commands end within their life, decided or expired (a sweep a second).
    wait_finals(&w, &ids, Duration::from_secs(300 + APPROVAL_TTL_SECS)).await;
    approver_stop.cancel();
    let decisions = decisions.await.unwrap();
    let calls = w.sim_calls().await;
    let results = w.results.lock().unwrap().clone();
    let mut v = Verdicts::default();
    // Executions whose POST reached the bridge while a lever was in force.
    let grace = IN_FLIGHT_GRACE.as_millis() as u64;
    for (id, times) in &calls.executed_posts_at_ms {
        let (agent, _) = parse_id(id);
        for at in times {
            if let Some(win) = t.windows.iter().find(|win| {
                *at > win.from_ms + grace && *at < win.to_ms && win.agent.is_none_or(|a| a == agent)
            }) {
                v.fail(
                    "executed while a lever was in force",
                    format!("{id} ({}: {} ms in)", win.what, at - win.from_ms),
                );
            }
        }
    }
    check_approvals(&ids, &results, &decisions, &calls.executions, &mut v);
    let mut finals: HashMap<String, Status> = HashMap::new();
    for r in &results {
        if let Some(id) = r.action_id.as_deref() {
            if r.status != Status::NeedsApproval && (!r.replay || !finals.contains_key(id)) {
                finals.insert(id.to_owned(), r.status);
            }
        }
    }
    if sink.is_finished() {
        v.fail("the audit sink stopped", String::new());
    }
    check_audit(
        &chain_file,
        w.settings.secrets.audit_chain_key.as_ref(),
        &finals,
        Duration::from_secs(120),
        &mut v,
    )
    .await;
    sink_stop.cancel();
    for (what, n) in &t.events {
        println!("SOAK | event | {what} | {n}");
    }
    println!(
        "SOAK | levers in force {} s in all",
        t.windows.iter().map(|w| w.to_ms - w.from_ms).sum::<u64>() / 1000,
    );
    for (what, n) in &v.counts {
        println!("SOAK | count | {what} | {n}");
    }
    for (check, which) in &v.violations {
        println!(
            "SOAK | VIOLATION | {check} | {} | {:?}",
            which.len(),
            &which[..which.len().min(10)]
        );
    }
    println!(
        "SOAK | violations {}",
        v.violations.values().map(Vec::len).sum::<usize>()
    );
    // Exactly one final result each (a parked command's NEEDS_APPROVAL aside), at most one
    // execution, nothing lost (asserts, prints).
    let parked: HashSet<&str> = results
        .iter()
        .filter(|r| r.status == Status::NeedsApproval)
        .filter_map(|r| r.action_id.as_deref())
        .collect();
    let unparked: Vec<String> = ids
        .iter()
        .filter(|id| !parked.contains(id.as_str()))
        .cloned()
        .collect();
    w.report(&unparked).await;
    assert!(v.violations.is_empty(), "the soak found violations (above)");
}
