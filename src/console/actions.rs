//! An action's story: every audit record of one action, read from the chain file the audit sink
//! writes.

use super::guard::Need;
use super::*;

#[derive(Deserialize)]
pub(super) struct ActionQuery {
    action_id: Option<String>,
}

pub(super) async fn actions(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<ActionQuery>,
) -> Response {
    let w = match c.page_session(&headers, "/actions", Need::Session).await {
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
