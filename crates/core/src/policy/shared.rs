//! The policy in force, and its reload.
//!
//! In: the policy file (at start, and again on every reload: SIGHUP or the `policy reload`
//! lever). Out: snapshots. A command takes one snapshot ([`SharedPolicy::snapshot`]) and is
//! decided, parked and alerted by that policy alone; a reload reads, parses and validates the
//! whole file first and only then swaps it in, in one step, so no command meets a half-loaded
//! policy. An invalid file is refused with the error naming the key, and the old policy stays.

use super::{Policy, PolicyError};
use arc_swap::ArcSwap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A check a new policy must also pass before it is swapped in (the approval TTLs against the
/// store's retention, say).
pub type Check = Box<dyn Fn(&Policy) -> Result<(), String> + Send + Sync>;

pub struct SharedPolicy {
    current: ArcSwap<Policy>,
    /// Where reloads read from; `None`: a fixed policy (tests), reloads refused.
    file: Option<PathBuf>,
    check: Option<Check>,
    /// One reload at a time, so "before" and "after" name neighbouring policies.
    reloading: Mutex<()>,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub before: String,
    pub after: String,
}

impl Reloaded {
    pub fn changed(&self) -> bool {
        self.before != self.after
    }
}

impl SharedPolicy {
    /// The policy loaded from `file`, reloaded from it on demand.
    pub fn from_file(policy: Arc<Policy>, file: PathBuf, check: Option<Check>) -> Self {
        Self {
            current: ArcSwap::new(policy),
            file: Some(file),
            check,
            reloading: Mutex::new(()),
        }
    }

    /// A policy that is never reloaded.
    pub fn fixed(policy: Arc<Policy>) -> Self {
        Self {
            current: ArcSwap::new(policy),
            file: None,
            check: None,
            reloading: Mutex::new(()),
        }
    }

    /// The policy in force now: hold it for the whole of one command.
    pub fn snapshot(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    pub fn digest(&self) -> String {
        self.current.load().digest().to_owned()
    }

    pub fn file(&self) -> Option<&std::path::Path> {
        self.file.as_deref()
    }

    /// Reads and validates the file, then swaps it in. On any error the policy in force stays.
    pub fn reload(&self) -> Result<Reloaded, PolicyError> {
        self.reload_with(|_, _| Ok(()))
    }

    /// As [`SharedPolicy::reload`], the candidate swapped in only if `admit(in force,
    /// candidate)` says so (a looser file without the operators' approval is refused).
    pub fn reload_with(
        &self,
        admit: impl FnOnce(&Policy, &Policy) -> Result<(), String>,
    ) -> Result<Reloaded, PolicyError> {
        let _one = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let Some(file) = &self.file else {
            return Err(PolicyError::Invalid {
                path: "(none)".into(),
                message: "this policy was not loaded from a file and can't be reloaded".into(),
            });
        };
        let new = Policy::load(file)?;
        if let Some(check) = &self.check {
            check(&new).map_err(|message| PolicyError::Invalid {
                path: file.display().to_string(),
                message,
            })?;
        }
        admit(&self.snapshot(), &new).map_err(|message| PolicyError::Invalid {
            path: file.display().to_string(),
            message,
        })?;
        let before = self.digest();
        let after = new.digest().to_owned();
        self.current.store(Arc::new(new));
        Ok(Reloaded { before, after })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = include_str!("../../../../config/policy.toml");

    #[test]
    fn a_reload_swaps_whole_or_not_at_all() {
        let dir = std::env::temp_dir().join(format!("policy-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("policy.toml");
        std::fs::write(&file, GOOD).unwrap();
        let shared =
            SharedPolicy::from_file(Arc::new(Policy::load(&file).unwrap()), file.clone(), None);
        let first = shared.snapshot();
        let unchanged = shared.reload().unwrap();
        assert!(!unchanged.changed());

        let blocking = GOOD.replace(
            "[commands.REFRESH_TOKEN]\naction = \"JUDGE\"",
            "[commands.REFRESH_TOKEN]\naction = \"BLOCK\"",
        );
        assert_ne!(blocking, GOOD);
        std::fs::write(&file, &blocking).unwrap();
        let r = shared.reload().unwrap();
        assert!(r.changed());
        assert_eq!(r.before, first.digest());
        assert_eq!(r.after, shared.digest());
        // A snapshot taken before stays what it was.
        assert_eq!(
            first.rule(crate::intake::CommandType::RefreshToken).action,
            super::super::PolicyAction::Judge
        );

        std::fs::write(
            &file,
            GOOD.replace("floor_severity = \"HIGH\"", "floor_severty = \"HIGH\""),
        )
        .unwrap();
        let e = shared.reload().unwrap_err().to_string();
        assert!(e.contains("floor_severty"), "{e}");
        assert_eq!(shared.digest(), r.after, "the old policy stays");

        let refusing = SharedPolicy::from_file(
            Arc::new(Policy::parse(GOOD).unwrap()),
            file.clone(),
            Some(Box::new(|_| {
                Err("approval_ttl_secs: longer than the retention".into())
            })),
        );
        std::fs::write(&file, GOOD).unwrap();
        let before = refusing.digest();
        assert!(refusing
            .reload()
            .unwrap_err()
            .to_string()
            .contains("retention"));
        assert_eq!(refusing.digest(), before);
        assert!(SharedPolicy::fixed(first).reload().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
