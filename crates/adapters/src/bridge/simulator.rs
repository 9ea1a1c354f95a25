//! A local stand-in for the Apps Script web app, with the same contract and the same quirks:
//! POST `/exec` checks `ts`/`sig`, acts once per agent and action_id (refusing a reused id with
//! a different request), and answers 302 to `/echo`, which
//! must be fetched with GET (POST there is 405). Latency and faults are configurable, and a call
//! log (`GET /_sim/calls`) tells tests how many times each action really executed.
//!
//! It is the embedded default bridge (`bridge.mode = "simulator"`), and what the tests and
//! benchmarks run against.

use super::signing::{verify, Secret};
use super::BridgeRequest;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use poller_core::bridge::Operation;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A fault injected into the next request of a leg.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Fault {
    /// Answer with this HTTP status and a short text body.
    Status { code: u16 },
    /// Answer 200 with an Apps Script-style HTML error page carrying `message`.
    Html { message: String },
    /// Hold the request this long before answering normally.
    Delay { ms: u64 },
}

#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    pub secret: Secret,
    /// Time each execution takes.
    pub latency: Duration,
    /// Accepted clock skew for `ts`.
    pub max_skew_secs: i64,
    /// Services the simulated web app has credentials for.
    pub services: Vec<String>,
}

impl SimulatorConfig {
    pub fn new(secret: Secret) -> Self {
        Self {
            secret,
            latency: Duration::ZERO,
            max_skew_secs: 300,
            services: vec!["mailchimp".into(), "meta".into(), "google".into()],
        }
    }
}

/// What the simulator saw. `executions` counts real side effects per action_id.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CallLog {
    /// POSTs that asked the bridge to act (lookups not included).
    pub posts: HashMap<String, u32>,
    /// POSTs that only asked for a remembered answer (`lookup`).
    #[serde(default)]
    pub lookups: HashMap<String, u32>,
    pub executions: HashMap<String, u32>,
    pub gets: u32,
    pub max_concurrent: usize,
    pub rejected_signatures: u32,
    /// When the latest POST arrived (Unix milliseconds): when the last bridge call started.
    pub last_post_at_ms: u64,
    /// Requests refused because their agent's action_id had answered a different request.
    #[serde(default)]
    pub reused_ids: u32,
    /// When each execution's POST arrived (Unix milliseconds), by action_id: when the call that
    /// acted started, for checking what ran while the fleet was paused.
    #[serde(default)]
    pub executed_posts_at_ms: HashMap<String, Vec<u64>>,
}

impl CallLog {
    pub fn total_executions(&self) -> u32 {
        self.executions.values().sum()
    }
}

#[derive(Default)]
struct Faults {
    post: VecDeque<Fault>,
    get: VecDeque<Fault>,
}

struct SimState {
    cfg: Mutex<SimulatorConfig>,
    log: Mutex<CallLog>,
    /// By dedup key (agent and action_id): the request's digest and the answer given.
    answers: Mutex<HashMap<String, (String, serde_json::Value)>>,
    echoes: Mutex<HashMap<String, serde_json::Value>>,
    faults: Mutex<Faults>,
    in_flight: AtomicUsize,
    /// Services whose stored credentials a revoke or disconnect deleted, by how.
    cut: Mutex<HashMap<String, Operation>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running simulator. Dropping it stops the server.
pub struct SimulatorHandle {
    addr: SocketAddr,
    state: Arc<SimState>,
    stop: CancellationToken,
}

impl Drop for SimulatorHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl SimulatorHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The web app URL to configure the client with.
    pub fn url(&self) -> url::Url {
        url::Url::parse(&format!("http://{}/exec", self.addr)).expect("valid URL")
    }

    pub fn calls(&self) -> CallLog {
        lock(&self.state.log).clone()
    }

    pub fn executions(&self, action_id: &str) -> u32 {
        lock(&self.state.log)
            .executions
            .get(action_id)
            .copied()
            .unwrap_or(0)
    }

    pub fn posts(&self, action_id: &str) -> u32 {
        lock(&self.state.log)
            .posts
            .get(action_id)
            .copied()
            .unwrap_or(0)
    }

    pub fn lookups(&self, action_id: &str) -> u32 {
        lock(&self.state.log)
            .lookups
            .get(action_id)
            .copied()
            .unwrap_or(0)
    }

    pub fn fail_next_posts(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.state.faults).post.extend(faults);
    }

    pub fn fail_next_gets(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.state.faults).get.extend(faults);
    }

    /// Drops every fault still queued: the bridge is healthy again.
    pub fn heal(&self) {
        let mut f = lock(&self.state.faults);
        f.post.clear();
        f.get.clear();
    }
}

/// Starts the simulator on `addr` (use port 0 for any free port).
pub async fn start(cfg: SimulatorConfig, addr: SocketAddr) -> std::io::Result<SimulatorHandle> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(SimState {
        cfg: Mutex::new(cfg),
        log: Mutex::new(CallLog::default()),
        answers: Mutex::new(HashMap::new()),
        echoes: Mutex::new(HashMap::new()),
        faults: Mutex::new(Faults::default()),
        in_flight: AtomicUsize::new(0),
        cut: Mutex::new(HashMap::new()),
    });
    let app = Router::new()
        .route("/exec", post(exec))
        .route("/echo", get(echo).post(echo_post))
        .route("/_sim/calls", get(calls))
        .route("/_sim/faults", post(add_faults))
        .with_state(state.clone());
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(stopped.cancelled_owned());
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "bridge simulator stopped");
        }
    });
    Ok(SimulatorHandle { addr, state, stop })
}

fn html_page(message: &str) -> Response {
    let body = format!(
        "<!DOCTYPE html><html><head><title>Error</title><style>body{{font-family:Arial}}</style></head>\
         <body><div style=\"margin:20px\"><div>{message}</div></div></body></html>"
    );
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn apply(fault: Option<Fault>) -> Option<Response> {
    match fault? {
        Fault::Status { code } => {
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Some((code, "simulated failure").into_response())
        }
        Fault::Html { message } => Some(html_page(&message)),
        Fault::Delay { ms } => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            None
        }
    }
}

struct InFlight<'a>(&'a AtomicUsize);
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn error_json(error: &str, retryable: bool) -> serde_json::Value {
    serde_json::json!({"status": "error", "error": error, "retryable": retryable})
}

async fn exec(
    State(st): State<Arc<SimState>>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    let _guard = InFlight(&st.in_flight);
    let parsed: Option<BridgeRequest> = serde_json::from_slice(&body).ok();
    let arrived_ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as u64 / 1_000_000;
    {
        let mut log = lock(&st.log);
        log.max_concurrent = log.max_concurrent.max(now);
        log.last_post_at_ms = arrived_ms;
        match &parsed {
            Some(r) if r.lookup => *log.lookups.entry(r.action_id.clone()).or_default() += 1,
            Some(r) => *log.posts.entry(r.action_id.clone()).or_default() += 1,
            None => {}
        }
    }
    // A fault on the POST leg strikes before doPost runs: nothing executes.
    let fault = lock(&st.faults).post.pop_front();
    if let Some(resp) = apply(fault).await {
        return resp;
    }
    let cfg = lock(&st.cfg).clone();
    let answer = 'answer: {
        let ts = q.get("ts").and_then(|t| t.parse::<i64>().ok());
        let sig = q.get("sig");
        let (Some(ts), Some(sig)) = (ts, sig) else {
            break 'answer error_json("missing ts or sig", false);
        };
        let skew = (time::OffsetDateTime::now_utc().unix_timestamp() - ts).abs();
        if skew > cfg.max_skew_secs {
            lock(&st.log).rejected_signatures += 1;
            break 'answer error_json("request timestamp outside the accepted window", false);
        }
        if !verify(&cfg.secret, ts, &body, sig) {
            lock(&st.log).rejected_signatures += 1;
            break 'answer error_json("bad signature", false);
        }
        let Some(req) = parsed else {
            break 'answer error_json("body is not a bridge request", false);
        };
        let (key, digest) = (req.dedup_key(), req.digest());
        if let Some(previous) = remembered(&st, &key, &digest) {
            break 'answer previous;
        }
        if req.lookup {
            // Never acts: only what it remembers.
            break 'answer serde_json::json!({
                "status": "error",
                "error": "no answer remembered for this request; whether it ran is unknown",
                "retryable": false,
                "remembered": false,
            });
        }
        if !cfg.latency.is_zero() {
            tokio::time::sleep(cfg.latency).await;
        }
        // Re-check after the wait: a concurrent duplicate may have acted meanwhile.
        if let Some(previous) = remembered(&st, &key, &digest) {
            break 'answer previous;
        }
        let mut answers = lock(&st.answers);
        let a = act(&cfg, &mut lock(&st.cut), &req);
        {
            let mut log = lock(&st.log);
            *log.executions.entry(req.action_id.clone()).or_default() += 1;
            log.executed_posts_at_ms
                .entry(req.action_id.clone())
                .or_default()
                .push(arrived_ms);
        }
        let retryable = a
            .get("retryable")
            .and_then(|r| r.as_bool())
            .unwrap_or(false);
        if !retryable {
            answers.insert(key, (digest, a.clone()));
        }
        a
    };
    let key = uuid::Uuid::new_v4().simple().to_string();
    lock(&st.echoes).insert(key.clone(), answer);
    (
        StatusCode::FOUND,
        [(header::LOCATION, format!("/echo?user_content_key={key}"))],
    )
        .into_response()
}

/// The answer remembered for `key`; a refusal when it was given to a different request (a
/// reused action_id), so one request's answer never answers another.
fn remembered(st: &SimState, key: &str, digest: &str) -> Option<serde_json::Value> {
    let answers = lock(&st.answers);
    let (d, answer) = answers.get(key)?;
    if d == digest {
        return Some(answer.clone());
    }
    lock(&st.log).reused_ids += 1;
    Some(error_json(
        "action_id already used by this agent for a different request; refused (use a new action_id)",
        false,
    ))
}

fn act(
    cfg: &SimulatorConfig,
    cut: &mut HashMap<String, Operation>,
    req: &BridgeRequest,
) -> serde_json::Value {
    let service = &req.params.service;
    if req.command_type == Operation::ConnectIntegration {
        return error_json(
            "CONNECT_INTEGRATION refused by bridge policy: new integrations require manual security and permissions review",
            false,
        );
    }
    if !cfg.services.iter().any(|s| s == service) {
        return error_json(
            &format!("service {service} is not configured in the bridge"),
            false,
        );
    }
    let now = poller_core::clock::now_rfc3339();
    match (req.command_type, cut.get(service.as_str())) {
        (Operation::CheckIntegrationStatus, gone) => serde_json::json!({
            "status": "success",
            "integration_status": if gone.is_some() { "NOT_CONNECTED" } else { "CONNECTED" },
            "last_checked": now,
        }),
        (Operation::RefreshToken, Some(_)) => error_json(
            &format!("{service}: no stored credentials (revoked or disconnected); reconnect it by hand (SOP-INT-03)"),
            false,
        ),
        (Operation::RefreshToken, None) => serde_json::json!({
            "status": "success",
            "message": format!("Token for {service} refreshed successfully."),
            "new_token_expires_in": 3600,
        }),
        (op @ (Operation::RevokeCredentials | Operation::DisconnectIntegration), _) => {
            cut.insert(service.clone(), op);
            cut_answer(service, op, now)
        }
        (Operation::ConnectIntegration, _) => unreachable!("refused above"),
    }
}

/// What the web app answers a revoke or disconnect: what was done to each credential, with
/// the same per-service capabilities (Google and Meta revoke at the provider; a Mailchimp API
/// key can only be revoked in its admin page).
fn cut_answer(service: &str, op: Operation, now: String) -> serde_json::Value {
    const BY_HAND: &str = "deleted locally, revoke by hand at ";
    let disconnect = op == Operation::DisconnectIntegration;
    let mut credentials: Vec<(&str, String)> = match service {
        "google" => vec![
            ("GOOGLE_REFRESH_TOKEN", "revoked at provider".into()),
            ("GOOGLE_ACCESS_TOKEN", "revoked at provider".into()),
        ],
        "meta" => vec![("META_ACCESS_TOKEN", "revoked at provider".into())],
        _ => vec![(
            "MAILCHIMP_API_KEY",
            format!("{BY_HAND}https://admin.mailchimp.com/account/api/"),
        )],
    };
    match service {
        "google" if disconnect => credentials.push((
            "GOOGLE_CLIENT_SECRET",
            format!("{BY_HAND}https://console.cloud.google.com/apis/credentials"),
        )),
        "meta" if disconnect => credentials.push((
            "META_APP_SECRET",
            format!("{BY_HAND}https://developers.facebook.com/apps/"),
        )),
        _ => {}
    }
    serde_json::json!({
        "status": "success",
        "operation": op,
        "service": service,
        "integration_status": if disconnect { "DISCONNECTED" } else { "REVOKED" },
        "credentials": credentials
            .into_iter()
            .map(|(c, o)| serde_json::json!({"credential": c, "outcome": o}))
            .collect::<Vec<_>>(),
        "done_at": now,
    })
}

async fn echo(
    State(st): State<Arc<SimState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    lock(&st.log).gets += 1;
    let fault = lock(&st.faults).get.pop_front();
    if let Some(resp) = apply(fault).await {
        return resp;
    }
    let answer = q
        .get("user_content_key")
        .and_then(|k| lock(&st.echoes).get(k).cloned());
    match answer {
        Some(a) => Json(a).into_response(),
        None => html_page("Sorry, unable to open the file at this time."),
    }
}

async fn echo_post(_headers: HeaderMap) -> Response {
    (StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed").into_response()
}

async fn calls(State(st): State<Arc<SimState>>) -> Json<CallLog> {
    Json(lock(&st.log).clone())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultRequest {
    #[serde(default)]
    post: Vec<Fault>,
    #[serde(default)]
    get: Vec<Fault>,
}

async fn add_faults(State(st): State<Arc<SimState>>, Json(f): Json<FaultRequest>) -> StatusCode {
    let mut faults = lock(&st.faults);
    faults.post.extend(f.post);
    faults.get.extend(f.get);
    StatusCode::NO_CONTENT
}
