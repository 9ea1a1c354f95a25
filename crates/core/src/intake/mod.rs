//! Intake: the first pipeline stage.
//!
//! In: the raw bytes and AMQP properties of one delivery. Out: a validated [`Command`] plus the
//! publishing [`Agent`] and where its result may be sent ([`ReplyTarget`]), or an error that
//! names the offending field and why. Nothing downstream ever sees an unvalidated command.

mod command;
mod decode;
mod identity;

pub use command::{
    ActionId, AgentId, Command, CommandType, Service, Severity, OPERATOR_ONLY_TYPES,
};
pub use decode::{decode, salvage_action_id, DecodeError, DecodeLimits};
pub use identity::{
    identify, reply_target, Agent, IdentityError, ReplyTarget, ReplyToRefused, UNVERIFIED_PREFIX,
};
