//! Every name the poller puts on the wire that is not configuration (the core's
//! [`poller_core::names`], re-exported here), and the AMQP value they are written as.

pub use poller_core::names::*;

/// An AMQP text value (a header or argument).
pub fn text(v: &str) -> lapin::types::AMQPValue {
    lapin::types::AMQPValue::LongString(lapin::types::LongString::from(v.as_bytes().to_vec()))
}
