//! deploy/rabbitmq/definitions.json loaded into the real broker (a fresh vhost, users renamed
//! for this test): the least-privilege permissions hold, and the poller runs on them.

use crate::common::*;
use command_poller::outcome::Status;
use futures::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

struct Imported {
    vhost: String,
    users: Vec<String>,
}

fn ctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Imported {
    fn load(sfx: &str) -> Self {
        let text = std::fs::read_to_string("deploy/rabbitmq/definitions.json").unwrap();
        let mut defs: serde_json::Value = serde_json::from_str(&text).unwrap();
        let vhost = format!("t-{sfx}");
        let rename = |u: &str| format!("t-{sfx}-{u}");
        let mut users = Vec::new();
        for section in ["vhosts", "exchanges", "queues", "bindings", "permissions"] {
            for item in defs[section].as_array_mut().unwrap() {
                let key = if section == "vhosts" { "name" } else { "vhost" };
                item[key] = vhost.clone().into();
                if section == "permissions" {
                    let u = item["user"].as_str().unwrap().to_owned();
                    // Agent permissions name the agent in their patterns.
                    for p in ["configure", "write", "read"] {
                        let s = item[p].as_str().unwrap().replace(&u, &rename(&u));
                        item[p] = s.into();
                    }
                    item["user"] = rename(&u).into();
                }
            }
        }
        for u in defs["users"].as_array_mut().unwrap() {
            let n = rename(u["name"].as_str().unwrap());
            users.push(n.clone());
            u["name"] = n.into();
        }
        let file = std::env::temp_dir().join(format!("defs-{sfx}.json"));
        std::fs::write(&file, serde_json::to_vec(&defs).unwrap()).unwrap();
        ctl(&["import_definitions", file.to_str().unwrap()]);
        std::fs::remove_file(file).unwrap();
        for u in &users {
            ctl(&["change_password", u, "pw"]);
        }
        Self { vhost, users }
    }

    fn url(&self, user: &str) -> String {
        let u = self.users.iter().find(|n| n.ends_with(user)).unwrap();
        format!("amqp://{u}:pw@127.0.0.1:5672/{}", self.vhost)
    }

    fn user(&self, user: &str) -> String {
        self.users
            .iter()
            .find(|n| n.ends_with(user))
            .unwrap()
            .clone()
    }
}

impl Drop for Imported {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.vhost])
            .output();
        for u in &self.users {
            let _ = Command::new("rabbitmqctl")
                .args(["delete_user", u])
                .output();
        }
    }
}

/// Publishes with confirms on a fresh channel; Err when the broker refuses.
async fn try_publish(
    conn: &Connection,
    exchange: &str,
    key: &str,
    user: &str,
) -> Result<(), String> {
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let body = cmd(
        &format!("perm-{}", suffix()),
        "CHECK_INTEGRATION_STATUS",
        "mailchimp",
        "LOW",
    )
    .to_string();
    let c = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default().with_user_id(user.into()),
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    if !c.is_ack() {
        return Err(format!("{c:?}"));
    }
    // A refusal closes the channel asynchronously; a round trip makes it show.
    ch.basic_qos(1, BasicQosOptions::default())
        .await
        .map_err(|e| e.to_string())
}

async fn try_read(conn: &Connection, queue: &str) -> Result<(), String> {
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn the_definitions_enforce_least_privilege_and_run_the_poller() {
    let sfx = suffix();
    let defs = tokio::task::spawn_blocking({
        let sfx = sfx.clone();
        move || Imported::load(&sfx)
    })
    .await
    .unwrap();
    let agent_user = defs.user("agent-marketing");
    let agent = Connection::connect(&defs.url("agent-marketing"), Default::default())
        .await
        .unwrap();

    // An agent may publish commands…
    try_publish(
        &agent,
        "mcp.commands",
        "command.check_integration_status",
        &agent_user,
    )
    .await
    .expect("agent publishes a command");
    // …and nothing else: not control, results or alerts, nor straight into a queue.
    for (exchange, key) in [
        ("mcp.control", "control.resume"),
        ("mcp.results", "result.success"),
        ("mcp.alerts", "security.high"),
        ("mcp.audit", "audit.command"),
        ("mcp.approvals", "approval.approve"),
        ("", "mcp.commands"),
    ] {
        let e = try_publish(&agent, exchange, key, &agent_user)
            .await
            .expect_err(&format!("agent published to {exchange:?}"));
        assert!(
            e.contains("ACCESS_REFUSED") || e.contains("access to"),
            "{exchange}: {e}"
        );
    }
    // It reads only its own reply queues.
    for queue in [
        "mcp.commands",
        "mcp.results",
        "mcp.alerts.security",
        "mcp.control.state.log",
        "mcp.audit.log",
        "mcp.commands.dead",
    ] {
        let e = try_read(&agent, queue)
            .await
            .expect_err(&format!("agent read {queue}"));
        assert!(
            e.contains("ACCESS_REFUSED") || e.contains("access to"),
            "{queue}: {e}"
        );
    }
    let ch = agent.create_channel().await.unwrap();
    let own = format!("reply.{agent_user}.inbox");
    ch.queue_declare(
        own.as_str().into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("agent declares its own reply queue");
    let other = agent.create_channel().await.unwrap();
    assert!(other
        .queue_declare(
            "reply.someone-else.inbox".into(),
            QueueDeclareOptions::default(),
            FieldTable::default()
        )
        .await
        .is_err());

    // The operator may pull the levers.
    let ops = Connection::connect(&defs.url("ops-admin"), Default::default())
        .await
        .unwrap();
    try_publish(
        &ops,
        "mcp.control",
        "control.status",
        &defs.user("ops-admin"),
    )
    .await
    .expect("operator publishes control");
    assert!(
        try_publish(&ops, "mcp.commands", "command.x", &defs.user("ops-admin"))
            .await
            .is_err(),
        "an operator is not an agent"
    );
    let ops = Connection::connect(&defs.url("ops-admin"), Default::default())
        .await
        .unwrap();
    assert!(
        try_publish(
            &ops,
            "mcp.approvals",
            "approval.approve",
            &defs.user("ops-admin")
        )
        .await
        .is_err(),
        "an operator is not an approver"
    );
    // The approver may publish decisions, and nothing else.
    let approver = Connection::connect(&defs.url("approver"), Default::default())
        .await
        .unwrap();
    for (exchange, key) in [
        ("mcp.commands", "command.refresh_token"),
        ("mcp.control", "control.resume"),
        ("mcp.alerts", "security.high"),
        ("", "mcp.approvals"),
    ] {
        let e = try_publish(&approver, exchange, key, &defs.user("approver"))
            .await
            .expect_err(&format!("the approver published to {exchange:?}"));
        assert!(e.contains("ACCESS_REFUSED"), "{exchange}: {e}");
    }
    for queue in ["mcp.approvals", "mcp.commands", "mcp.results"] {
        let e = try_read(&approver, queue)
            .await
            .expect_err(&format!("the approver read {queue}"));
        assert!(e.contains("ACCESS_REFUSED"), "{queue}: {e}");
    }

    // The audit sink may read the audit stream, and can't erase it: no delete (no configure
    // right), and a stream can't be purged (finding 12: the sink's user could delete its queue).
    let sink = Connection::connect(&defs.url("audit-sink"), Default::default())
        .await
        .unwrap();
    let sink_ch = sink.create_channel().await.unwrap();
    sink_ch
        .queue_declare(
            "mcp.audit.log".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the sink sees its stream");
    let e = sink
        .create_channel()
        .await
        .unwrap()
        .queue_delete("mcp.audit.log".into(), QueueDeleteOptions::default())
        .await
        .expect_err("the sink deleted the audit stream");
    assert!(e.to_string().contains("ACCESS_REFUSED"), "{e}");
    let sink = Connection::connect(&defs.url("audit-sink"), Default::default())
        .await
        .unwrap();
    let e = sink
        .create_channel()
        .await
        .unwrap()
        .queue_purge("mcp.audit.log".into(), QueuePurgeOptions::default())
        .await
        .expect_err("the sink purged the audit stream");
    assert!(e.to_string().contains("not supported"), "{e}");

    // The operator: levers only. Not the default exchange (no stored state through it, no
    // commands, alerts or audit records), not the commands queue's contents, not the event queue.
    let ops_user = defs.user("ops-admin");
    let ops = Connection::connect(&defs.url("ops-admin"), Default::default())
        .await
        .unwrap();
    for queue in [
        "mcp.commands",
        "mcp.audit.log",
        "mcp.alerts.security",
        "mcp.control.state.log",
    ] {
        let e = try_publish(&ops, "", queue, &ops_user)
            .await
            .expect_err(&format!(
                "the operator published to {queue} through the default exchange"
            ));
        assert!(e.contains("ACCESS_REFUSED"), "{queue}: {e}");
    }
    let e = try_read(&ops, "mcp.commands")
        .await
        .expect_err("the operator read the commands queue");
    assert!(e.contains("ACCESS_REFUSED"), "{e}");
    for probe in ["purge", "delete-events"] {
        let ch = ops.create_channel().await.unwrap();
        let e = match probe {
            "purge" => ch
                .queue_purge("mcp.commands".into(), QueuePurgeOptions::default())
                .await
                .map(|_| ()),
            _ => ch
                .queue_delete("mcp.control.events".into(), QueueDeleteOptions::default())
                .await
                .map(|_| ()),
        }
        .expect_err(probe)
        .to_string();
        assert!(e.contains("ACCESS_REFUSED"), "{probe}: {e}");
    }
    // …while the queue depth (a passive declare) stays visible.
    ops.create_channel()
        .await
        .unwrap()
        .queue_declare(
            "mcp.commands".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the operator sees the queue depth");

    // KEDA: no permissions at all, and the queue length still readable.
    let keda = Connection::connect(&defs.url("keda"), Default::default())
        .await
        .unwrap();
    let depth = keda
        .create_channel()
        .await
        .unwrap()
        .queue_declare(
            "mcp.commands".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("KEDA reads the queue length");
    let _ = depth.message_count();
    assert!(try_read(&keda, "mcp.commands").await.is_err());
    assert!(
        try_publish(&keda, "mcp.commands", "command.x", &defs.user("keda"))
            .await
            .is_err()
    );

    // The poller publishes audit records but can't read, purge or delete the audit stream (the
    // audited process can't erase its own records).
    let poller_conn = Connection::connect(&defs.url("command-poller"), Default::default())
        .await
        .unwrap();
    let e = try_read(&poller_conn, "mcp.audit.log")
        .await
        .expect_err("the poller read the audit stream");
    assert!(e.contains("ACCESS_REFUSED"), "{e}");
    let e = poller_conn
        .create_channel()
        .await
        .unwrap()
        .queue_delete("mcp.audit.log".into(), QueueDeleteOptions::default())
        .await
        .expect_err("the poller deleted the audit stream")
        .to_string();
    assert!(e.contains("ACCESS_REFUSED"), "{e}");

    // Nor the control state stream or its exchange (item 4 of the levers issue: with them it
    // deleted the stream, and the next replica came up on an empty one during a halt).
    for (what, deleted) in [
        (
            "stream",
            poller_conn
                .create_channel()
                .await
                .unwrap()
                .queue_delete(
                    "mcp.control.state.log".into(),
                    QueueDeleteOptions::default(),
                )
                .await
                .map(|_| ()),
        ),
        (
            "exchange",
            poller_conn
                .create_channel()
                .await
                .unwrap()
                .exchange_delete("mcp.control.state".into(), ExchangeDeleteOptions::default())
                .await,
        ),
    ] {
        let e = deleted
            .expect_err(&format!("the poller deleted the control state {what}"))
            .to_string();
        assert!(e.contains("ACCESS_REFUSED"), "{what}: {e}");
    }

    // The poller runs on its own user: declares the same topology (arguments must match the
    // definitions), consumes the agent's command, publishes the result.
    let mut settings = test_settings(&sfx);
    let defaults = command_poller::settings::Settings::load_isolated(
        std::path::Path::new("config"),
        "production",
    )
    .unwrap();
    settings.topology = defaults.topology.clone();
    settings.control = defaults.control.clone();
    settings.control.operators = vec![defs.user("ops-admin")];
    settings.audit = defaults.audit.clone();
    settings.approval = defaults.approval.clone();
    settings.approval.approvers = vec![defs.user("approver")];
    settings.amqp.url = defs.url("command-poller");
    let sim = Arc::new(
        command_poller::bridge::simulator::start(
            command_poller::bridge::simulator::SimulatorConfig::new(
                command_poller::bridge::signing::Secret::new("defs"),
            ),
            ([127, 0, 0, 1], 0).into(),
        )
        .await
        .unwrap(),
    );
    let policy = Arc::new(command_poller::policy::Policy::load(&settings.policy.file).unwrap());
    let bridge = bridge_client(
        &settings,
        &sim,
        command_poller::bridge::signing::Secret::new("defs"),
    );
    let stores = command_poller::store::open_all(&settings.idempotency)
        .await
        .unwrap();
    let panel = command_poller::compose::build_panel(
        &settings.panel,
        &settings.secrets.judge_api_keys,
        stores.windows.clone(),
    )
    .unwrap();
    let store_path = settings.idempotency.path.clone();
    let operator_settings = settings.clone();
    let poller = command_poller::worker::Poller::new(settings, policy, panel, bridge, stores, None);
    let state = poller.state();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { poller.run(stop).await }
    });
    eventually(
        "the poller connected on its own user",
        Duration::from_secs(15),
        || state.connected.load(std::sync::atomic::Ordering::SeqCst),
    )
    .await;
    // A new deployment's state stream is empty: untrusted, so the poller holds paused until an
    // operator's first lever writes the first entry.
    assert_eq!(state.gate.mode(), command_poller::control::Mode::Paused);
    let ops_node = command_poller::broker::Endpoints::new([defs.url("ops-admin")]).unwrap();
    let report = command_poller::control::operator::Operator::new(
        &operator_settings,
        &ops_node,
        Duration::from_millis(1500),
    )
    .run(command_poller::control::ControlCommand::Resume {
        reason: "bootstrap".into(),
        lift_halt: false,
        post_mortem: Some("PM-test".into()),
        request_id: command_poller::control::operator::new_request_id(),
    })
    .await
    .unwrap();
    assert_eq!(report.replicas.len(), 1, "{report:?}");
    assert_eq!(state.gate.mode(), command_poller::control::Mode::Running);
    // The agent sends a command with a reply queue of its own.
    let mut replies = crate::common::consume_all(&ch, &own).await;
    let pch = agent.create_channel().await.unwrap();
    pch.confirm_select(Default::default()).await.unwrap();
    pch.basic_publish(
        "mcp.commands".into(),
        "command.check_integration_status".into(),
        Default::default(),
        cmd("defs-1", "CHECK_INTEGRATION_STATUS", "mailchimp", "LOW")
            .to_string()
            .as_bytes(),
        BasicProperties::default()
            .with_user_id(agent_user.as_str().into())
            .with_reply_to(own.as_str().into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // Earlier permission probes left a command in the queue too; find ours.
    let r = loop {
        let d = tokio::time::timeout(Duration::from_secs(15), replies.next())
            .await
            .expect("a reply")
            .unwrap()
            .unwrap();
        let r: command_poller::outcome::ResultMessage = serde_json::from_slice(&d.data).unwrap();
        if r.action_id.as_deref() == Some("defs-1") {
            break r;
        }
    };
    assert_eq!(r.status, Status::Success, "{r:?}");
    assert_eq!(r.agent.unwrap().id, agent_user);
    // The operator's own tools work on those rights: status reaches the running replica.
    let mut op_settings = test_settings(&sfx);
    op_settings.topology = defaults.topology.clone();
    op_settings.control = defaults.control.clone();
    op_settings.control.operators = vec![ops_user.clone()];
    let ops_url = defs.url("ops-admin");
    let report = command_poller::control::operator::Operator::new(
        &op_settings,
        &node(&ops_url),
        Duration::from_millis(1500),
    )
    .run(command_poller::control::ControlCommand::Status {
        request_id: command_poller::control::operator::new_request_id(),
    })
    .await
    .expect("status as the least-privileged operator");
    assert_eq!(report.replicas.len(), 1, "{report:?}");
    assert!(report.replicas[0].accepted, "{report:?}");
    assert!(report.queue_depth.is_some());

    // The approver's tools work on its rights: a command the judges refuse is parked, listed
    // and denied by the approver, and the agent gets the DENIED result.
    pch.basic_publish(
        "mcp.commands".into(),
        "command.refresh_token".into(),
        Default::default(),
        cmd("defs-2", "REFRESH_TOKEN", "salesforce", "MEDIUM")
            .to_string()
            .as_bytes(),
        BasicProperties::default()
            .with_user_id(agent_user.as_str().into())
            .with_reply_to(own.as_str().into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let parked = next_result(&mut replies, "defs-2", Status::NeedsApproval).await;
    let approver_url = defs.url("approver");
    let ap = command_poller::approval::approver::Approver {
        settings: &defaults.approval,
        endpoints: node(&approver_url),
        wait: Duration::from_secs(10),
    };
    let list = ap
        .send(&command_poller::approval::wire::Request::List)
        .await
        .expect("approvals list as the least-privileged approver");
    assert_eq!(list.pending.len(), 1, "{list:?}");
    let reply = ap
        .send(&command_poller::approval::wire::Request::Deny {
            approval_id: parked.approval.unwrap().approval_id,
            reason: "not on the plan".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        reply.outcome,
        command_poller::approval::wire::ReplyOutcome::Denied,
        "{reply:?}"
    );
    let denied = next_result(&mut replies, "defs-2", Status::Denied).await;
    assert_eq!(denied.approvals[0].by, defs.user("approver"));
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
    let _ = std::fs::remove_file(store_path);
}

/// The next result of `action_id` with `want` on an agent's reply queue.
async fn next_result(
    replies: &mut lapin::Consumer,
    action_id: &str,
    want: Status,
) -> command_poller::outcome::ResultMessage {
    loop {
        let d = tokio::time::timeout(Duration::from_secs(15), replies.next())
            .await
            .expect("a reply")
            .unwrap()
            .unwrap();
        let r: command_poller::outcome::ResultMessage = serde_json::from_slice(&d.data).unwrap();
        if r.action_id.as_deref() == Some(action_id) && r.status == want {
            return r;
        }
    }
}

/// Item 7 of the levers issue: an agent's user is capped in connections and channels by the
/// definitions (the MCP front door holds one connection per client, a channel per call), so
/// one agent can't take the broker's connections from everyone else.
#[tokio::test]
async fn an_agent_holds_at_most_its_connection_limit() {
    let sfx = suffix();
    let defs = tokio::task::spawn_blocking({
        let sfx = sfx.clone();
        move || Imported::load(&sfx)
    })
    .await
    .unwrap();
    let url = defs.url("agent-marketing");
    let mut held = Vec::new();
    for i in 0..8 {
        let c = Connection::connect(&url, Default::default())
            .await
            .unwrap_or_else(|e| panic!("connection {} refused: {e}", i + 1));
        held.push(c);
    }
    let ninth = Connection::connect(&url, Default::default()).await;
    assert!(ninth.is_err(), "a ninth connection was accepted");
    for c in held {
        let _ = c.close(200, "done".into()).await;
    }
}
