//! Every name the poller puts on the wire that is not configuration: routing keys, header
//! names, message types and RabbitMQ's reserved queue names. Exchanges and queues are
//! configured (`topology`, `control`, `audit` sections).

/// RabbitMQ's direct reply-to pseudo-queue: replies reach the publisher's own channel.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Whether `reply_to` names direct reply-to (the bare name, or the broker-rewritten
/// `amq.rabbitmq.reply-to.<token>` a consumer sees).
pub fn is_direct_reply_to(reply_to: &str) -> bool {
    reply_to == DIRECT_REPLY_TO
        || reply_to
            .strip_prefix(DIRECT_REPLY_TO)
            .is_some_and(|rest| rest.starts_with('.'))
}

/// Routing keys.
pub mod routing {
    /// A command's audit record.
    pub const AUDIT_COMMAND: &str = "audit.command";
    /// A control change's audit record.
    pub const AUDIT_CONTROL: &str = "audit.control";
    /// An approval decision's audit record.
    pub const AUDIT_APPROVAL: &str = "audit.approval";
    /// Binding of the approvals queue: every decision (`approval.<decision>`).
    pub const APPROVAL_BINDING: &str = "approval.#";
    /// An audit record the sink refused (dead-lettered).
    pub const AUDIT_REFUSED: &str = "audit.refused";
    /// An unapproved attempt shared with every replica for the trip.
    pub const ATTEMPT_UNAPPROVED: &str = "attempt.unapproved";
    /// Control events are published as `event.<kind>`.
    pub const EVENT_PREFIX: &str = "event.";
    /// Bindings: levers and attempts to each replica's queue, events to the events queue,
    /// audit records to the audit stream, results to the results queue.
    pub const CONTROL_BINDING: &str = "control.#";
    pub const ATTEMPT_BINDING: &str = "attempt.#";
    pub const EVENT_BINDING: &str = "event.#";
    pub const AUDIT_BINDING: &str = "audit.#";
    pub const RESULT_BINDING: &str = "result.#";
}

/// AMQP `type` property of each kind of message.
pub mod message_type {
    pub const RESULT: &str = "result";
    /// An agent's command (the `type` the front doors set; any other but [`LOOKUP`] is one).
    pub const COMMAND: &str = "command";
    /// A lookup of an action's stored result (`get_action`): answered from the store to the
    /// asker only, never judged, executed or published as a result.
    pub const LOOKUP: &str = "lookup";
    pub const ALERT: &str = "alert";
    pub const DEAD_LETTER: &str = "dead_letter";
    pub const AUDIT: &str = "audit";
    pub const ATTEMPT: &str = "attempt";
    pub const CONTROL: &str = "control";
    pub const CONTROL_EVENT: &str = "control_event";
    pub const CONTROL_REPLY: &str = "control_reply";
    pub const CONTROL_STATE: &str = "control_state";
    pub const AUDIT_REFUSED: &str = "audit_refused";
    pub const APPROVAL_DECISION: &str = "approval_decision";
    pub const APPROVAL_REPLY: &str = "approval_reply";
    pub const APPROVAL_EVENT: &str = "approval_event";
}

/// Header names the poller sets on dead letters.
pub mod header {
    /// Why the message was dead-lettered.
    pub const REASON: &str = "x-poller-reason";
    /// The command field at fault.
    pub const FIELD: &str = "x-poller-field";
    /// The routing key the command arrived with.
    pub const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
    /// The broker-validated user that published the command.
    pub const ORIGINAL_USER_ID: &str = "x-original-user-id";
    /// The poller replica that dead-lettered it.
    pub const INSTANCE: &str = "x-poller-instance";
    /// An oversized payload's SHA-256 (its body is withheld).
    pub const PAYLOAD_SHA256: &str = "x-poller-payload-sha256";
    /// An oversized payload's size in bytes.
    pub const PAYLOAD_BYTES: &str = "x-poller-payload-bytes";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_reply_to_is_the_name_or_its_rewritten_form() {
        assert!(is_direct_reply_to("amq.rabbitmq.reply-to"));
        assert!(is_direct_reply_to("amq.rabbitmq.reply-to.g1h2AA.abc"));
        assert!(!is_direct_reply_to("amq.rabbitmq.reply-tox"));
        assert!(!is_direct_reply_to("agent.reply"));
    }
}
