//! Operator control's shell: the operator's client of the control exchange, the stored state
//! stream and each replica's follower of it. The state, its transitions, the gate and the trips
//! are the core's ([`poller_core::control`], re-exported here).

pub mod cut;
pub mod operator;
pub mod replica;
pub mod state_log;
