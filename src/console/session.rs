//! Sessions, CSRF tokens and the failed-login limiter of the console, pure.
//!
//! In: logins that succeeded (a user, their roles, the broker connection proving them), cookie
//! tokens, form tokens, the time. Out: the session a request belongs to, or why not (unknown,
//! expired: its connection handed back to be closed); whether a form's token is the session's;
//! whether a login may be tried. No I/O: the connection is a type parameter.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// What a logged-in person may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Roles {
    pub operator: bool,
    pub approver: bool,
}

impl Roles {
    pub fn any(self) -> bool {
        self.operator || self.approver
    }
}

/// One logged-in person.
#[derive(Debug)]
pub struct Session<C> {
    pub user: String,
    pub roles: Roles,
    /// The token every form of this session carries.
    pub csrf: String,
    /// The broker connection opened with the person's own credentials.
    pub conn: C,
    last_seen: Instant,
    /// When it opened: past [`LIFETIME`] it ends, however busy (the page's refresh every few
    /// seconds would keep it alive forever otherwise).
    opened: Instant,
}

/// The longest a session lives, busy or not: a shift.
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Sessions one user may hold at once; opening one more ends that user's oldest.
pub const PER_USER: usize = 5;

/// What a cookie's token comes to.
#[derive(Debug)]
pub enum Lookup<'a, C> {
    Found(&'a Session<C>),
    /// It was a session, idle too long: ended (its connection, to close, is handed back).
    Expired(C),
    Unknown,
}

/// The live sessions, by token.
#[derive(Debug)]
pub struct Sessions<C> {
    live: HashMap<String, Session<C>>,
    idle: Duration,
}

/// 244 random bits, hex (two v4 UUIDs: the OS's random source).
pub fn token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

impl<C> Sessions<C> {
    pub fn new(idle: Duration) -> Self {
        Self {
            live: HashMap::new(),
            idle,
        }
    }

    /// Opens a session; returns its cookie token, and the connection of the user's oldest
    /// session when this one is beyond [`PER_USER`] (ended, to close).
    pub fn open(&mut self, user: &str, roles: Roles, conn: C, now: Instant) -> (String, Option<C>) {
        let mine: Vec<(&String, Instant)> = self
            .live
            .iter()
            .filter(|(_, s)| s.user == user)
            .map(|(t, s)| (t, s.opened))
            .collect();
        let evicted = if mine.len() >= PER_USER {
            let oldest = mine
                .iter()
                .min_by_key(|(_, at)| *at)
                .map(|(t, _)| (*t).clone());
            oldest.and_then(|t| self.live.remove(&t).map(|s| s.conn))
        } else {
            None
        };
        let t = token();
        self.live.insert(
            t.clone(),
            Session {
                user: user.to_owned(),
                roles,
                csrf: token(),
                conn,
                last_seen: now,
                opened: now,
            },
        );
        (t, evicted)
    }

    /// Idle too long, or past its lifetime.
    fn over(&self, s: &Session<C>, now: Instant) -> bool {
        now.duration_since(s.last_seen) > self.idle || now.duration_since(s.opened) > LIFETIME
    }

    /// The session of `token`, seen now (an idle one is ended).
    pub fn touch(&mut self, token: &str, now: Instant) -> Lookup<'_, C> {
        let expired = match self.live.get(token) {
            None => return Lookup::Unknown,
            Some(s) => self.over(s, now),
        };
        if expired {
            let s = self.live.remove(token).expect("present");
            return Lookup::Expired(s.conn);
        }
        let s = self.live.get_mut(token).expect("present");
        s.last_seen = now;
        Lookup::Found(s)
    }

    /// Ends a session (logout); its connection is handed back to be closed.
    pub fn close(&mut self, token: &str) -> Option<C> {
        self.live.remove(token).map(|s| s.conn)
    }

    /// Ends every idle session; their connections are handed back to be closed.
    pub fn expire(&mut self, now: Instant) -> Vec<C> {
        let gone: Vec<String> = self
            .live
            .iter()
            .filter(|(_, s)| self.over(s, now))
            .map(|(t, _)| t.clone())
            .collect();
        gone.into_iter()
            .filter_map(|t| self.live.remove(&t).map(|s| s.conn))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

/// Whether a form's token is the session's (compared in constant time).
pub fn csrf_ok(session: &str, form: Option<&str>) -> bool {
    let Some(form) = form else { return false };
    let (a, b) = (session.as_bytes(), form.as_bytes());
    a.len() == b.len() && !a.is_empty() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Failed logins per key (a user name, a client address) within a window.
#[derive(Debug)]
pub struct LoginLimiter {
    failures: HashMap<String, VecDeque<Instant>>,
    max: usize,
    window: Duration,
}

impl LoginLimiter {
    pub fn new(max: usize, window: Duration) -> Self {
        Self {
            failures: HashMap::new(),
            max,
            window,
        }
    }

    /// `Err(wait)` when `key` has failed `max` times within the window.
    pub fn check(&mut self, key: &str, now: Instant) -> Result<(), Duration> {
        let window = self.window;
        let Some(f) = self.failures.get_mut(key) else {
            return Ok(());
        };
        while f.front().is_some_and(|t| now.duration_since(*t) > window) {
            f.pop_front();
        }
        if f.len() >= self.max {
            let oldest = *f.front().expect("non-empty");
            Err(window.saturating_sub(now.duration_since(oldest)))
        } else {
            Ok(())
        }
    }

    pub fn fail(&mut self, key: &str, now: Instant) {
        self.failures
            .entry(key.to_owned())
            .or_default()
            .push_back(now);
    }

    pub fn succeed(&mut self, key: &str) {
        self.failures.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_found_renewed_and_expires_when_idle() {
        let t0 = Instant::now();
        let mut s = Sessions::new(Duration::from_secs(60));
        let roles = Roles {
            operator: true,
            approver: false,
        };
        let (tok, _) = s.open("ops", roles, "conn-1", t0);
        assert_eq!(tok.len(), 64);
        match s.touch(&tok, t0 + Duration::from_secs(50)) {
            Lookup::Found(x) => assert_eq!(x.user, "ops"),
            other => panic!("{other:?}"),
        }
        // Renewed at 50 s: still alive at 100 s.
        assert!(matches!(
            s.touch(&tok, t0 + Duration::from_secs(100)),
            Lookup::Found(_)
        ));
        assert!(matches!(
            s.touch(&tok, t0 + Duration::from_secs(161)),
            Lookup::Expired("conn-1")
        ));
        assert!(matches!(
            s.touch(&tok, t0 + Duration::from_secs(162)),
            Lookup::Unknown
        ));
        assert!(matches!(s.touch("forged", t0), Lookup::Unknown));
    }

    #[test]
    fn logout_and_the_idle_sweep_hand_back_the_connections() {
        let t0 = Instant::now();
        let mut s = Sessions::new(Duration::from_secs(10));
        let (a, _) = s.open("a", Roles::default(), 1, t0);
        s.open("b", Roles::default(), 2, t0);
        assert_eq!(s.close(&a), Some(1));
        assert_eq!(s.close(&a), None);
        assert_eq!(s.expire(t0 + Duration::from_secs(11)), vec![2]);
        assert!(s.is_empty());
    }

    #[test]
    fn a_busy_session_still_ends_at_its_lifetime_and_a_user_holds_at_most_five() {
        let t0 = Instant::now();
        let mut s = Sessions::new(Duration::from_secs(60));
        let (tok, _) = s.open("ops", Roles::default(), 0, t0);
        // Refreshed every 5 s (the console page does) for the whole lifetime.
        let mut t = t0;
        while t.duration_since(t0) <= LIFETIME {
            t += Duration::from_secs(5);
            if t.duration_since(t0) > LIFETIME {
                break;
            }
            assert!(matches!(s.touch(&tok, t), Lookup::Found(_)), "{:?}", t - t0);
        }
        assert!(matches!(s.touch(&tok, t), Lookup::Expired(0)));
        // A sixth login of one user ends that user's oldest session, never another user's.
        let mut s = Sessions::new(Duration::from_secs(60));
        s.open("other", Roles::default(), 100, t0);
        let mut evicted = Vec::new();
        for i in 0..7 {
            let (_, e) = s.open("ops", Roles::default(), i, t0 + Duration::from_secs(i));
            evicted.extend(e);
        }
        assert_eq!(evicted, [0, 1]);
        assert_eq!(s.len(), PER_USER + 1);
    }

    #[test]
    fn a_form_must_carry_the_sessions_own_token() {
        let s = token();
        assert!(csrf_ok(&s, Some(&s)));
        assert!(!csrf_ok(&s, None));
        assert!(!csrf_ok(&s, Some("")));
        assert!(!csrf_ok(&s, Some(&token())));
        assert!(!csrf_ok(&s, Some(&s[..10])));
        assert!(!csrf_ok("", Some("")));
    }

    #[test]
    fn failed_logins_are_limited_per_key_within_the_window() {
        let t0 = Instant::now();
        let mut l = LoginLimiter::new(3, Duration::from_secs(60));
        for i in 0..3 {
            assert!(l.check("mallory", t0 + Duration::from_secs(i)).is_ok());
            l.fail("mallory", t0 + Duration::from_secs(i));
        }
        let wait = l
            .check("mallory", t0 + Duration::from_secs(10))
            .unwrap_err();
        assert_eq!(wait, Duration::from_secs(50));
        assert!(l.check("alice", t0).is_ok(), "per key");
        assert!(l.check("mallory", t0 + Duration::from_secs(61)).is_ok());
        l.fail("bob", t0);
        l.succeed("bob");
        assert!(l.check("bob", t0).is_ok());
    }
}
