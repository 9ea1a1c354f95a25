//! The gate: the one place the pipeline asks "may I judge / may I call the bridge now?".
//!
//! A pause is acknowledged only after the state flip is under the same lock that admits bridge
//! calls, so once it returns no new bridge call can start. Calls already admitted finish.

use super::{ControlState, Mode};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

pub struct Gate {
    state: Mutex<ControlState>,
    mode_tx: watch::Sender<Mode>,
    at_bridge: Arc<AtomicUsize>,
}

/// Why the gate held a bridge call back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// Paused or halted: the command goes back to the queue.
    Mode(Mode),
    /// The agent is in quarantine: the command ends REJECTED.
    Quarantined(super::Quarantined),
    /// The command's service was revoked or disconnected: the command ends REJECTED.
    Revoked(super::Revocation),
    /// The grant that let the command through was withdrawn meanwhile: the command goes back
    /// to the queue, and its redelivery waits for approvers.
    GrantWithdrawn(String),
}

/// What [`Gate::enforce`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changed {
    /// The mode (running, paused, halted).
    pub mode: bool,
    /// The set of quarantined agents or a quarantine's details.
    pub quarantine: bool,
    /// The set of revoked or disconnected services.
    pub revoked: bool,
}

/// Held for the duration of one bridge call.
pub struct BridgeTicket(Arc<AtomicUsize>);

impl Drop for BridgeTicket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Default for Gate {
    fn default() -> Self {
        Self::new(ControlState::initial())
    }
}

impl Gate {
    pub fn new(initial: ControlState) -> Self {
        let (mode_tx, _) = watch::channel(initial.mode);
        Self {
            state: Mutex::new(initial),
            mode_tx,
            at_bridge: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> ControlState {
        self.lock().clone()
    }

    pub fn mode(&self) -> Mode {
        self.lock().mode
    }

    /// Mode changes, for the consumer loop (cancel on pause, consume on resume).
    pub fn watch(&self) -> watch::Receiver<Mode> {
        self.mode_tx.subscribe()
    }

    /// The one way the enforced state changes: `decide` sees the current state under the lock
    /// that admits bridge calls and returns the next one (or none) with whatever its caller
    /// needs; a next state that differs is set before the lock is let go, so no decision is
    /// made on a state another one replaced meanwhile. When this returns, the gate admits
    /// according to it.
    pub fn enforce<R>(
        &self,
        decide: impl FnOnce(&ControlState) -> (Option<ControlState>, R),
    ) -> (R, Changed) {
        let mut state = self.lock();
        let (next, r) = decide(&state);
        let Some(next) = next.filter(|n| n != &*state) else {
            return (r, Changed::default());
        };
        let changed = Changed {
            mode: next.mode != state.mode,
            quarantine: next.quarantined != state.quarantined,
            revoked: next.revoked != state.revoked,
        };
        let mode = next.mode;
        *state = next;
        self.mode_tx.send_replace(mode);
        (r, changed)
    }

    /// The agent's quarantine, if it is in one.
    pub fn quarantine_of(&self, agent: &str) -> Option<super::Quarantined> {
        self.lock().quarantined.get(agent).cloned()
    }

    /// The cut that refuses a command of `command_type` for `service`, if any.
    pub fn revocation_of(
        &self,
        command_type: crate::intake::CommandType,
        service: &str,
    ) -> Option<super::Revocation> {
        super::revocation::refusing(&self.lock(), command_type, service).cloned()
    }

    /// Judges are not consulted while halted (the master shut-off stops all actions).
    pub fn may_judge(&self) -> bool {
        self.lock().mode != Mode::Halted
    }

    /// The grant that lets `agent`'s `command_type` for `service` through at `now` (unix
    /// seconds), with its id (see [`super::grant::covering`]).
    pub fn grant_covering(
        &self,
        agent: &str,
        command_type: crate::intake::CommandType,
        service: &str,
        now: u64,
    ) -> Option<(String, super::Grant)> {
        super::grant::covering(&self.lock(), agent, command_type, service, now)
            .map(|(id, g)| (id.to_owned(), g.clone()))
    }

    /// Whether grant `id` is still in force.
    pub fn grant_in_force(&self, id: &str) -> bool {
        self.lock().grants.contains_key(id)
    }

    /// Admits one bridge call for `agent`'s command (`command_type` for `service`, let through
    /// by `grant` if one did) if running, the agent not in quarantine, the service not cut for
    /// it and the grant still in force (checked under the same lock, so a quarantine, revoke or
    /// withdrawal that returned holds back the next call).
    pub fn begin_bridge(
        &self,
        agent: &str,
        command_type: crate::intake::CommandType,
        service: &str,
        grant: Option<&str>,
    ) -> Result<BridgeTicket, Held> {
        let s = self.lock();
        if let Some(id) = grant.filter(|id| !s.grants.contains_key(*id)) {
            return Err(Held::GrantWithdrawn(id.to_owned()));
        }
        if let Some(q) = s.quarantined.get(agent) {
            return Err(Held::Quarantined(q.clone()));
        }
        if let Some(r) = super::revocation::refusing(&s, command_type, service) {
            return Err(Held::Revoked(r.clone()));
        }
        if s.mode != Mode::Running {
            return Err(Held::Mode(s.mode));
        }
        self.at_bridge.fetch_add(1, Ordering::SeqCst);
        Ok(BridgeTicket(self.at_bridge.clone()))
    }

    /// Whether a bridge call already admitted may make another attempt (a retry) now.
    pub fn may_retry(&self) -> Result<(), String> {
        match self.lock().mode {
            Mode::Running => Ok(()),
            other => Err(format!(
                "{} during the bridge call's retries",
                other.as_str().to_ascii_lowercase()
            )),
        }
    }

    /// Bridge calls admitted and not yet finished.
    pub fn at_bridge(&self) -> usize {
        self.at_bridge.load(Ordering::SeqCst)
    }
}

impl crate::bridge::Admission for Gate {
    fn admit(&self) -> Result<(), String> {
        self.may_retry()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFRESH: crate::intake::CommandType = crate::intake::CommandType::RefreshToken;

    fn set(g: &Gate, s: ControlState) -> Changed {
        g.enforce(|_| (Some(s), ())).1
    }

    #[test]
    fn enforcing_reports_what_changed_and_an_equal_state_changes_nothing() {
        let g = Gate::default();
        let w = g.watch();
        assert_eq!(set(&g, g.state()), Changed::default());
        assert!(!w.has_changed().unwrap());
        let paused = ControlState {
            mode: Mode::Paused,
            ..ControlState::initial()
        };
        assert_eq!(
            set(&g, paused.clone()),
            Changed {
                mode: true,
                ..Changed::default()
            }
        );
        assert!(w.has_changed().unwrap());
        // The decision sees the state it replaces.
        let (seen, changed) = g.enforce(|current| (None, current.mode));
        assert_eq!((seen, changed), (Mode::Paused, Changed::default()));
    }

    #[test]
    fn nothing_is_admitted_after_a_pause() {
        let g = Gate::default();
        let t = g
            .begin_bridge("a", REFRESH, "google", None)
            .expect("running admits");
        assert_eq!(g.at_bridge(), 1);
        set(
            &g,
            ControlState {
                mode: Mode::Paused,
                ..ControlState::initial()
            },
        );
        assert_eq!(
            g.begin_bridge("a", REFRESH, "google", None).err(),
            Some(Held::Mode(Mode::Paused))
        );
        assert!(g.may_judge());
        drop(t);
        assert_eq!(g.at_bridge(), 0);
        set(
            &g,
            ControlState {
                mode: Mode::Halted,
                ..ControlState::initial()
            },
        );
        assert!(!g.may_judge());
        let mut w = g.watch();
        set(&g, ControlState::initial());
        assert!(w.has_changed().unwrap());
        assert_eq!(*w.borrow_and_update(), Mode::Running);
    }

    #[test]
    fn a_quarantined_agent_is_held_back_and_the_others_are_not() {
        let g = Gate::default();
        let mut s = ControlState::initial();
        let q = crate::control::Quarantined {
            by: "ops".into(),
            reason: "looping".into(),
            since: "t".into(),
            request_id: "q".into(),
        };
        s.quarantined.insert("bad".into(), q.clone());
        set(&g, s);
        assert_eq!(
            g.begin_bridge("bad", REFRESH, "google", None).err(),
            Some(Held::Quarantined(q.clone()))
        );
        assert!(g.begin_bridge("good", REFRESH, "google", None).is_ok());
        assert_eq!(g.quarantine_of("bad"), Some(q));
        assert_eq!(g.quarantine_of("good"), None);
    }

    #[test]
    fn a_cut_service_holds_back_its_refresh_and_nothing_else() {
        let g = Gate::default();
        let mut s = ControlState::initial();
        let r = crate::control::Revocation {
            cut: crate::control::Cut::Disconnected,
            by: "ops".into(),
            reason: "E02".into(),
            since: "t".into(),
            request_id: "d".into(),
        };
        s.revoked.insert("google".into(), r.clone());
        assert!(set(&g, s).revoked);
        assert_eq!(
            g.begin_bridge("a", REFRESH, "google", None).err(),
            Some(Held::Revoked(r.clone()))
        );
        assert!(g.begin_bridge("a", REFRESH, "meta", None).is_ok());
        let check = crate::intake::CommandType::CheckIntegrationStatus;
        assert!(g.begin_bridge("a", check, "google", None).is_ok());
        assert_eq!(g.revocation_of(REFRESH, "google"), Some(r));
    }
}
