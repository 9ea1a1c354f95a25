//! Approval's shell: the human decision on NEEDS_APPROVAL commands as it meets the broker and
//! the store. The rules, the parked record and the wire format are the core's
//! ([`poller_core::approval`], re-exported here); this adds the desk that takes decisions, the
//! sweeper that expires, executes and finalizes, the approver's client, the webhook and the
//! rendering of what they publish.

pub mod approver;
pub mod desk;
pub mod render;
pub mod sweeper;
