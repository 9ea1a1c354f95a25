//! Policy's offline tool: replaying the audit stream against a candidate policy. The policy
//! itself (parse, decide, explain, the shared reloadable copy) is the core's
//! ([`poller_core::policy`], re-exported here).

pub use poller_core::policy::*;

pub mod replay;
