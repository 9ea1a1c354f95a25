//! Incidents, read from the chain file the audit sink writes (`console.audit_file`, verified
//! first with the chain key): the open ones on top, and one incident's record in full.

use super::guard::Need;
use super::*;

#[derive(Deserialize)]
pub(super) struct IncidentQuery {
    id: Option<String>,
}

pub(super) async fn incidents(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<IncidentQuery>,
) -> Response {
    let w = match c.page_session(&headers, "/incidents", Need::Session).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    let file = c.parts.console.audit_file.clone();
    let key = c.parts.chain_key.clone();
    let (list, note) = if file.is_empty() {
        (Vec::new(), Some("No audit file is configured (console.audit_file): incidents can't be shown here; use `command-poller incident list` where the sink writes.".to_owned()))
    } else {
        let read = tokio::task::spawn_blocking(move || {
            crate::audit::incident::read(std::path::Path::new(&file), key.as_ref())
        })
        .await;
        match read {
            Ok(Ok(mut all)) => {
                // Open first, newest first within each.
                all.sort_by(|a, b| {
                    (a.closed.is_some(), std::cmp::Reverse(a.opened_seq))
                        .cmp(&(b.closed.is_some(), std::cmp::Reverse(b.opened_seq)))
                });
                (all, None)
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
    let shown =
        q.id.as_deref()
            .and_then(|id| list.iter().find(|i| i.id == id))
            .map(crate::audit::incident::render);
    let rows: Vec<_> = list
        .iter()
        .map(|i| {
            context! {
                id => i.id.clone(),
                opener => format!("{:?}", i.opener),
                opened_at => i.opened_at.clone(),
                opened_by => i.opened_by.clone(),
                reason => i.reason.clone(),
                open => i.closed.is_none(),
                actions => i.affected.len(),
            }
        })
        .collect();
    page(
        StatusCode::OK,
        pages::render(
            "incidents",
            "Incidents",
            Some(&w.viewer),
            None,
            context! { incidents => rows, shown => shown, note => note },
        ),
    )
}
