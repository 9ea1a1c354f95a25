//! The overview and the operator's levers: the state every replica applies, and pause,
//! resume, halt and lift, each published as the logged-in person.

use super::guard::{broker_down, Need, Who};
use super::*;

fn operator<'a>(c: &'a Console) -> Operator<'a> {
    Operator {
        control: &c.parts.control,
        commands_queue: &c.parts.commands_queue,
        poller_user: c.parts.poller_user.clone(),
        replication: c.parts.replication,
        endpoints: c.parts.endpoints.clone(),
        wait: ANSWER_WAIT,
        // The console pulls no revoke or disconnect.
        cut_wait: ANSWER_WAIT,
    }
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
                        quarantined => s.as_ref().map(|s| ser(&s.quarantined)),
                        revoked => s.as_ref().map(|s| ser(&s.revoked)),
                        proposals => s.as_ref().map(proposals),
                        grants => s.as_ref().map(|s| ser(&crate::approval::wire::GrantView::all(s).into_iter().filter(|g| g.state == "in_force").collect::<Vec<_>>())),
                        refresh => 5,
                    },
                ),
            )
        }
        Err(e) => broker_down(w, &e),
    }
}

pub(super) async fn overview(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let w = match c
        .page_session(
            &headers,
            "/overview",
            Need::Operator("see or pull the operator levers (not in control.operators)"),
        )
        .await
    {
        Ok(w) => w,
        Err(r) => return r,
    };
    overview_page(&c, &w, None).await
}

#[derive(Deserialize)]
pub(super) struct LeverForm {
    csrf: Option<String>,
    action: String,
    reason: String,
    /// Lifting a halt: the post-mortem's reference.
    #[serde(default)]
    post_mortem: Option<String>,
    /// Seconding: the proposal and the digest it binds to.
    #[serde(default)]
    proposal: Option<String>,
    #[serde(default)]
    digest: Option<String>,
    confirm: Option<String>,
    /// A grant: its scope, uses and duration; withdrawing one: its id.
    #[serde(default)]
    agent: Option<String>,
    #[serde(default)]
    command_type: Option<String>,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    uses: Option<String>,
    #[serde(default, rename = "for")]
    for_: Option<String>,
    #[serde(default)]
    grant: Option<String>,
}

/// The pending proposals as the overview lists them: who, until when, the lever in words.
fn proposals(s: &crate::control::ControlState) -> Vec<minijinja::Value> {
    s.proposals
        .iter()
        .map(|(id, p)| {
            context! {
                id => id.clone(),
                by => p.by.clone(),
                expires_at => p.expires_at.clone(),
                digest => p.digest.clone(),
                seconds => p.seconds.iter().cloned().collect::<Vec<_>>(),
                lever => serde_json::to_string(&p.lever).unwrap_or_default(),
            }
        })
        .collect()
}

/// The lever a form asks for, `None` for one there isn't.
fn command_of(f: &LeverForm, reason: String, request_id: String) -> Option<ControlCommand> {
    Some(match f.action.as_str() {
        "pause" => ControlCommand::Pause { reason, request_id },
        "resume" => resume(reason, None, request_id),
        "halt" => ControlCommand::Halt { reason, request_id },
        "lift" => {
            let post_mortem = f.post_mortem.clone().filter(|p| !p.trim().is_empty());
            resume(reason, Some(post_mortem), request_id)
        }
        // Another operator's proposal (a lifted halt, a release, a reconnection), seconded.
        "second" => ControlCommand::Second {
            proposal: f.proposal.clone().unwrap_or_default(),
            digest: f.digest.clone().unwrap_or_default(),
            reason,
            request_id,
        },
        "grant" => grant_of(f, reason, request_id)?,
        "ungrant" => ControlCommand::Ungrant {
            grant: f.grant.clone().unwrap_or_default(),
            reason,
            request_id,
        },
        _ => return None,
    })
}

/// The grant a form asks for; `None` when its type, uses or duration can't be read (the
/// replicas check the rest: agent, service, bounds, never CONNECT_INTEGRATION).
fn grant_of(f: &LeverForm, reason: String, request_id: String) -> Option<ControlCommand> {
    Some(ControlCommand::Grant {
        agent: f.agent.clone()?.trim().to_owned(),
        command_type: crate::intake::CommandType::parse(f.command_type.as_deref()?)?,
        service: f.service.clone()?.trim().to_owned(),
        uses: f.uses.as_deref()?.trim().parse().ok()?,
        for_secs: poller_core::clock::parse_duration_secs(f.for_.as_deref()?).ok()?,
        reason,
        request_id,
    })
}

/// A resume (`lift`: `Some`, with the post-mortem's reference, for lifting a halt).
fn resume(reason: String, lift: Option<Option<String>>, request_id: String) -> ControlCommand {
    ControlCommand::Resume {
        reason,
        lift_halt: lift.is_some(),
        post_mortem: lift.flatten(),
        request_id,
    }
}

pub(super) async fn lever(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Form(f): Form<LeverForm>,
) -> Response {
    let w = match c
        .form_session(
            &headers,
            "/overview",
            f.csrf.as_deref(),
            Need::Operator("pull the operator levers"),
        )
        .await
    {
        Ok(w) => w,
        Err(r) => return r,
    };
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
    if matches!(f.action.as_str(), "halt" | "lift") && !confirmed {
        let (what, warning) = if f.action == "halt" {
            ("halt everything", "The master shut-off (Emergency-INT-E02): no bridge call and no judge call on any replica until the halt is lifted after the post-mortem.")
        } else {
            ("lift the halt", "Lifting the master shut-off: every replica runs again and commands flow to the bridge. Only after the post-mortem (Emergency-INT-E02 step 4), and, with two people to loosen, once another operator seconds it.")
        };
        return page(
            StatusCode::OK,
            pages::render(
                "confirm",
                "Confirm",
                Some(&w.viewer),
                None,
                context! { what => what, warning => warning, action => f.action, reason => reason, post_mortem => f.post_mortem.clone().unwrap_or_default() },
            ),
        );
    }
    let Some(cmd) = command_of(&f, reason, request_id) else {
        return page(
            StatusCode::BAD_REQUEST,
            pages::message(
                Some(&w.viewer),
                "Unknown lever",
                "err",
                &if f.action == "grant" {
                    "The grant's type, uses or duration can't be read (uses: 1 to 1000; for: 30m, 8h, 7d); nothing was done.".to_owned()
                } else {
                    format!("There is no lever {:?}; nothing was done.", f.action)
                },
                "/overview",
            ),
        );
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
