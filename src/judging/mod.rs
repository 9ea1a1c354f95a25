//! Judging's offline tool: [`eval`] scores judges against labelled cases. The panel, the rule
//! judges and the LLM judge are the layers below (re-exported here).

pub use poller_runtime::judging::*;

pub mod eval;
