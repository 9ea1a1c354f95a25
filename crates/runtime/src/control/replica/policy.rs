//! The policy reload on this replica: from the `policy reload` lever or SIGHUP. The file is
//! read and validated whole, then swapped in; an invalid one is refused, the old policy stays,
//! and ops hear of it. Either way the reload is an event and an audit record (who, digest
//! before and after).

use super::render::{self, PolicyReload};
use super::Replica;
use crate::broker::{BrokerError, Publisher};
use crate::outcome::Priority;

impl Replica {
    /// Reloads the policy for `by`; returns why it was refused, if it was.
    pub(super) async fn reload_policy(
        &self,
        publisher: &Publisher,
        by: &str,
        request_id: &str,
    ) -> Result<Option<String>, BrokerError> {
        let before = self.policy.digest();
        let reload = match self.policy.reload_with(|current, candidate| {
            loosening_admitted(self.control.rules(), &self.gate.state(), current, candidate)
        }) {
            Ok(r) => {
                tracing::warn!(by, before = %r.before, after = %r.after, changed = r.changed(), "policy reloaded");
                self.stats.policy_changed(&r.after);
                PolicyReload {
                    before: r.before,
                    after: r.after,
                    refused: None,
                }
            }
            Err(e) => {
                tracing::error!(by, error = %e, "policy reload refused; the policy in force stays");
                PolicyReload {
                    after: before.clone(),
                    before,
                    refused: Some(e.to_string()),
                }
            }
        };
        let (msg, record) = render::policy_reload(
            &self.names,
            by,
            request_id,
            &self.gate.state(),
            &reload,
            crate::clock::now_rfc3339(),
        );
        publisher.publish(&msg).await?;
        self.audit(publisher, &record).await?;
        if let Some(why) = &reload.refused {
            let what = format!(
                "Policy reload refused on replica {} (asked by {by}): {why}",
                self.names.instance
            );
            self.alert(publisher, "ops", Priority::Normal, &what, "The policy in force stays. Fix the file (`command-poller policy test` and `check-config` show the error), then reload again.").await?;
        }
        Ok(reload.refused)
    }
}

/// Whether this replica may load `candidate` over `current`: always where one operator may
/// loosen; otherwise a candidate that enforces less only once its digest was approved by the
/// operators `control.loosening_approvals` needs (`policy approve`).
fn loosening_admitted(
    rules: poller_core::control::loosening::Rules,
    state: &poller_core::control::ControlState,
    current: &crate::policy::Policy,
    candidate: &crate::policy::Policy,
) -> Result<(), String> {
    if !rules.two_people() {
        return Ok(());
    }
    let why = crate::policy::loosening::loosenings(current, candidate);
    let digest = candidate.digest();
    if why.is_empty() || state.approved_policies.iter().any(|d| d == digest) {
        return Ok(());
    }
    Err(format!(
        "the new file ({digest}) lets through what the policy in force refuses ({}): it needs {} operators, `command-poller policy approve --reason \"...\"` (another operator seconds it), then `policy reload`",
        why.join("; "),
        rules.loosening_approvals
    ))
}
