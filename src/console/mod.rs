//! The operator console: one web page for the on-call person (state, levers, the approvals
//! inbox, an action's story).
//!
//! In: HTTP requests from browsers. Out: server-rendered HTML ([`pages`]); levers and decisions
//! published over the broker as the logged-in person, exactly like the CLI: a person logs in with
//! their own broker user and password, the console proves them by opening an AMQP connection as
//! that user and keeps it for the session ([`session`]); nothing can be done here without the
//! broker rights the CLI would need. Stateless across processes: run as many as you like.

pub mod alerts;
pub mod pages;
pub mod session;
pub mod state;

use crate::approval::approver::Approver;
use crate::approval::wire::{PendingView, ReplyOutcome, Request};
use crate::control::operator::{new_request_id, Operator};
use crate::control::ControlCommand;
use crate::settings::{ApprovalSettings, ConsoleSettings, ControlSettings};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Form, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use minijinja::context;
use pages::{Flash, Viewer};
use serde::Deserialize;
use session::{LoginLimiter, Lookup, Roles, Sessions};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The session cookie's name.
pub const COOKIE: &str = "poller_session";

/// How long the console waits for the replicas' or a desk's answer.
const ANSWER_WAIT: Duration = Duration::from_millis(1500);

/// What the console needs of the settings.
#[derive(Debug, Clone)]
pub struct Parts {
    pub console: ConsoleSettings,
    pub control: ControlSettings,
    pub approval: ApprovalSettings,
    pub commands_queue: String,
    /// The broker nodes whose hosts, ports and vhost the console logs people in at (their user
    /// and password are replaced by theirs).
    pub endpoints: crate::broker::Endpoints,
    pub poller_user: String,
    pub replication: crate::settings::Replication,
    /// Where the console's own security alerts go (`None`: logged only).
    pub alerts: Option<alerts::AlertSink>,
}

impl Parts {
    pub fn from_settings(s: &crate::settings::Settings) -> Self {
        Self {
            console: s.console.clone(),
            control: s.control.clone(),
            approval: s.approval.clone(),
            commands_queue: s.topology.commands_queue.clone(),
            endpoints: s.amqp.checked_endpoints(),
            poller_user: s.poller_user(),
            replication: s.topology.replication,
            alerts: s.secrets.console_alert_url.as_ref().and_then(|url| {
                match crate::broker::Endpoints::parse(&url.expose()) {
                    Ok(endpoints) => Some(alerts::AlertSink {
                        endpoints,
                        exchange: s.topology.alerts_exchange.clone(),
                        instance: format!("console@{}", s.instance()),
                    }),
                    Err(e) => {
                        tracing::error!(variable = %s.console.alert_url_env, error = %e, "console: the alert URL can't be used; failed logins are logged only");
                        None
                    }
                }
            }),
        }
    }
}

pub struct Console {
    parts: Parts,
    sessions: Mutex<Sessions<Arc<lapin::Connection>>>,
    limiter: Mutex<LoginLimiter>,
    /// When security was last alerted about each operator name (once per login window).
    alerted: Mutex<std::collections::HashMap<String, Instant>>,
    /// Operators' sessions' followers of the state stream, by session token.
    followers: Mutex<std::collections::HashMap<String, state::Follower>>,
}

impl Console {
    /// Tells security (once per login window per name) that an operator's name is under a
    /// password-guessing attack. Names that are not operators are only logged.
    fn alert_login_abuse(&self, user: &str, client: &str, now: Instant) {
        if !self.roles(user).operator {
            return;
        }
        let window = self.parts.console.login_window;
        {
            let mut alerted = lock(&self.alerted);
            alerted.retain(|_, at| now.duration_since(*at) < window);
            if alerted.contains_key(user) {
                return;
            }
            alerted.insert(user.to_owned(), now);
        }
        let Some(sink) = self.parts.alerts.clone() else {
            tracing::error!(user, "console security: no alert URL configured (console.alert_url_env); security is not alerted");
            return;
        };
        let alert = alerts::login_abuse(
            user,
            client,
            self.parts.console.max_failed_logins,
            window,
            &sink.instance,
        );
        tokio::spawn(async move {
            if let Err(e) = sink.publish(&alert).await {
                tracing::error!(error = %e, alert = %serde_json::to_string(&alert).unwrap_or_default(), "console security alert not published; here it is");
            }
        });
    }

    pub fn new(parts: Parts) -> Arc<Self> {
        Arc::new(Self {
            sessions: Mutex::new(Sessions::new(parts.console.idle_timeout)),
            limiter: Mutex::new(LoginLimiter::new(
                parts.console.max_failed_logins,
                parts.console.login_window,
            )),
            alerted: Mutex::default(),
            followers: Mutex::default(),
            parts,
        })
    }

    fn roles(&self, user: &str) -> Roles {
        Roles {
            operator: self.parts.control.operators.iter().any(|o| o == user),
            approver: self.parts.approval.approvers.iter().any(|a| a == user),
        }
    }

    /// The broker URL of `user` with `password`.
    fn endpoints_for(&self, user: &str, password: &str) -> Option<crate::broker::Endpoints> {
        self.parts.endpoints.with_credentials(user, password)
    }

    fn cookie(&self, token: &str) -> String {
        format!(
            "{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
            self.parts.console.idle_timeout.as_secs(),
            if self.parts.console.secure_cookies {
                "; Secure"
            } else {
                ""
            }
        )
    }
}

/// The console's routes.
pub fn router(console: Arc<Console>) -> Router {
    let limit = console.parts.console.max_form_bytes;
    Router::new()
        .route("/", get(home))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/overview", get(overview))
        .route("/lever", post(lever))
        .route("/approvals", get(approvals))
        .route("/approvals/decide", post(decide))
        .route("/actions", get(actions))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::map_response(hardened))
        .with_state(console)
}

/// The headers every console answer carries: never framed (the levers can't be clicked through
/// another page), never cached, never sniffed, no referrer to other sites.
pub const HARDENING: [(&str, &str); 5] = [
    ("x-frame-options", "DENY"),
    (
        "content-security-policy",
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    ),
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "same-origin"),
];

async fn hardened(mut r: Response) -> Response {
    for (name, value) in HARDENING {
        r.headers_mut().insert(
            header::HeaderName::from_static(name),
            header::HeaderValue::from_static(value),
        );
    }
    r
}

/// Serves the console on `listener` until `stop`; idle sessions are ended every few seconds.
pub async fn serve(
    listener: tokio::net::TcpListener,
    console: Arc<Console>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let sweeper = {
        let (c, stop) = (console.clone(), stop.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = every.tick() => {}
                }
                let gone = lock(&c.sessions).expire(Instant::now());
                for conn in gone {
                    crate::broker::close(&conn, "console session idle").await;
                }
            }
        })
    };
    let app = router(console).into_make_service_with_connect_info::<SocketAddr>();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    sweeper.abort();
    served
}

/// A serializable value for a template.
fn ser<T: serde::Serialize>(v: &T) -> minijinja::Value {
    minijinja::Value::from(minijinja::value::Serde(v))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The logged-in person of a request.
struct Who {
    token: String,
    viewer: Viewer,
    conn: Arc<lapin::Connection>,
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// The session of the request, or where to send it: to the login page, saying whether a
/// session expired (and, for a form, that what it was about to do was not done).
async fn who(c: &Console, headers: &HeaderMap, path: &str, is_form: bool) -> Result<Who, Response> {
    let to_login = |expired: bool| {
        let mut q = format!("/login?next={}", urlencode(path));
        if expired {
            q.push_str(if is_form {
                "&expired=form"
            } else {
                "&expired=1"
            });
        }
        Redirect::to(&q).into_response()
    };
    let Some(token) = cookie_token(headers) else {
        return Err(to_login(false));
    };
    let found = {
        let mut sessions = lock(&c.sessions);
        match sessions.touch(&token, Instant::now()) {
            Lookup::Found(s) => Ok(Who {
                token: token.clone(),
                viewer: Viewer {
                    user: s.user.clone(),
                    operator: s.roles.operator,
                    approver: s.roles.approver,
                    csrf: s.csrf.clone(),
                },
                conn: s.conn.clone(),
            }),
            Lookup::Expired(conn) => Err(Some(conn)),
            Lookup::Unknown => Err(None),
        }
    };
    match found {
        Ok(w) => Ok(w),
        Err(Some(conn)) => {
            crate::broker::close(&conn, "console session idle").await;
            Err(to_login(true))
        }
        Err(None) => Err(to_login(false)),
    }
}

fn urlencode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A POST must carry the session's token, and come from this site when the browser says where
/// it comes from.
/// `Some(refusal)` when the form is not allowed.
fn form_refused(w: &Who, csrf: Option<&str>, headers: &HeaderMap) -> Option<Response> {
    let cross_site = cross_site(headers);
    if cross_site || !session::csrf_ok(&w.viewer.csrf, csrf) {
        return Some(refused_form(w, cross_site));
    }
    None
}

/// The browser says the request comes from another site than the one it was sent to.
fn cross_site(headers: &HeaderMap) -> bool {
    match (
        headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()),
        headers.get(header::HOST).and_then(|h| h.to_str().ok()),
    ) {
        (Some(origin), Some(host)) => {
            url::Url::parse(origin)
                .ok()
                .and_then(|u| {
                    u.host_str().map(|h| {
                        format!(
                            "{h}{}",
                            u.port().map(|p| format!(":{p}")).unwrap_or_default()
                        )
                    })
                })
                .as_deref()
                != Some(host)
        }
        _ => false,
    }
}

/// Refuses: the form, and the same line in the log.
fn refused_form(w: &Who, cross_site: bool) -> Response {
    tracing::warn!(user = %w.viewer.user, cross_site, "console: a form without this session's token (cross-site?) refused");
    (
        StatusCode::FORBIDDEN,
        Html(pages::message(
            Some(&w.viewer),
            "Refused",
            "err",
            "This form did not come from this console page (cross-site request or a stale page): nothing was done. Reload the page and try again.",
            "/",
        )),
    )
        .into_response()
}

fn page(status: StatusCode, html: String) -> Response {
    (status, Html(html)).into_response()
}

async fn home(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    match who(&c, &headers, "/", false).await {
        Ok(w) if w.viewer.operator => Redirect::to("/overview").into_response(),
        Ok(_) => Redirect::to("/approvals").into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct LoginQuery {
    next: Option<String>,
    expired: Option<String>,
}

async fn login_page(Query(q): Query<LoginQuery>) -> Response {
    let flash = q.expired.as_deref().map(|e| Flash {
        kind: "note",
        text: if e == "form" {
            "Your session expired, so what you submitted was NOT carried out. Log in again and repeat it.".into()
        } else {
            "Your session expired (idle too long). Log in again.".into()
        },
    });
    page(
        StatusCode::OK,
        pages::render(
            "login",
            "Log in",
            None,
            flash,
            context! { next => safe_next(q.next.as_deref()) },
        ),
    )
}

/// The client a request comes from: `peer`, or, when `peer` is one of `trusted` proxies, the
/// last address in `X-Forwarded-For` (`forwarded`, its values in order) that is not a proxy
/// itself. A header that can't be read names nobody else: the peer stays the client.
pub fn client_address(peer: IpAddr, forwarded: &[&str], trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let hops: Option<Vec<IpAddr>> = forwarded
        .iter()
        .flat_map(|v| v.split(','))
        .map(|a| a.trim().parse().ok())
        .collect();
    hops.unwrap_or_default()
        .into_iter()
        .rev()
        .find(|a| !trusted.contains(a))
        .unwrap_or(peer)
}

/// Only a path on this site: no control character or backslash anywhere (browsers drop tabs
/// and newlines, so `/%09/evil.example` would become `//evil.example`), and resolved against
/// this console's own origin to the same origin.
pub fn safe_next(next: Option<&str>) -> String {
    const HERE: &str = "http://console.invalid/";
    let Some(n) = next else { return "/".into() };
    let plain = |t: &str| !t.chars().any(|c| c.is_control() || c == '\\');
    if !n.starts_with('/') || n.starts_with("//") || !plain(n) {
        return "/".into();
    }
    let Ok(base) = url::Url::parse(HERE) else {
        return "/".into();
    };
    match base.join(n) {
        Ok(u) if u.origin() == base.origin() => {
            let path = &u[url::Position::BeforePath..];
            // What the browser will do with it once decoded must still be a plain path.
            let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
            if path.starts_with("//") || !plain(&decoded) || decoded.starts_with("//") {
                "/".into()
            } else {
                path.to_owned()
            }
        }
        _ => "/".into(),
    }
}

#[derive(Deserialize)]
struct LoginForm {
    user: String,
    password: String,
    next: Option<String>,
}

async fn login(
    State(c): State<Arc<Console>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let now = Instant::now();
    // A login posted from another site (login CSRF: the victim's console logged in as the
    // attacker) is refused before anything is checked.
    if cross_site(&headers) {
        tracing::warn!(client = %addr.ip(), "console: a login form from another site refused");
        return page(
            StatusCode::FORBIDDEN,
            pages::render(
                "login",
                "Log in",
                None,
                Some(Flash {
                    kind: "err",
                    text: "This login did not come from this console's page: refused.".into(),
                }),
                context! { next => "/" },
            ),
        );
    }
    // Only the failing client is throttled: a user-name counter would let anyone lock an
    // operator out of the console during an incident with five wrong passwords.
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let from = client_address(addr.ip(), &forwarded, &c.parts.console.trusted_proxies);
    let client = format!("addr:{from}");
    let named = format!("user:{}", f.user);
    // Built before any session opens: a target that can't be a redirect never gets that far.
    let target = safe_next(f.next.as_deref());
    let refused = |status: StatusCode, text: String| {
        page(
            status,
            pages::render(
                "login",
                "Log in",
                None,
                Some(Flash { kind: "err", text }),
                context! { next => safe_next(f.next.as_deref()) },
            ),
        )
    };
    {
        let mut limiter = lock(&c.limiter);
        for k in [&client] {
            if let Err(wait) = limiter.check(k, now) {
                tracing::warn!(user = %f.user, client = %from, "console audit: login refused, too many failed attempts");
                return refused(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "Too many failed logins: try again in {} s.",
                        wait.as_secs().max(1)
                    ),
                );
            }
        }
    }
    let fail = |why: &str| {
        let mut limiter = lock(&c.limiter);
        limiter.fail(&client, now);
        // Counted per name too, never to refuse it: to tell security.
        limiter.fail(&named, now);
        tracing::warn!(user = %f.user, client = %from, why, "console audit: failed login");
        if limiter.check(&named, now).is_err() {
            tracing::error!(user = %f.user, "console security: repeated failed logins against this user name (from any address); its correct password still logs in");
            drop(limiter);
            c.alert_login_abuse(&f.user, &from.to_string(), now);
        }
    };
    let Some(endpoints) = c.endpoints_for(&f.user, &f.password) else {
        fail("unusable user name");
        return refused(
            StatusCode::BAD_REQUEST,
            "That user name can't be used.".into(),
        );
    };
    let conn = match crate::broker::connect(&endpoints, "command-poller-console").await {
        Ok((conn, _)) => conn,
        Err(e) => {
            let text = e.to_string();
            // Never echo the URL: it holds the password.
            if text.contains("ACCESS_REFUSED")
                || text.contains("authentication")
                || text.contains("auth")
            {
                fail("wrong user or password");
                return refused(StatusCode::UNAUTHORIZED, "Wrong user or password.".into());
            }
            tracing::error!(client = %from, "console: the broker is unreachable for a login");
            return refused(
                StatusCode::BAD_GATEWAY,
                "The broker is unreachable, so nobody can log in (or do anything) right now. Use the CLI from a machine that reaches it, or try again.".into(),
            );
        }
    };
    // Checked after the password, so the page never tells a stranger which user names are
    // operators or approvers.
    let roles = c.roles(&f.user);
    if !roles.any() {
        crate::broker::close(&conn, "console: not an operator or approver").await;
        fail("neither an operator nor an approver");
        return refused(
            StatusCode::FORBIDDEN,
            format!(
                "{} is neither an operator (control.operators) nor an approver (approval.approvers): the console is for them only.",
                f.user
            ),
        );
    }
    lock(&c.limiter).succeed(&client);
    lock(&c.limiter).succeed(&named);
    let conn = Arc::new(conn);
    let (token, evicted) = lock(&c.sessions).open(&f.user, roles, conn.clone(), now);
    if roles.operator {
        // The overview shows the state this follower folds, instead of reading the stream on
        // every refresh. Followers of ended sessions (their connection closed) are dropped.
        let follower =
            state::Follower::start(conn, c.parts.control.clone(), c.parts.poller_user.clone());
        let mut followers = lock(&c.followers);
        followers.retain(|_, f| !f.stopped());
        followers.insert(token.clone(), follower);
    }
    if let Some(old) = evicted {
        tracing::info!(user = %f.user, "console audit: the user's oldest session ended (at most {} at once)", session::PER_USER);
        crate::broker::close(&old, "console: too many sessions of this user").await;
    }
    tracing::info!(user = %f.user, client = %from, operator = roles.operator, approver = roles.approver, "console audit: logged in");
    let mut r = Redirect::to(&target).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        c.cookie(&token).parse().expect("a valid header"),
    );
    r
}

#[derive(Deserialize)]
struct CsrfOnly {
    csrf: Option<String>,
}

async fn logout(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Form(f): Form<CsrfOnly>,
) -> Response {
    let w = match who(&c, &headers, "/", true).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    if let Some(r) = form_refused(&w, f.csrf.as_deref(), &headers) {
        return r;
    }
    let closed = lock(&c.sessions).close(&w.token);
    lock(&c.followers).remove(&w.token);
    if let Some(conn) = closed {
        crate::broker::close(&conn, "console logout").await;
    }
    tracing::info!(user = %w.viewer.user, "console audit: logged out");
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
            .parse()
            .expect("a valid header"),
    );
    r
}

fn operator<'a>(c: &'a Console) -> Operator<'a> {
    Operator {
        control: &c.parts.control,
        commands_queue: &c.parts.commands_queue,
        poller_user: c.parts.poller_user.clone(),
        replication: c.parts.replication,
        endpoints: c.parts.endpoints.clone(),
        wait: ANSWER_WAIT,
    }
}

fn forbidden(w: &Who, what: &str) -> Response {
    page(
        StatusCode::FORBIDDEN,
        pages::message(
            Some(&w.viewer),
            "Not yours to do",
            "err",
            &format!("{} may not {what}.", w.viewer.user),
            "/",
        ),
    )
}

fn broker_down(w: &Who, e: &dyn std::fmt::Display) -> Response {
    page(
        StatusCode::BAD_GATEWAY,
        pages::message(
            Some(&w.viewer),
            "The broker did not answer",
            "err",
            &format!("Nothing could be read or done: {e}. Log out and in again when the broker is back, or use the CLI."),
            "/",
        ),
    )
}

/// The overview, with `flash` (a lever's outcome) on top. A plain visit (the refresh every few
/// seconds) shows the state the session's follower folded; right after a lever the stream is
/// read afresh, so the page shows what the lever wrote.
async fn overview_page(c: &Console, w: &Who, flash: Option<Flash>) -> Response {
    let status = ControlCommand::Status {
        request_id: new_request_id(),
    };
    let known = match flash {
        None => lock(&c.followers).get(&w.token).and_then(|f| f.current()),
        Some(_) => None,
    };
    match operator(c)
        .run_known(&w.conn, &w.viewer.user, status, known)
        .await
    {
        Ok(r) => {
            let s = r.stored_state.clone();
            page(
                StatusCode::OK,
                pages::render(
                    "overview",
                    "Overview",
                    Some(&w.viewer),
                    flash,
                    context! {
                        mode => s.as_ref().map_or("RUNNING".to_owned(), |s| s.mode.as_str().to_owned()),
                        since => s.as_ref().map(|s| s.since.clone()),
                        by => r.stored_by.clone(),
                        reason => s.as_ref().map(|s| s.reason.clone()),
                        note => r.note.clone(),
                        depth => r.queue_depth,
                        replicas => ser(&r.replicas),
                        refresh => 5,
                    },
                ),
            )
        }
        Err(e) => broker_down(w, &e),
    }
}

async fn overview(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let w = match who(&c, &headers, "/overview", false).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    if !w.viewer.operator {
        return forbidden(
            &w,
            "see or pull the operator levers (not in control.operators)",
        );
    }
    overview_page(&c, &w, None).await
}

#[derive(Deserialize)]
struct LeverForm {
    csrf: Option<String>,
    action: String,
    reason: String,
    confirm: Option<String>,
}

async fn lever(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Form(f): Form<LeverForm>,
) -> Response {
    let w = match who(&c, &headers, "/overview", true).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    if let Some(r) = form_refused(&w, f.csrf.as_deref(), &headers) {
        return r;
    }
    if !w.viewer.operator {
        return forbidden(&w, "pull the operator levers");
    }
    let reason = f.reason.trim().to_owned();
    if reason.is_empty() {
        let flash = Flash {
            kind: "err",
            text: "A reason is required: it goes into the stored state, the events and the audit trail. Nothing was done.".into(),
        };
        return overview_page(&c, &w, Some(flash)).await;
    }
    let confirmed = f.confirm.as_deref() == Some("yes");
    let request_id = new_request_id();
    let cmd = match f.action.as_str() {
        "pause" => ControlCommand::Pause { reason, request_id },
        "resume" => ControlCommand::Resume {
            reason,
            lift_halt: false,
            request_id,
        },
        "halt" | "lift" if !confirmed => {
            let (what, warning) = if f.action == "halt" {
                ("halt everything", "The master shut-off (Emergency-INT-E02): no bridge call and no judge call on any replica until the halt is lifted after the post-mortem.")
            } else {
                ("lift the halt", "Lifting the master shut-off: every replica runs again and commands flow to the bridge. Only after the post-mortem (Emergency-INT-E02 step 4).")
            };
            return page(
                StatusCode::OK,
                pages::render(
                    "confirm",
                    "Confirm",
                    Some(&w.viewer),
                    None,
                    context! { what => what, warning => warning, action => f.action, reason => reason },
                ),
            );
        }
        "halt" => ControlCommand::Halt { reason, request_id },
        "lift" => ControlCommand::Resume {
            reason,
            lift_halt: true,
            request_id,
        },
        other => {
            return page(
                StatusCode::BAD_REQUEST,
                pages::message(
                    Some(&w.viewer),
                    "Unknown lever",
                    "err",
                    &format!("There is no lever {other:?}; nothing was done."),
                    "/overview",
                ),
            )
        }
    };
    let what = f.action.clone();
    let flash = match operator(&c).run_on(&w.conn, &w.viewer.user, cmd).await {
        Ok(r) if r.replicas.iter().all(|x| x.accepted) => Flash {
            kind: "ok",
            text: format!(
                "{what}: done ({} replica(s) answered{}).",
                r.replicas.len(),
                r.note.map(|n| format!("; {n}")).unwrap_or_default()
            ),
        },
        Ok(r) => Flash {
            kind: "err",
            text: format!(
                "{what}: refused by {}",
                r.replicas
                    .iter()
                    .filter_map(|x| x.refusal.clone())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        },
        Err(e) => Flash {
            kind: "err",
            text: format!("{what}: {e}"),
        },
    };
    tracing::info!(user = %w.viewer.user, lever = %what, outcome = %flash.text, "console audit: lever");
    overview_page(&c, &w, Some(flash)).await
}

fn approver(c: &Console) -> Approver<'_> {
    Approver {
        settings: &c.parts.approval,
        endpoints: c.parts.endpoints.clone(),
        wait: Duration::from_secs(5),
    }
}

/// What the viewer can't do with a pending approval, shown instead of the buttons.
fn blocked_for(p: &PendingView, user: &str) -> Option<String> {
    if p.agent.id.as_str() == user {
        Some("This is your own request: you can't decide it (another approver must).".into())
    } else if p.expires_in_secs == 0 {
        Some("Expired: it can no longer be decided and will never be executed.".into())
    } else if p.approvals.iter().any(|a| a.by == user) {
        Some("You have approved it already; it needs another approver.".into())
    } else {
        p.warning.clone()
    }
}

async fn approvals_page(c: &Console, w: &Who, flash: Option<Flash>) -> Response {
    match approver(c)
        .send_on(&w.conn, &w.viewer.user, &Request::List)
        .await
    {
        Ok(reply) if reply.outcome == ReplyOutcome::Listed => {
            let pending: Vec<serde_json::Value> = reply
                .pending
                .iter()
                .map(|p| {
                    let mut v = serde_json::to_value(p).expect("serializes");
                    v["blocked"] = blocked_for(p, &w.viewer.user).into();
                    v
                })
                .collect();
            page(
                StatusCode::OK,
                pages::render(
                    "approvals",
                    "Approvals",
                    Some(&w.viewer),
                    flash,
                    context! { pending => ser(&pending) },
                ),
            )
        }
        Ok(reply) => page(
            StatusCode::OK,
            pages::render(
                "approvals",
                "Approvals",
                Some(&w.viewer),
                flash,
                context! { note => reply.message },
            ),
        ),
        Err(e) => broker_down(w, &e),
    }
}

async fn approvals(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let w = match who(&c, &headers, "/approvals", false).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    if !w.viewer.approver {
        return forbidden(&w, "decide approvals (not in approval.approvers)");
    }
    approvals_page(&c, &w, None).await
}

#[derive(Deserialize)]
struct DecideForm {
    csrf: Option<String>,
    approval_id: String,
    digest: String,
    reason: String,
    decision: String,
}

async fn decide(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Form(f): Form<DecideForm>,
) -> Response {
    let w = match who(&c, &headers, "/approvals", true).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    if let Some(r) = form_refused(&w, f.csrf.as_deref(), &headers) {
        return r;
    }
    if !w.viewer.approver {
        return forbidden(&w, "decide approvals");
    }
    let req = match f.decision.as_str() {
        "approve" => Request::Approve {
            approval_id: f.approval_id,
            digest: f.digest,
            reason: f.reason,
        },
        _ => Request::Deny {
            approval_id: f.approval_id,
            reason: f.reason,
        },
    };
    let flash = match approver(&c).send_on(&w.conn, &w.viewer.user, &req).await {
        Ok(r) => Flash {
            kind: if r.outcome == ReplyOutcome::Refused {
                "err"
            } else {
                "ok"
            },
            text: r.message,
        },
        Err(e) => Flash {
            kind: "err",
            text: e.to_string(),
        },
    };
    approvals_page(&c, &w, Some(flash)).await
}

#[derive(Deserialize)]
struct ActionQuery {
    action_id: Option<String>,
}

async fn actions(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<ActionQuery>,
) -> Response {
    let w = match who(&c, &headers, "/actions", false).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    let id = q.action_id.unwrap_or_default();
    let file = c.parts.console.audit_file.clone();
    let (records, note) = if id.is_empty() {
        (Vec::new(), None)
    } else if file.is_empty() {
        (
            Vec::new(),
            Some("No audit file is configured (console.audit_file): the story can't be shown here; use `command-poller audit show` where the sink writes.".to_owned()),
        )
    } else {
        let want = id.clone();
        let read = tokio::task::spawn_blocking(move || {
            crate::audit::chain::select(std::path::Path::new(&file), |r| {
                r["action_id"] == want.as_str()
            })
        })
        .await;
        match read {
            Ok(Ok(rows)) => {
                let recs: Vec<serde_json::Value> =
                    rows.into_iter().map(|r| r["record"].clone()).collect();
                let note = recs
                    .is_empty()
                    .then(|| format!("No audit record of action {id}."));
                (recs, note)
            }
            Ok(Err(e)) => (
                Vec::new(),
                Some(format!("The audit file could not be read: {e}")),
            ),
            Err(e) => (
                Vec::new(),
                Some(format!("The audit file could not be read: {e}")),
            ),
        }
    };
    page(
        StatusCode::OK,
        pages::render(
            "actions",
            "Action story",
            Some(&w.viewer),
            None,
            context! { action_id => id, records => ser(&records), note => note },
        ),
    )
}

async fn not_found() -> Response {
    page(
        StatusCode::NOT_FOUND,
        pages::message(None, "Not found", "err", "There is no such page.", "/"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Behind a trusted proxy the client is the last forwarded address that is not a proxy;
    /// from anyone else `X-Forwarded-For` changes nothing (a forged one can't dodge the
    /// throttle), and a garbled one names nobody.
    #[test]
    fn the_client_is_read_from_a_trusted_proxy_only() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let proxy = ip("10.0.0.7");
        let trusted = [proxy, ip("10.0.0.8")];
        assert_eq!(
            client_address(proxy, &["203.0.113.5"], &trusted),
            ip("203.0.113.5")
        );
        // A client's own X-Forwarded-For is to the left of what the proxies add.
        assert_eq!(
            client_address(proxy, &["1.2.3.4, 203.0.113.5, 10.0.0.8"], &trusted),
            ip("203.0.113.5")
        );
        assert_eq!(
            client_address(proxy, &["1.2.3.4", "203.0.113.5"], &trusted),
            ip("203.0.113.5")
        );
        assert_eq!(
            client_address(ip("198.51.100.9"), &["1.2.3.4"], &trusted),
            ip("198.51.100.9"),
            "an untrusted peer forged the header"
        );
        assert_eq!(client_address(proxy, &["not-an-address"], &trusted), proxy);
        assert_eq!(client_address(proxy, &[], &trusted), proxy);
        assert_eq!(client_address(proxy, &["10.0.0.8"], &trusted), proxy);
    }

    #[test]
    fn next_stays_on_this_site() {
        assert_eq!(safe_next(Some("/approvals")), "/approvals");
        assert_eq!(safe_next(Some("//evil.example/x")), "/");
        assert_eq!(safe_next(Some("https://evil.example")), "/");
        assert_eq!(safe_next(Some("/\\evil")), "/");
        assert_eq!(safe_next(None), "/");
        // What the query string decodes to (the open redirect: Chromium drops the tab
        // and lands on //evil.example).
        for bad in [
            "/\t/evil.example/login",
            "/%09/evil.example/login",
            "/%0a/evil.example",
            "/\nx",
            "/%5Cevil.example",
            "/%2F/evil.example",
            "/\u{7f}/x",
        ] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad:?}");
        }
        assert_eq!(safe_next(Some("/actions?id=a%20b")), "/actions?id=a%20b");
        assert_eq!(safe_next(Some("/overview/../approvals")), "/approvals");
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("a=1; {COOKIE}=abc; b=2").parse().unwrap(),
        );
        assert_eq!(cookie_token(&h).as_deref(), Some("abc"));
        assert_eq!(cookie_token(&HeaderMap::new()), None);
    }
}
