//! Who is asking: the session a request's cookie names, and for a form, proof it was sent by
//! this console's own page (the session's CSRF token, and no other site as its origin). Every
//! handler starts with [`Console::page_session`] or [`Console::form_session`], then the role
//! the page needs ([`Who::operator`], [`Who::approver`]).

use super::*;

/// The logged-in person of a request.
pub(super) struct Who {
    pub token: String,
    pub viewer: Viewer,
    pub conn: Arc<lapin::Connection>,
}

pub(super) fn cookie_token(headers: &HeaderMap) -> Option<String> {
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
pub(super) async fn who(
    c: &Console,
    headers: &HeaderMap,
    path: &str,
    is_form: bool,
) -> Result<Who, Response> {
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

pub(super) fn urlencode(s: &str) -> String {
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
pub(super) fn cross_site(headers: &HeaderMap) -> bool {
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

pub(super) fn forbidden(w: &Who, what: &str) -> Response {
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

pub(super) fn broker_down(w: &Who, e: &dyn std::fmt::Display) -> Response {
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

/// What a page or form needs of the person besides a session.
#[derive(Clone, Copy)]
pub(super) enum Need {
    /// Anyone logged in.
    Session,
    /// An operator (in `control.operators`); else refused, naming what they may not do.
    Operator(&'static str),
    /// An approver (in `approval.approvers`); else refused, naming what they may not do.
    Approver(&'static str),
}

impl Need {
    /// The refusal when `w` is not what is needed.
    fn refusal(self, w: &Who) -> Option<Response> {
        match self {
            Need::Session => None,
            Need::Operator(_) if w.viewer.operator => None,
            Need::Approver(_) if w.viewer.approver => None,
            Need::Operator(what) | Need::Approver(what) => Some(forbidden(w, what)),
        }
    }
}

impl Console {
    /// The session of a page request, as `need` says, or what to answer instead (the redirect to
    /// the login page, or the refusal).
    pub(super) async fn page_session(
        &self,
        headers: &HeaderMap,
        path: &str,
        need: Need,
    ) -> Result<Who, Response> {
        let w = who(self, headers, path, false).await?;
        match need.refusal(&w) {
            Some(refusal) => Err(refusal),
            None => Ok(w),
        }
    }

    /// The session of a form that carries this session's token and comes from this site, as
    /// `need` says, or what to answer instead (the login page, saying what was not done; or the
    /// refusal).
    pub(super) async fn form_session(
        &self,
        headers: &HeaderMap,
        path: &str,
        csrf: Option<&str>,
        need: Need,
    ) -> Result<Who, Response> {
        let w = who(self, headers, path, true).await?;
        match form_refused(&w, csrf, headers).or_else(|| need.refusal(&w)) {
            Some(refusal) => Err(refusal),
            None => Ok(w),
        }
    }
}
