//! Broker endpoints: the nodes of a RabbitMQ cluster a client may connect to, and failover
//! between them.
//!
//! In: the URLs of `amqp.urls` (or the one of `amqp.url`, or a comma-separated command-line
//! list). Out: a connection to the first node that answers, tried from the preferred one round
//! the list; the node in use, safe to show (its URL with the password masked).
//!
//! Every URL must connect as the same user: the broker stamps that user on what the client
//! publishes (`user_id`), and a replica that became another user on failover would lose its
//! operator or poller identity.

use super::settings::{broker_user, redact_url};
use super::{BrokerError, CONNECT_TIMEOUT};
use lapin::{Connection, ConnectionProperties};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The broker nodes a client may use, in order; never empty. Cloned handles share the
/// preferred node, so the connections of one process follow each other.
#[derive(Clone)]
pub struct Endpoints {
    urls: Arc<[String]>,
    preferred: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.redacted()).finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EndpointsError {
    #[error("no broker URL given")]
    Empty,
    /// Names the URL with its password masked, never the URL itself.
    #[error("broker URL {position} ({shown}) is not an amqp:// or amqps:// URL")]
    NotAmqp { position: usize, shown: String },
    #[error("the broker URLs connect as different users ({first:?} and {other:?}); every node must be reached as the same user")]
    MixedUsers { first: String, other: String },
}

/// The node a connection went to: its place in the list and its URL, password masked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub index: usize,
    pub shown: String,
}

impl Endpoints {
    /// The nodes `urls` name, in that order. Each must be an `amqp://` or `amqps://` URL, all
    /// with the same user; blanks are skipped.
    pub fn new<I, S>(urls: I) -> Result<Self, EndpointsError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let urls: Vec<String> = urls
            .into_iter()
            .map(|u| u.as_ref().trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Err(EndpointsError::Empty);
        }
        for (i, u) in urls.iter().enumerate() {
            let amqp = url::Url::parse(u)
                .map(|p| matches!(p.scheme(), "amqp" | "amqps") && p.host_str().is_some())
                .unwrap_or(false);
            if !amqp {
                return Err(EndpointsError::NotAmqp {
                    position: i + 1,
                    shown: redact_url(u),
                });
            }
        }
        let first = broker_user(&urls[0]);
        if let Some(other) = urls.iter().map(|u| broker_user(u)).find(|u| *u != first) {
            return Err(EndpointsError::MixedUsers { first, other });
        }
        Ok(Self {
            urls: urls.into(),
            preferred: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// A comma-separated list (a comma inside a password must be written `%2C`).
    pub fn parse(list: &str) -> Result<Self, EndpointsError> {
        Self::new(list.split(','))
    }

    /// The user every node is reached as (percent-decoded; `guest` when the URLs name none).
    pub fn user(&self) -> String {
        broker_user(&self.urls[0])
    }

    pub fn len(&self) -> usize {
        self.urls.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The URLs with their passwords masked, for logs and reports.
    pub fn redacted(&self) -> Vec<String> {
        self.urls.iter().map(|u| redact_url(u)).collect()
    }

    /// The same nodes reached as `user` with `password` (the console's login); `None` when the
    /// name can't go in a URL.
    pub fn with_credentials(&self, user: &str, password: &str) -> Option<Self> {
        let urls = self
            .urls
            .iter()
            .map(|u| {
                let mut u = url::Url::parse(u).ok()?;
                u.set_username(user).ok()?;
                u.set_password(Some(password)).ok()?;
                Some(u.to_string())
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            urls: urls.into(),
            preferred: Arc::new(AtomicUsize::new(self.preferred.load(Ordering::SeqCst))),
        })
    }

    /// Node `index` alone (a check that each node answers, not just the first that does).
    pub fn only(&self, index: usize) -> Self {
        Self {
            urls: vec![self.urls[index % self.urls.len()].clone()].into(),
            preferred: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The order nodes are tried in: the preferred one, then round the list.
    pub fn order(&self) -> Vec<usize> {
        let n = self.urls.len();
        let start = self.preferred.load(Ordering::SeqCst) % n;
        (0..n).map(|k| (start + k) % n).collect()
    }

    /// The connection to `node` was lost: the next connect starts at the node after it (unless
    /// another connection has already moved on).
    pub fn lost(&self, node: &Node) {
        let n = self.urls.len();
        let _ = self.preferred.compare_exchange(
            node.index,
            (node.index + 1) % n,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    fn node(&self, index: usize) -> Node {
        Node {
            index,
            shown: redact_url(&self.urls[index]),
        }
    }
}

/// Opens a connection named `name` to the first node that answers, each within
/// [`CONNECT_TIMEOUT`], starting from the preferred node; that node becomes the preferred one.
/// With one node its own error comes back; with several, [`BrokerError::Unreachable`] lists
/// what each said.
pub async fn connect(endpoints: &Endpoints, name: &str) -> Result<(Connection, Node), BrokerError> {
    let mut failures = Vec::new();
    for index in endpoints.order() {
        let node = endpoints.node(index);
        match connect_one(&endpoints.urls[index], name).await {
            Ok(conn) => {
                endpoints.preferred.store(index, Ordering::SeqCst);
                if !failures.is_empty() {
                    tracing::info!(connection = name, node = %node.shown, "connected to another broker node");
                }
                return Ok((conn, node));
            }
            Err(e) if endpoints.len() == 1 => return Err(e),
            Err(e) => {
                tracing::warn!(connection = name, node = %node.shown, error = %e, "broker node unreachable; trying the next");
                failures.push(format!("{}: {e}", node.shown));
            }
        }
    }
    Err(BrokerError::Unreachable(failures.join("; ")))
}

async fn connect_one(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props)).await {
        Ok(c) => Ok(c?),
        Err(_) => Err(BrokerError::Timeout("connecting", CONNECT_TIMEOUT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "amqp://poller:s3cret@n1:5672/%2f";
    const B: &str = "amqp://poller:s3cret@n2:5672/%2f";
    const C: &str = "amqps://poller:s3cret@n3:5671/%2f";

    #[test]
    fn a_list_keeps_its_order_and_never_shows_a_password() {
        let e = Endpoints::parse(&format!("{A}, {B},{C}")).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e.user(), "poller");
        let shown = e.redacted().join(" ");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("n1:5672") && shown.contains("n3:5671"));
        assert!(!format!("{e:?}").contains("s3cret"));
    }

    #[test]
    fn bad_lists_are_refused_by_name_without_their_secrets() {
        assert_eq!(Endpoints::parse(" , ").unwrap_err(), EndpointsError::Empty);
        let e = Endpoints::new([A, "http://poller:s3cret@n2/"]).unwrap_err();
        assert!(matches!(e, EndpointsError::NotAmqp { position: 2, .. }));
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let e = Endpoints::new([A, "amqp://other:pw@n2:5672/%2f"]).unwrap_err();
        assert!(e.to_string().contains("different users"), "{e}");
    }

    #[test]
    fn a_lost_node_hands_the_next_connect_to_the_node_after_it() {
        let e = Endpoints::new([A, B, C]).unwrap();
        assert_eq!(e.order(), vec![0, 1, 2]);
        e.lost(&e.node(0));
        assert_eq!(e.order(), vec![1, 2, 0]);
        // A second connection reporting the same loss late doesn't skip a node.
        e.lost(&e.node(0));
        assert_eq!(e.order(), vec![1, 2, 0]);
        e.lost(&e.node(1));
        e.lost(&e.node(2));
        assert_eq!(e.order(), vec![0, 1, 2], "round the list");
        // Clones share the preference: a process's connections follow each other.
        let twin = e.clone();
        twin.lost(&twin.node(0));
        assert_eq!(e.order(), vec![1, 2, 0]);
    }

    #[test]
    fn the_console_reaches_every_node_as_the_person_logging_in() {
        let e = Endpoints::new([A, B]).unwrap();
        let as_ops = e.with_credentials("ops", "pw").unwrap();
        assert_eq!(as_ops.user(), "ops");
        assert_eq!(as_ops.len(), 2);
    }
}
