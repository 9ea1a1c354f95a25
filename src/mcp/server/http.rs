//! The streamable HTTP transport: each client authenticates with its own bearer token, mapped
//! (in a secret file) to its own agent's broker credentials; served on loopback only (put a
//! TLS-terminating proxy in front).

use super::{FrontDoor, Tools};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The clients file: `{"clients": [{"token_sha256": "<hex>", "amqp_url": "amqp://agent:…"}]}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    clients: Vec<Entry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    token_sha256: String,
    amqp_url: String,
}

/// The authenticated clients: a token's SHA-256 → that agent's front door.
#[derive(Clone)]
pub struct Clients(Arc<HashMap<String, Arc<FrontDoor>>>);

impl Clients {
    /// Reads the clients file. It holds the agents' broker passwords: refused when anyone
    /// but its owner may read it, and when two clients would share a broker identity.
    pub fn load(
        path: &std::path::Path,
        commands_exchange: &str,
        deadline: Duration,
    ) -> Result<Self, String> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(format!(
                    "{}: readable by others (mode {:o}); it holds broker passwords: chmod 600 it",
                    path.display(),
                    mode & 0o777
                ));
            }
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file: File = serde_json::from_str(&text).map_err(|e| {
            format!(
                "{}: {e} (expected {{\"clients\": [{{\"token_sha256\", \"amqp_url\"}}]}})",
                path.display()
            )
        })?;
        let mut by_token = HashMap::new();
        let mut users = std::collections::HashSet::new();
        for (i, c) in file.clients.into_iter().enumerate() {
            if c.token_sha256.len() != 64 || !c.token_sha256.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(format!(
                    "clients[{i}].token_sha256: 64 hexadecimal characters expected"
                ));
            }
            let endpoints = crate::broker::Endpoints::parse(&c.amqp_url)
                .map_err(|e| format!("clients[{i}].amqp_url: {e}"))?;
            let user = endpoints.user();
            if !users.insert(user.clone()) {
                return Err(format!("clients[{i}]: broker user {user} is already another client's: every client is its own agent"));
            }
            by_token.insert(
                c.token_sha256.to_ascii_lowercase(),
                Arc::new(FrontDoor::new(
                    endpoints,
                    commands_exchange.to_owned(),
                    deadline,
                )),
            );
        }
        if by_token.is_empty() {
            return Err(format!("{}: no clients", path.display()));
        }
        Ok(Self(Arc::new(by_token)))
    }

    fn find(&self, token: &str) -> Option<Arc<FrontDoor>> {
        self.0
            .get(&hex::encode(Sha256::digest(token.as_bytes())))
            .cloned()
    }
}

/// What the authentication layer holds: the clients, which token opened each session, the
/// sessions alive, and each client's requests in flight.
#[derive(Clone)]
struct Door {
    clients: Clients,
    /// `Mcp-Session-Id` → (the SHA-256 of the token that opened it, when).
    sessions: Arc<std::sync::Mutex<HashMap<String, (String, std::time::Instant)>>>,
    /// The sessions the server keeps (those gone idle are dropped by it).
    manager: Arc<LocalSessionManager>,
    /// Each client's requests in flight (by token SHA-256), capped.
    in_flight: Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>>,
    limits: Arc<crate::settings::McpSettings>,
    /// `limits.allowed_origins`, as browsers send them.
    origins: Arc<Vec<String>>,
}

impl Door {
    /// The client's in-flight gate.
    fn gate(&self, digest: &str) -> Arc<tokio::sync::Semaphore> {
        let mut g = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        g.entry(digest.to_owned())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Semaphore::new(self.limits.max_calls_in_flight))
            })
            .clone()
    }

    /// Sessions the client opened that the server still keeps (bindings of ended ones go).
    async fn live_sessions(&self, digest: &str) -> usize {
        let live = self.manager.sessions.read().await;
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        s.retain(|id, _| live.contains_key(id.as_str()));
        s.values().filter(|(t, _)| t == digest).count()
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        origin_allowed(origin)
            || url::Url::parse(origin)
                .is_ok_and(|u| self.origins.contains(&u.origin().ascii_serialization()))
    }
}

fn too_many(what: &str) -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, "1")],
        what.to_owned(),
    )
        .into_response()
}

/// How long a session stays bound to its token after it opened (longer than any session
/// the server keeps).
const SESSION_BINDING: Duration = Duration::from_secs(24 * 3600);
/// Bindings kept at most; the oldest go first.
const MAX_BINDINGS: usize = 10_000;

/// True when `origin` is a loopback page (`http(s)://127.0.0.1|localhost|[::1]`, any port):
/// the MCP specification requires servers to validate Origin on streamable HTTP, so a web
/// page elsewhere can't drive an agent's tools through a browser on this machine.
pub fn origin_allowed(origin: &str) -> bool {
    url::Url::parse(origin).is_ok_and(|u| {
        matches!(u.scheme(), "http" | "https")
            && match u.host() {
                Some(url::Host::Domain(d)) => d == "localhost",
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                None => false,
            }
    })
}

/// Puts the client's front door on the request, or answers 401; refuses a foreign Origin
/// (403) and a session opened with another client's token (403).
/// The door's check of every request: the page's origin, the client's token, the session it
/// names (its own, and known) or a new one within the client's cap, and a place among the
/// client's calls in flight, held until the answer's body is done.
async fn authenticate(State(door): State<Door>, mut req: Request, next: Next) -> Response {
    if let Some(refusal) = origin_refused(&door, &req) {
        return refusal;
    }
    let (digest, d) = match client_of(&door, &req) {
        Ok(client) => client,
        Err(refusal) => return *refusal,
    };
    let asked = req
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(refusal) = session_refused(&door, asked.as_deref(), &digest).await {
        return refusal;
    }
    // A POST (a call) holds its place until its answer's body is done (a tool call's answer
    // streams); the GET stream of server messages is one per session, capped with them.
    let permit = if req.method() == axum::http::Method::POST {
        match door.gate(&digest).try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                tracing::warn!(
                    max = door.limits.max_calls_in_flight,
                    "mcp http: a client over its requests in flight refused"
                );
                return too_many(
                    "this client has as many requests in flight as it may: wait for one to finish",
                );
            }
        }
    } else {
        None
    };
    req.extensions_mut().insert(d);
    let resp = next.run(req).await;
    let resp = resp.map(|body| {
        use futures::StreamExt;
        axum::body::Body::from_stream(body.into_data_stream().map(move |chunk| {
            let _held = &permit;
            chunk
        }))
    });
    if asked.is_none() {
        bind_session(&door, &resp, digest);
    }
    resp
}

/// A page from an origin that may not use the door: refused.
fn origin_refused(door: &Door, req: &Request) -> Option<Response> {
    let origin = req.headers().get(header::ORIGIN)?;
    if origin.to_str().is_ok_and(|o| door.origin_allowed(o)) {
        return None;
    }
    tracing::warn!("mcp http: a request from a foreign Origin refused");
    Some(
        (
            StatusCode::FORBIDDEN,
            "this Origin may not use the front door",
        )
            .into_response(),
    )
}

/// The client whose bearer token the request carries (its token's digest and its door), or
/// the refusal.
fn client_of(door: &Door, req: &Request) -> Result<(String, Arc<FrontDoor>), Box<Response>> {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    let Some((token, d)) = token.and_then(|t| door.clients.find(&t).map(|d| (t, d))) else {
        tracing::warn!("mcp http: a request without a known bearer token refused");
        return Err(Box::new(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "a bearer token of a configured client is required",
            )
                .into_response(),
        ));
    };
    Ok((hex::encode(Sha256::digest(token.as_bytes())), d))
}

/// The session the request names must be this client's and known; a request that opens one
/// must fit within the client's sessions.
async fn session_refused(door: &Door, asked: Option<&str>, digest: &str) -> Option<Response> {
    let Some(id) = asked else {
        if door.live_sessions(digest).await >= door.limits.max_sessions {
            tracing::warn!(
                max = door.limits.max_sessions,
                "mcp http: a client over its sessions refused"
            );
            return Some(too_many(
                "this client holds as many sessions as it may: end one (DELETE) or let one go idle",
            ));
        }
        return None;
    };
    let bound = door
        .sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(id)
        .map(|(t, _)| t.clone());
    match bound {
        Some(t) if t == digest => None,
        Some(_) => {
            tracing::warn!("mcp http: a session used with another client's token refused");
            Some(
                (
                    StatusCode::FORBIDDEN,
                    "this session belongs to another client",
                )
                    .into_response(),
            )
        }
        // Every session this door opened is bound: an unknown one is gone (the client
        // initializes again, as the specification says for a 404).
        None => Some((StatusCode::NOT_FOUND, "no such session").into_response()),
    }
}

/// Binds the session a new request opened to the client that opened it (the oldest binding
/// makes room when there are too many).
fn bind_session(door: &Door, resp: &Response, digest: String) {
    let Some(id) = resp
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
    else {
        return;
    };
    let now = std::time::Instant::now();
    let mut s = door.sessions.lock().unwrap_or_else(|p| p.into_inner());
    s.retain(|_, (_, at)| now.duration_since(*at) < SESSION_BINDING);
    if s.len() >= MAX_BINDINGS {
        if let Some(oldest) = s
            .iter()
            .min_by_key(|(_, (_, at))| *at)
            .map(|(k, _)| k.clone())
        {
            s.remove(&oldest);
        }
    }
    s.insert(id.to_owned(), (digest, now));
}

/// Serves the tools at `/mcp` on `listener` (loopback only) until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    clients: Clients,
    limits: crate::settings::McpSettings,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        anyhow::bail!("mcp --http {addr}: loopback addresses only (bearer tokens travel in the clear: put a TLS-terminating proxy in front)");
    }
    let mut config = StreamableHttpServerConfig::default();
    config.cancellation_token = stop.child_token();
    let mut manager = LocalSessionManager::default();
    manager.session_config.keep_alive = Some(limits.session_idle);
    let manager = Arc::new(manager);
    let service = StreamableHttpService::new(|| Ok(Tools::per_request()), manager.clone(), config);
    let origins = limits
        .allowed_origins
        .iter()
        .map(|o| crate::settings::McpSettings::origin_of(o).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let app = axum::Router::new().nest_service("/mcp", service).layer(
        axum::middleware::from_fn_with_state(
            Door {
                clients,
                sessions: Default::default(),
                manager,
                in_flight: Default::default(),
                limits: Arc::new(limits),
                origins: Arc::new(origins),
            },
            authenticate,
        ),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await?;
    Ok(())
}
