//! The cluster fault suite: the fault suite's worlds (real poller processes, the bridge
//! simulator, hundreds of commands counted per action_id: exactly one final result, at most one
//! bridge execution, nothing lost) on a three-node RabbitMQ cluster (`scripts/cluster.sh`),
//! with a node killed, stopped, cut off, and every node restarted in turn.
//!
//! Each scenario also prints how long it took from the node's loss to the first command
//! processed again: the earliest `completed_at` of a command the poller received after the
//! loss (`received_at`), minus the moment of the loss, on the pollers' own clock.
//!
//! Ignored in the parallel suite: `scripts/test.sh` starts the cluster and runs them one at a
//! time:
//!   scripts/cluster.sh start
//!   cargo test --test api -- --ignored --test-threads=1 --nocapture cluster::

use crate::faults::{connect_any, load, World};
use command_poller::control::operator::{new_request_id, Operator, Report};
use command_poller::control::{ControlCommand, Mode};
use std::process::Command;
use std::time::{Duration, Instant};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const NODES: [u8; 3] = [1, 2, 3];

/// `scripts/cluster.sh ARGS`, which must succeed; its standard output.
pub(crate) fn cluster(args: &[&str]) -> String {
    let out = Command::new("scripts/cluster.sh")
        .args(args)
        .output()
        .expect("scripts/cluster.sh runs");
    assert!(
        out.status.success(),
        "scripts/cluster.sh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn url(node: u8) -> String {
    format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        5680 + u16::from(node)
    )
}

/// The three nodes' URLs, `first` first (the node the pollers connect to while it answers).
pub(crate) fn urls_from(first: u8) -> Vec<String> {
    let mut order = vec![first];
    order.extend(NODES.iter().copied().filter(|n| *n != first));
    order.into_iter().map(url).collect()
}

/// The node leading quorum queue `queue`.
fn leader(queue: &str) -> u8 {
    cluster(&["leader", queue]).parse().expect("a node number")
}

/// Where every queue and stream of the world leads ("name=N ..."): a scenario's pause depends
/// on which of them the lost node led, so each scenario prints it.
fn leaders(w: &World) -> String {
    cluster(&["leaders", &w.sfx]).replace(&format!("t.{}.", w.sfx), "")
}

/// Starts the cluster if it isn't running; on drop (a failed scenario too) heals any cut and
/// starts every stopped node, so the next scenario finds three nodes.
pub(crate) struct Cluster;

impl Cluster {
    pub(crate) fn up() -> Self {
        cluster(&["start"]);
        Cluster
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("scripts/cluster.sh").arg("heal").status();
        let _ = Command::new("scripts/cluster.sh").arg("start").status();
    }
}

/// Now, on the wall clock the results' timestamps use.
fn wall_now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn parse(t: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(t, &Rfc3339).ok()
}

/// How the fleet came back from a loss at `loss`, on the pollers' own clock.
struct Recovery {
    /// The longest stretch after the loss with no command completing anywhere.
    longest_pause: f64,
    /// From the loss to the first command that `replica` (the one on the lost node) received
    /// after it and completed: that replica back at work on another node.
    replica_back: Option<f64>,
}

fn recovery(w: &World, loss: OffsetDateTime, replica: Option<&str>) -> Recovery {
    recovery_until(w, loss, None, replica)
}

/// [`recovery`], counting only completions before `until` (the next loss of a series).
fn recovery_until(
    w: &World,
    loss: OffsetDateTime,
    until: Option<OffsetDateTime>,
    replica: Option<&str>,
) -> Recovery {
    let results = w.results.lock().unwrap().clone();
    let mut done: Vec<OffsetDateTime> = results
        .iter()
        .filter_map(|r| parse(&r.completed_at))
        .filter(|t| *t >= loss && until.is_none_or(|u| *t < u))
        .collect();
    done.sort();
    let mut longest_pause = 0.0f64;
    let mut last = loss;
    for t in &done {
        longest_pause = longest_pause.max((*t - last).as_seconds_f64());
        last = *t;
    }
    let replica_back = replica.and_then(|name| {
        let instance = format!("{}-{name}", w.name);
        results
            .iter()
            .filter(|r| r.poller_instance == instance)
            .filter(|r| parse(&r.received_at).is_some_and(|t| t >= loss))
            .filter_map(|r| parse(&r.completed_at))
            .min()
            .map(|t| (t - loss).as_seconds_f64())
    });
    Recovery {
        longest_pause,
        replica_back,
    }
}

fn print_row(scenario: &str, what: &str, r: &Recovery) {
    let back = r
        .replica_back
        .map(|s| format!("{s:.1} s"))
        .unwrap_or_else(|| "-".into());
    println!(
        "CLUSTER | {scenario} | {what} | longest pause in completions after the loss {:.1} s | lost node's replica processing again after {back}",
        r.longest_pause
    );
}

/// A world on the cluster (its queues declared while all three nodes run), sharing Redis
/// between its replicas; the pollers are spawned by the scenario, once it has chosen their node.
pub(crate) async fn world(name: &'static str, latency_ms: u64) -> World {
    let mut w = World::on(name, latency_ms, urls_from(1)).await;
    w.share_redis();
    w
}

/// Spawns `replicas` connecting to `first` first, and waits for a consumer.
pub(crate) async fn spawn(w: &mut World, first: u8, replicas: &[&str]) {
    w.urls = urls_from(first);
    for r in replicas {
        w.spawn_poller(r);
    }
    let queue = w.settings.topology.commands_queue.clone();
    w.wait_consumer(&queue).await;
}

#[tokio::test]
#[ignore = "cluster fault suite: run by scripts/test.sh, one at a time"]
async fn the_node_leading_the_commands_queue_killed_with_sigkill() {
    let _cluster = Cluster::up();
    let mut w = world("cluster-leader-sigkill", 30).await;
    let queue = w.settings.topology.commands_queue.clone();
    // The pollers use the leader's node: they lose their connections and the queue its leader
    // at the same instant.
    let target = leader(&queue);
    spawn(&mut w, target, &["a", "b"]).await;
    let (ids, bodies) = load("cls-kill", 400);
    w.publish(&bodies).await;
    w.wait_results(100, Duration::from_secs(60)).await;
    let loss = wall_now();
    cluster(&["kill", &target.to_string()]);
    // Commands published after the loss go to the surviving nodes.
    let (late_ids, late_bodies) = load("cls-kill-late", 100);
    w.publish(&late_bodies).await;
    let all: Vec<String> = ids.into_iter().chain(late_ids).collect();
    w.wait_ids(&all, Duration::from_secs(180)).await;
    let new_leader = leader(&queue);
    assert_ne!(new_leader, target, "a new leader was elected");
    w.report(&all).await;
    print_row(
        w.name,
        &format!(
            "node {target} (the leader, the pollers' node) SIGKILLed; node {new_leader} leads"
        ),
        &recovery(&w, loss, Some("a")),
    );
}

pub(crate) fn lever(cmd: &str, reason: &str) -> ControlCommand {
    let request_id = new_request_id();
    let reason = reason.to_owned();
    match cmd {
        "pause" => ControlCommand::Pause { reason, request_id },
        "halt" => ControlCommand::Halt { reason, request_id },
        "resume" => ControlCommand::Resume {
            reason,
            lift_halt: false,
            post_mortem: Some("PM-test".into()),
            request_id,
        },
        "lift" => ControlCommand::Resume {
            reason,
            lift_halt: true,
            post_mortem: Some("PM-test".into()),
            request_id,
        },
        _ => match cmd.split_once(' ') {
            Some(("quarantine", agent)) => ControlCommand::Quarantine {
                agent: agent.to_owned(),
                reason,
                request_id,
            },
            Some(("release", agent)) => ControlCommand::Release {
                agent: agent.to_owned(),
                reason,
                request_id,
            },
            _ if cmd == "reload" => ControlCommand::ReloadPolicy { request_id },
            _ => ControlCommand::Status { request_id },
        },
    }
}

/// Pulls a lever through the cluster, as `command-poller pause` with `--amqp-url` listing the
/// nodes does, and checks that `replicas` replicas accepted it.
pub(crate) async fn pull(w: &World, cmd: &str, replicas: usize) -> Report {
    let nodes = command_poller::broker::Endpoints::new(&w.urls).unwrap();
    let op = Operator::new(&w.settings, &nodes, Duration::from_millis(3000));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match op.run(lever(cmd, "cluster drill")).await {
            Ok(r) if r.replicas.len() == replicas && r.replicas.iter().all(|r| r.accepted) => {
                return r
            }
            other => assert!(
                Instant::now() < deadline,
                "{cmd}: not every replica accepted within 60 s: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until every replica's `status` answer shows `mode`.
async fn every_replica(w: &World, mode: Mode, replicas: usize) -> Report {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = pull(w, "status", replicas).await;
        if r.replicas.iter().all(|r| r.state.mode == mode) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "not every replica is {mode:?}: {:?}",
            r.replicas
                .iter()
                .map(|r| (&r.instance, r.state.mode))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
#[ignore = "cluster fault suite: run by scripts/test.sh, one at a time"]
async fn a_node_the_poller_uses_stopped_and_levers_pulled_while_it_is_down() {
    let _cluster = Cluster::up();
    // Slow enough that the load is still running when the levers are pulled.
    let mut w = world("cluster-node-stopped", 200).await;
    w.extra_env
        .push(("POLLER__BRIDGE__MAX_CONCURRENCY".into(), "4".into()));
    let queue = w.settings.topology.commands_queue.clone();
    // Replica a on a node that doesn't lead the queue (its loss is a lost connection, not an
    // election), replica b on another.
    let lead = leader(&queue);
    let target = NODES.into_iter().find(|n| *n != lead).unwrap();
    let other = NODES
        .into_iter()
        .find(|n| *n != lead && *n != target)
        .unwrap();
    spawn(&mut w, target, &["a"]).await;
    spawn(&mut w, other, &["b"]).await;
    w.urls = urls_from(target);
    let (ids, bodies) = load("cls-stop", 600);
    w.publish(&bodies).await;
    w.wait_results(80, Duration::from_secs(60)).await;
    let loss = wall_now();
    cluster(&["stop-node", &target.to_string()]);
    // Replica a back at work on another node before the levers.
    let deadline = Instant::now() + Duration::from_secs(60);
    while recovery(&w, loss, Some("a")).replica_back.is_none() {
        assert!(
            Instant::now() < deadline,
            "replica a did not come back within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Levers while the node is down: the operator's URL list starts at the dead node.
    let pause_pulled = wall_now();
    pull(&w, "pause", 2).await;
    let paused = every_replica(&w, Mode::Paused, 2).await;
    let paused_at = wall_now();
    assert!(
        paused.replicas.iter().all(|r| r.broker_node.is_some()),
        "status names each replica's node: {:?}",
        paused.replicas
    );
    assert!(
        w.distinct_results() < ids.len(),
        "the load finished before the pause"
    );

    // Resume and halt with the node still down.
    let resumed_at = wall_now();
    pull(&w, "resume", 2).await;
    every_replica(&w, Mode::Running, 2).await;
    w.wait_results(w.distinct_results() + 10, Duration::from_secs(60))
        .await;
    pull(&w, "halt", 2).await;
    every_replica(&w, Mode::Halted, 2).await;
    let halted_at = wall_now();
    assert!(
        w.distinct_results() < ids.len(),
        "the load finished before the halt"
    );
    // The node comes back while halted: the replica that reconnects to it reads the halt from
    // the replicated state stream before consuming and stays halted, as does the other.
    cluster(&["start-node", &target.to_string()]);
    every_replica(&w, Mode::Halted, 2).await;
    let lifted_at = wall_now();
    pull(&w, "lift", 2).await;
    every_replica(&w, Mode::Running, 2).await;
    w.wait_ids(&ids, Duration::from_secs(180)).await;
    w.report(&ids).await;
    // Nothing completed while paused or halted, on either replica (what was in flight when
    // the lever landed had a few seconds to finish).
    let held = [(paused_at, resumed_at), (halted_at, lifted_at)];
    let results = w.results.lock().unwrap().clone();
    let during: Vec<_> = results
        .iter()
        .filter(|r| {
            parse(&r.completed_at).is_some_and(|t| {
                held.iter()
                    .any(|(from, to)| t > *from + time::Duration::seconds(5) && t < *to)
            })
        })
        .map(|r| {
            (
                r.action_id.clone(),
                r.completed_at.clone(),
                r.poller_instance.clone(),
            )
        })
        .collect();
    assert!(
        during.is_empty(),
        "completed while paused or halted: {during:?}"
    );
    print_row(
        w.name,
        &format!("node {target} (replica a's, not the leader) stopped; paused, resumed, halted while it was down, the halt held through its return, lifted"),
        &recovery_until(&w, loss, Some(pause_pulled), Some("a")),
    );
}

// Named to run last (the suite runs one at a time, in name order): RabbitMQ 3.10's paused
// minority node was seen, once in three runs, never finishing its boot after the heal (mnesia's
// inconsistent_database), and `scripts/cluster.sh start` could not bring it back either.
#[tokio::test]
#[ignore = "cluster fault suite: run by scripts/test.sh, one at a time"]
async fn whilst_a_node_is_cut_off_from_the_other_two_then_healed() {
    let _cluster = Cluster::up();
    let mut w = world("cluster-partition", 30).await;
    let queue = w.settings.topology.commands_queue.clone();
    // Cut off the leader, which replica a uses; replica b uses another node.
    let target = leader(&queue);
    let other = NODES.into_iter().find(|n| *n != target).unwrap();
    spawn(&mut w, target, &["a"]).await;
    spawn(&mut w, other, &["b"]).await;
    let (ids, bodies) = load("cls-cut", 500);
    w.publish(&bodies).await;
    w.wait_results(100, Duration::from_secs(60)).await;
    let leading = leaders(&w);
    let loss = wall_now();
    let cut = Instant::now();
    cluster(&["partition", &target.to_string()]);
    // Published during the cut (the confirms of what reached the cut-off leader never come:
    // the first round waits its 20 s), then 20 s more: long enough for the cut-off node to
    // notice (net_ticktime 10 s) and pause itself.
    let (late_ids, late_bodies) = load("cls-cut-late", 100);
    w.publish(&late_bodies).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    cluster(&["heal"]);
    let cut_for = cut.elapsed().as_secs_f64();
    let all: Vec<String> = ids.into_iter().chain(late_ids).collect();
    w.wait_ids(&all, Duration::from_secs(180)).await;
    w.report(&all).await;
    print_row(
        w.name,
        &format!("node {target} (the leader, replica a's) cut off for {cut_for:.0} s, then healed; leaders before the cut: {leading}"),
        &recovery(&w, loss, Some("a")),
    );
}

#[tokio::test]
#[ignore = "cluster fault suite: run by scripts/test.sh, one at a time"]
async fn a_rolling_restart_of_all_three_nodes() {
    let _cluster = Cluster::up();
    // Slower bridge calls, so the load outlasts three node restarts.
    let mut w = world("cluster-rolling-restart", 200).await;
    w.extra_env
        .push(("POLLER__BRIDGE__MAX_CONCURRENCY".into(), "4".into()));
    spawn(&mut w, 1, &["a"]).await;
    spawn(&mut w, 2, &["b"]).await;
    let (ids, bodies) = load("cls-roll", 600);
    w.publish(&bodies).await;
    w.wait_results(40, Duration::from_secs(60)).await;
    let mut losses = Vec::new();
    for node in NODES {
        let loss = wall_now();
        losses.push(loss);
        let before = w.distinct_results();
        // As an operator would: only a node whose loss leaves every quorum queue a majority.
        cluster(&["safe-to-stop", &node.to_string()]);
        cluster(&["stop-node", &node.to_string()]);
        w.wait_results(before + 10, Duration::from_secs(60)).await;
        cluster(&["start-node", &node.to_string()]);
        assert!(
            w.distinct_results() < ids.len(),
            "the load finished before node {node} restarted"
        );
    }
    w.wait_ids(&ids, Duration::from_secs(240)).await;
    w.report(&ids).await;
    // The longest pause after any of the three stops, each counted until the next stop.
    let slowest = (0..losses.len())
        .map(|i| recovery_until(&w, losses[i], losses.get(i + 1).copied(), None))
        .max_by(|a, b| a.longest_pause.total_cmp(&b.longest_pause))
        .unwrap();
    print_row(
        w.name,
        "nodes 1, 2, 3 stopped and started in turn (the longest of the three pauses)",
        &slowest,
    );
}

/// The topology a poller declares on a cluster spreads: every quorum queue and stream has a
/// member on each of the three nodes, and the leaders are not all on one node.
#[tokio::test]
#[ignore = "cluster fault suite: run by scripts/test.sh, one at a time"]
async fn the_declared_queues_spread_over_the_cluster() {
    let _cluster = Cluster::up();
    let w = world("cluster-topology", 30).await;
    let conn = connect_any(&w.urls).await;
    let ch = conn.create_channel().await.unwrap();
    command_poller::broker::declare_control(
        &ch,
        &w.settings.control,
        &w.settings.topology.replication,
    )
    .await
    .unwrap();
    let _ = conn.close(200, "ok".into()).await;
    let out = Command::new("rabbitmqctl")
        .args([
            "-q",
            "-n",
            "rabbitc1@localhost",
            "list_queues",
            "name",
            "type",
            "leader",
            "members",
            "--formatter",
            "json",
        ])
        .output()
        .unwrap();
    let queues: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let ours: Vec<&serde_json::Value> = queues
        .iter()
        .filter(|q| q["name"].as_str().is_some_and(|n| n.contains(&w.sfx)))
        .collect();
    assert!(ours.len() >= 6, "{ours:?}");
    let mut leaders = std::collections::BTreeSet::new();
    for q in &ours {
        let members = q["members"].as_array().map(Vec::len).unwrap_or(0);
        assert_eq!(members, 3, "{} has {members} members: {q}", q["name"]);
        leaders.insert(q["leader"].as_str().unwrap_or_default().to_owned());
    }
    assert!(leaders.len() > 1, "every leader on one node: {leaders:?}");
    println!(
        "CLUSTER | topology | {} queues and streams, 3 members each, leaders on {} nodes",
        ours.len(),
        leaders.len()
    );
}
