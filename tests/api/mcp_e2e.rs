//! The MCP front door driven by a real MCP client: the official Python SDK (`mcp` on PyPI, in
//! the virtualenv `scripts/test.sh` makes at `target/mcp-venv`; `MCP_PYTHON` overrides it), over
//! stdio, against the poller and the real broker.

use crate::common::*;
use command_poller::approval::approver::Approver;
use command_poller::approval::wire::{ReplyOutcome, Request};
use command_poller::testing::Script;
use serde_json::{json, Value};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

const BIN: &str = env!("CARGO_BIN_EXE_command-poller");

fn python() -> String {
    std::env::var("MCP_PYTHON").unwrap_or_else(|_| "target/mcp-venv/bin/python".into())
}

/// One agent's MCP host: the Python client, which launches `command-poller mcp` as that agent.
struct Host {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Host {
    fn start(h: &Harness, agent: &BrokerUser, timeout_secs: u64) -> Host {
        let py = python();
        assert!(
            std::path::Path::new(&py).exists(),
            "{py}: the MCP client's Python (scripts/test.sh makes target/mcp-venv with `mcp`)"
        );
        let mut cmd = tokio::process::Command::new(py);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(poller_env(&h.settings))
            .env("AGENT_AMQP_URL", agent.url())
            .env("RUST_LOG", "warn")
            .args(["tests/mcp/client.py", BIN, "mcp", "--timeout-secs"])
            .arg(timeout_secs.to_string());
        Host::spawn(cmd)
    }

    /// Runs the client with its stdin and stdout as the request and answer pipes.
    fn spawn(mut cmd: tokio::process::Command) -> Host {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("the MCP client starts");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Host {
            child,
            stdin,
            lines,
        }
    }

    async fn ask(&mut self, req: Value) -> Value {
        self.stdin
            .write_all(format!("{req}\n").as_bytes())
            .await
            .unwrap();
        let line = tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
            .await
            .expect("the MCP client answers")
            .unwrap()
            .expect("the MCP client is still running");
        serde_json::from_str(&line).unwrap()
    }

    async fn call(&mut self, tool: &str, args: Value) -> Value {
        self.ask(json!({"tool": tool, "args": args})).await
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

async fn world() -> Harness {
    Harness::start(Options {
        panel: Some(command_poller::testing::scripted_panel(
            vec![("security", Script::Deny, 0), ("business", Script::Deny, 0)],
            Duration::from_secs(2),
            2,
        )),
        tweak: Box::new(|s| s.approval.approvers = vec!["guest".into()]),
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn an_agent_carries_out_the_runbook_through_mcp_tools() {
    let mut h = world().await;
    let (agent, other) = (BrokerUser::create(), BrokerUser::create());
    let mut host = Host::start(&h, &agent, 20);

    // The tools, their schemas and annotations.
    let list = host.ask(json!({"list": true})).await;
    let tools = list["tools"].as_array().unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 4, "{names:?}");
    for n in [
        "check_integration_status",
        "refresh_token",
        "connect_integration",
        "get_action",
    ] {
        assert!(names.contains(&n), "{names:?}");
    }
    let tool = |n: &str| tools.iter().find(|t| t["name"] == n).unwrap().clone();
    assert_eq!(
        tool("check_integration_status")["annotations"]["readOnlyHint"],
        true
    );
    assert_eq!(tool("get_action")["annotations"]["readOnlyHint"], true);
    assert_eq!(
        tool("connect_integration")["annotations"]["destructiveHint"],
        true
    );
    let schema = &tool("refresh_token")["inputSchema"];
    assert!(
        schema["properties"]["service"]["pattern"].is_string(),
        "{schema}"
    );
    assert_eq!(schema["required"], json!(["service"]));

    // SOP-INT-01: SUCCESS with the runbook's tool result.
    let r = host
        .call("check_integration_status", json!({"service": "mailchimp"}))
        .await;
    assert_eq!(r["is_error"], false, "{r}");
    assert_eq!(r["structured"]["status"], "SUCCESS", "{r}");
    assert!(r["structured"]["tool_result"].is_object(), "{r}");
    assert!(r["text"].as_str().unwrap().starts_with("SUCCESS"));
    // Under the agent's own broker identity, never the poller's or an operator's.
    assert_eq!(
        r["structured"]["agent"],
        json!({"id": agent.0, "verified": true})
    );

    // SOP-INT-03: BLOCKED with the runbook's rationale; humans alerted, nothing executed.
    let r = host
        .call(
            "connect_integration",
            json!({"service": "salesforce", "severity": "LOW"}),
        )
        .await;
    assert_eq!(r["structured"]["status"], "BLOCKED", "{r}");
    let text = r["text"].as_str().unwrap();
    assert!(
        text.contains("New integrations require manual security and permissions review"),
        "{text}"
    );
    assert!(text.contains("Humans were alerted"), "{text}");

    // SOP-INT-02: NEEDS_APPROVAL at once, with the approval id and expiry; progress reported.
    let r = host
        .call(
            "refresh_token",
            json!({"service": "google", "action_id": "mcp-refresh-1"}),
        )
        .await;
    assert_eq!(r["structured"]["status"], "NEEDS_APPROVAL", "{r}");
    assert!(!r["progress"].as_array().unwrap().is_empty(), "{r}");
    let ticket = r["structured"]["approval"].clone();
    assert!(r["text"].as_str().unwrap().contains("get_action"));
    assert_eq!(h.sim.executions("mcp-refresh-1"), 0);
    // A human approves (guest: an approver, not the agent).
    let reply = Approver {
        settings: &h.settings.approval,
        endpoints: node(AMQP),
        wait: Duration::from_secs(10),
    }
    .send(&Request::Approve {
        approval_id: ticket["approval_id"].as_str().unwrap().into(),
        digest: ticket["digest"].as_str().unwrap().into(),
        reason: "ok for the MCP agent".into(),
    })
    .await
    .unwrap();
    assert_eq!(reply.outcome, ReplyOutcome::Approved, "{reply:?}");
    // get_action follows it to its final status, executing nothing itself.
    let deadline = Instant::now() + Duration::from_secs(20);
    let done = loop {
        let r = host
            .call("get_action", json!({"action_id": "mcp-refresh-1"}))
            .await;
        if r["structured"]["status"] == "SUCCESS" {
            break r;
        }
        assert_eq!(r["structured"]["status"], "NEEDS_APPROVAL", "{r}");
        assert!(Instant::now() < deadline, "never approved: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(done["structured"]["approvals"][0]["by"], "guest");
    assert_eq!(h.sim.executions("mcp-refresh-1"), 1);

    // An invalid service is a tool error naming the field; nothing is sent.
    let r = host
        .call("refresh_token", json!({"service": "Google Ads"}))
        .await;
    assert_eq!(r["is_error"], true, "{r}");
    assert!(r["text"].as_str().unwrap().contains("service"), "{r}");

    // Another agent through its own front door can't read this agent's action: not through
    // get_action, and the same action_id is a separate action of its own.
    let mut second = Host::start(&h, &other, 20);
    let r = second
        .call("get_action", json!({"action_id": "mcp-refresh-1"}))
        .await;
    assert_eq!(r["is_error"], true, "{r}");
    assert!(r["structured"].is_null(), "{r}");
    let r = second
        .call(
            "refresh_token",
            json!({"service": "google", "action_id": "mcp-refresh-1"}),
        )
        .await;
    assert_eq!(r["structured"]["status"], "NEEDS_APPROVAL", "{r}");
    assert_eq!(r["structured"]["agent"]["id"], other.0.as_str());
    assert!(r["structured"]["approvals"].is_null(), "{r}");

    // The poller stopped: a tool error within the deadline, never a hang.
    h.stop().await;
    let mut short = Host::start(&h, &agent, 3);
    let started = Instant::now();
    let r = short
        .call("check_integration_status", json!({"service": "google"}))
        .await;
    assert_eq!(r["is_error"], true, "{r}");
    assert!(
        r["text"]
            .as_str()
            .unwrap()
            .contains("no result from the poller within"),
        "{r}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

impl Host {
    /// A host on the streamable HTTP transport at `url`, authenticated with `token`.
    fn http(url: &str, token: &str) -> Host {
        let mut cmd = tokio::process::Command::new(python());
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("MCP_TOKEN", token)
            .args(["tests/mcp/client.py", url]);
        Host::spawn(cmd)
    }
}

fn sha256(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

#[tokio::test]
async fn over_streamable_http_each_client_is_its_own_agent() {
    let h = world().await;
    let (a, b) = (BrokerUser::create(), BrokerUser::create());
    let (ta, tb) = (
        format!("token-a-{}", suffix()),
        format!("token-b-{}", suffix()),
    );
    let file = std::env::temp_dir().join(format!("mcp-clients-{}.json", suffix()));
    std::fs::write(
        &file,
        json!({"clients": [
            {"token_sha256": sha256(&ta), "amqp_url": a.url()},
            {"token_sha256": sha256(&tb), "amqp_url": b.url()},
        ]})
        .to_string(),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    // Readable by others: refused, it holds broker passwords.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let run = |file: &std::path::Path| {
        let mut c = crate::common::isolated(BIN);
        c.envs(poller_env(&h.settings))
            .args(["mcp", "--timeout-secs", "20", "--http"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--clients")
            .arg(file);
        c
    };
    let out = run(&file).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chmod 600"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut server = run(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/mcp");
    // No token, or a wrong one: 401 before any MCP.
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let unauthenticated = loop {
        match http
            .post(&url)
            .header("authorization", "Bearer not-a-client")
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
        {
            Ok(r) => break r,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "the HTTP front door never answered: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(unauthenticated.status(), 401);

    // Item 8 of the levers issue: a session answers only the token that opened it, and a page
    // of a foreign Origin is refused (the MCP specification requires servers to check it).
    let initialize = |token: &str, session: Option<&str>, origin: Option<&str>| {
        let mut r = http
            .post(&url)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(
                json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                    "protocolVersion": "2025-06-18", "capabilities": {},
                    "clientInfo": {"name": "t", "version": "0"}}})
                .to_string(),
            );
        if let Some(s) = session {
            r = r.header("mcp-session-id", s);
        }
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send()
    };
    let opened = initialize(&ta, None, None).await.unwrap();
    assert_eq!(opened.status(), 200);
    let session = opened.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let stolen = initialize(&tb, Some(&session), None).await.unwrap();
    assert_eq!(stolen.status(), 403, "B was served on A's session");
    let unknown = initialize(&ta, Some("no-such-session"), None)
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let foreign = initialize(&ta, None, Some("http://evil.example"))
        .await
        .unwrap();
    assert_eq!(foreign.status(), 403, "a foreign Origin was served");
    let local = initialize(&ta, None, Some(&format!("http://localhost:{port}")))
        .await
        .unwrap();
    assert_eq!(local.status(), 200);

    let mut host_a = Host::http(&url, &ta);
    let mut host_b = Host::http(&url, &tb);
    let ra = host_a
        .call("check_integration_status", json!({"service": "google"}))
        .await;
    let rb = host_b
        .call("check_integration_status", json!({"service": "google"}))
        .await;
    assert_eq!(ra["structured"]["agent"]["id"], a.0.as_str(), "{ra}");
    assert_eq!(rb["structured"]["agent"]["id"], b.0.as_str(), "{rb}");
    assert_eq!(ra["structured"]["status"], "SUCCESS");
    // A's action is not B's to read.
    let r = host_a
        .call(
            "refresh_token",
            json!({"service": "google", "action_id": "http-1"}),
        )
        .await;
    assert_eq!(r["structured"]["status"], "NEEDS_APPROVAL", "{r}");
    let r = host_b
        .call("get_action", json!({"action_id": "http-1"}))
        .await;
    assert_eq!(r["is_error"], true, "{r}");
    let r = host_a
        .call("get_action", json!({"action_id": "http-1"}))
        .await;
    assert_eq!(r["structured"]["status"], "NEEDS_APPROVAL", "{r}");
    assert_eq!(r["structured"]["agent"]["id"], a.0.as_str());
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_file(&file);
}

/// Broker connections open as `user`.
fn connections_of(user: &str) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "user"])
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim() == user)
        .count()
}

/// Items 7 and 8 of the levers issue: one client's calls each held a broker connection, a
/// thread and megabytes, and its sessions were unbounded. Now a client holds one broker
/// connection (a channel per call), at most `mcp.max_calls_in_flight` requests in flight and
/// `mcp.max_sessions` live sessions (429 beyond), and pages of `mcp.allowed_origins` are served
/// besides loopback ones.
#[tokio::test]
async fn over_streamable_http_a_client_is_capped_and_holds_one_broker_connection() {
    let mut h = world().await;
    let a = BrokerUser::create();
    let token = format!("token-c-{}", suffix());
    let file = std::env::temp_dir().join(format!("mcp-clients-{}.json", suffix()));
    std::fs::write(
        &file,
        json!({"clients": [{"token_sha256": sha256(&token), "amqp_url": a.url()}]}).to_string(),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = crate::common::isolated(BIN)
        .envs(poller_env(&h.settings))
        .env("POLLER__MCP__MAX_SESSIONS", "2")
        .env("POLLER__MCP__MAX_CALLS_IN_FLIGHT", "2")
        .env("POLLER__MCP__ALLOWED_ORIGINS", "https://agents.example")
        .args(["mcp", "--timeout-secs", "4", "--http"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--clients")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/mcp");
    let http = reqwest::Client::new();
    let post = |session: Option<&str>, origin: Option<&str>, body: Value| {
        let mut r = http
            .post(&url)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-06-18")
            .body(body.to_string());
        if let Some(s) = session {
            r = r.header("mcp-session-id", s);
        }
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send()
    };
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "t", "version": "0"}}});
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        match post(None, Some("https://agents.example"), init.clone()).await {
            Ok(r) => break r,
            Err(e) => {
                assert!(Instant::now() < deadline, "never answered: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(first.status(), 200, "a configured Origin was refused");
    let s1 = first.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let foreign = post(None, Some("https://evil.example"), init.clone())
        .await
        .unwrap();
    assert_eq!(foreign.status(), 403);

    // Sessions: two live at most; ending one makes room.
    let second = post(None, None, init.clone()).await.unwrap();
    assert_eq!(second.status(), 200);
    let s2 = second.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let third = post(None, None, init.clone()).await.unwrap();
    assert_eq!(third.status(), 429, "a third session was opened");
    let ended = http
        .delete(&url)
        .header("authorization", format!("Bearer {token}"))
        .header("mcp-session-id", &s2)
        .header("mcp-protocol-version", "2025-06-18")
        .send()
        .await
        .unwrap();
    assert!(ended.status().is_success(), "{}", ended.status());
    let again = post(None, None, init.clone()).await.unwrap();
    assert_eq!(again.status(), 200, "ending a session made no room");

    // Calls: one broker connection however many calls, a channel each.
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let r = post(Some(&s1), None, initialized).await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let call = |id: u64| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
            "name": "check_integration_status", "arguments": {"service": "google"}}})
    };
    for id in 10..14 {
        let r = post(Some(&s1), None, call(id)).await.unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert!(text.contains("SUCCESS"), "{text}");
    }
    assert_eq!(connections_of(&a.0), 1, "one broker connection per client");

    // In flight: with the poller stopped, two calls wait for their deadline; a third is refused.
    h.stop().await;
    let w1 = post(Some(&s1), None, call(20)).await.unwrap();
    let w2 = post(Some(&s1), None, call(21)).await.unwrap();
    assert_eq!((w1.status().as_u16(), w2.status().as_u16()), (200, 200));
    let over = post(Some(&s1), None, call(22)).await.unwrap();
    assert_eq!(over.status(), 429, "a third call in flight was taken");
    for w in [w1, w2] {
        let text = w.text().await.unwrap();
        assert!(text.contains("no result from the poller"), "{text}");
    }
    let after = post(Some(&s1), None, call(23)).await.unwrap();
    assert_eq!(
        after.status(),
        200,
        "the finished calls gave their places back"
    );
    let _ = after.text().await;
    assert_eq!(connections_of(&a.0), 1, "one broker connection per client");
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_file(&file);
}

/// Item 9 of the levers issue: `get_action` used to send the command again, so for an action
/// older than the store's retention it was judged and posted to the bridge a second time. It is
/// now a lookup the poller answers from the store to the asker only: the stored outcome while
/// it is kept, EXPIRED once it is gone, and never a bridge call or a new result.
#[tokio::test]
async fn get_action_is_a_lookup_and_never_acts_on_an_action_older_than_retention() {
    let mut s = test_settings(&suffix()).idempotency;
    s.backend = command_poller::store::Backend::Redis;
    s.url = REDIS.into();
    s.key_prefix = format!("t-{}", suffix());
    let prefix = s.key_prefix.clone();
    let store = command_poller::store::open(&s).await.unwrap();
    let h = Harness::start(Options {
        store: Some(store),
        ..Default::default()
    })
    .await;
    let agent = BrokerUser::create();
    let mut host = Host::start(&h, &agent, 10);
    let r = host
        .call(
            "check_integration_status",
            json!({"service": "google", "action_id": "old-1"}),
        )
        .await;
    assert_eq!(r["structured"]["status"], "SUCCESS", "{r}");
    assert_eq!(h.sim.posts("old-1"), 1);

    // While it is kept: the stored outcome, marked as such.
    let r = host.call("get_action", json!({"action_id": "old-1"})).await;
    assert_eq!(r["structured"]["status"], "SUCCESS", "{r}");
    assert_eq!(r["structured"]["replay"], true, "{r}");
    assert!(
        r["text"].as_str().unwrap().contains("the stored outcome"),
        "{r}"
    );

    // Retention runs out: the store forgets the result (Redis drops the key at its TTL).
    let mut redis = redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let dropped: i64 = redis::cmd("DEL")
        .arg(format!("{prefix}:done:{}/old-1", agent.0))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(dropped, 1, "the stored result's key");
    let r = host.call("get_action", json!({"action_id": "old-1"})).await;
    assert_eq!(r["structured"]["status"], "EXPIRED", "{r}");
    let text = r["text"].as_str().unwrap();
    assert!(text.contains("Nothing is stored"), "{text}");
    assert!(
        text.contains("Nothing was sent, judged or executed"),
        "{text}"
    );

    settle().await;
    assert_eq!(
        h.sim.posts("old-1"),
        1,
        "the lookup posted the action again"
    );
    let published = h
        .inbox
        .lock()
        .unwrap()
        .results
        .iter()
        .filter(|(_, r)| r.action_id.as_deref() == Some("old-1"))
        .count();
    assert_eq!(
        published, 1,
        "a lookup's answer goes to the asker only, never to the results exchange"
    );
}
