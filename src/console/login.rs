//! Logging in and out: the login page, the check of a person's broker user and password (an
//! AMQP connection as them, kept for the session), the failed-login limiter, and where a
//! person may be sent after logging in.

use super::guard::cross_site;
use super::guard::Need;
use super::*;

#[derive(Deserialize)]
pub(super) struct LoginQuery {
    next: Option<String>,
    expired: Option<String>,
}

pub(super) async fn login_page(Query(q): Query<LoginQuery>) -> Response {
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
pub(super) struct LoginForm {
    user: String,
    password: String,
    next: Option<String>,
}

pub(super) async fn login(
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
        return login_refused(
            StatusCode::FORBIDDEN,
            "This login did not come from this console's page: refused.".into(),
            None,
        );
    }
    // Only the failing client is throttled: a user-name counter would let anyone lock an
    // operator out of the console during an incident with five wrong passwords.
    let from = client_of(&c, addr, &headers);
    let client = format!("addr:{from}");
    let named = format!("user:{}", f.user);
    // Built before any session opens: a target that can't be a redirect never gets that far.
    let target = safe_next(f.next.as_deref());
    let refused = |status: StatusCode, text: String| login_refused(status, text, Some(&target));
    if let Err(wait) = lock(&c.limiter).check(&client, now) {
        tracing::warn!(user = %f.user, client = %from, "console audit: login refused, too many failed attempts");
        let text = format!(
            "Too many failed logins: try again in {} s.",
            wait.as_secs().max(1)
        );
        return refused(StatusCode::TOO_MANY_REQUESTS, text);
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
    let token = start_session(&c, &f.user, roles, conn, now).await;
    tracing::info!(user = %f.user, client = %from, operator = roles.operator, approver = roles.approver, "console audit: logged in");
    let mut r = Redirect::to(&target).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        c.cookie(&token).parse().expect("a valid header"),
    );
    r
}

/// The client a login comes from (through a trusted proxy, the address it forwarded).
fn client_of(c: &Console, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    client_address(peer.ip(), &forwarded, &c.parts.console.trusted_proxies)
}

/// The login page again, saying why the login was refused.
fn login_refused(status: StatusCode, text: String, next: Option<&str>) -> Response {
    page(
        status,
        pages::render(
            "login",
            "Log in",
            None,
            Some(Flash { kind: "err", text }),
            context! { next => next.unwrap_or("/") },
        ),
    )
}

/// Opens `user`'s session on their own broker connection (and, for an operator, a follower
/// of the state stream); a user over their sessions loses the oldest. Returns its token.
async fn start_session(
    c: &Console,
    user: &str,
    roles: Roles,
    conn: lapin::Connection,
    now: Instant,
) -> String {
    let conn = Arc::new(conn);
    let (token, evicted) = lock(&c.sessions).open(user, roles, conn.clone(), now);
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
        tracing::info!(user = %user, "console audit: the user's oldest session ended (at most {} at once)", session::PER_USER);
        crate::broker::close(&old, "console: too many sessions of this user").await;
    }
    token
}

#[derive(Deserialize)]
pub(super) struct CsrfOnly {
    csrf: Option<String>,
}

pub(super) async fn logout(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Form(f): Form<CsrfOnly>,
) -> Response {
    let w = match c
        .form_session(&headers, "/", f.csrf.as_deref(), Need::Session)
        .await
    {
        Ok(w) => w,
        Err(r) => return r,
    };
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
