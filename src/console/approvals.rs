//! The approvals inbox: the parked commands a person may decide, and their decisions, sent as
//! that person to the approvals exchange.

use super::guard::{broker_down, Need, Who};
use super::*;

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
                    context! { pending => ser(&pending), grants => ser(&reply.grants) },
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

pub(super) async fn approvals(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let w = match c
        .page_session(
            &headers,
            "/approvals",
            Need::Approver("decide approvals (not in approval.approvers)"),
        )
        .await
    {
        Ok(w) => w,
        Err(r) => return r,
    };
    approvals_page(&c, &w, None).await
}

#[derive(Deserialize)]
pub(super) struct DecideForm {
    csrf: Option<String>,
    approval_id: String,
    digest: String,
    reason: String,
    decision: String,
}

pub(super) async fn decide(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Form(f): Form<DecideForm>,
) -> Response {
    let w = match c
        .form_session(
            &headers,
            "/approvals",
            f.csrf.as_deref(),
            Need::Approver("decide approvals"),
        )
        .await
    {
        Ok(w) => w,
        Err(r) => return r,
    };
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
