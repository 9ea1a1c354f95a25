//! Judging's adapters and tools: the LLM judge (an HTTP client) and the offline evaluation of
//! judges against labelled cases. The port ([`Judge`]), the panel and the rule judges are the
//! core's ([`poller_core::judging`], re-exported here).

pub use poller_core::judging::*;

pub mod eval;
pub use poller_adapters::judge::llm;
