//! Raw bytes → [`Command`], once. Refusals name the field and why.
//!
//! Objects are read entry by entry (not into a map) so that a duplicated key is refused rather
//! than silently resolved to one of its values: two readers of the same payload must never
//! disagree about what it says.

use super::command::{ActionId, AgentId, Command, CommandType, Service, Severity};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::fmt;

/// Limits applied before anything is parsed.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_payload_bytes: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 64 * 1024,
        }
    }
}

/// Why a payload was refused. `field()` names the part of the message at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload: {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("content_type: {0:?} is not application/json")]
    ContentType(String),
    #[error("payload: not valid JSON: {0}")]
    NotJson(String),
    #[error("payload: must be a JSON object")]
    NotAnObject,
    #[error("{field}: {reason}")]
    Field { field: String, reason: String },
    /// An agent sent an operator lever's type (`REVOKE_CREDENTIALS`, `DISCONNECT_INTEGRATION`)
    /// as a command: refused, and security hears of it.
    #[error("command_type: {0} is an operator lever (`command-poller revoke` or `disconnect`, through the control exchange), never an agent's command: refused")]
    OperatorLever(String),
}

impl DecodeError {
    /// The message part at fault: `payload`, `content_type`, or a field path such as
    /// `params.service`.
    pub fn field(&self) -> &str {
        match self {
            DecodeError::TooLarge { .. } | DecodeError::NotJson(_) | DecodeError::NotAnObject => {
                "payload"
            }
            DecodeError::ContentType(_) => "content_type",
            DecodeError::OperatorLever(_) => "command_type",
            DecodeError::Field { field, .. } => field,
        }
    }

    fn at(field: &str, reason: impl Into<String>) -> Self {
        DecodeError::Field {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }
}

/// The entries of one JSON object, in order, duplicates kept, values borrowed unparsed.
struct Entries<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Entries<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Entries<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, &'a RawValue>()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// Reads `raw` as an object whose keys must all be in `allowed`, each at most once.
/// `prefix` is the path of this object in the payload (`""` or `"params."`), `whole` its name.
fn object_fields<'a>(
    raw: &'a str,
    allowed: &[&str],
    prefix: &str,
    whole: &str,
) -> Result<Vec<(String, &'a RawValue)>, DecodeError> {
    let Entries(entries) = match serde_json::from_str::<Entries<'a>>(raw) {
        Ok(e) => e,
        Err(e) if e.is_data() && prefix.is_empty() => return Err(DecodeError::NotAnObject),
        Err(e) if e.is_data() => return Err(DecodeError::at(whole, "must be a JSON object")),
        Err(e) => return Err(DecodeError::NotJson(e.to_string())),
    };
    for (i, (k, _)) in entries.iter().enumerate() {
        let path = format!("{prefix}{k}");
        if !allowed.contains(&k.as_str()) {
            return Err(DecodeError::at(
                &path,
                format!("unknown field; allowed: {}", allowed.join(", ")),
            ));
        }
        if entries[..i].iter().any(|(seen, _)| seen == k) {
            return Err(DecodeError::at(&path, "appears more than once"));
        }
    }
    Ok(entries)
}

fn string_field<'a>(
    path: &str,
    raw: &'a RawValue,
) -> Result<std::borrow::Cow<'a, str>, DecodeError> {
    serde_json::from_str::<std::borrow::Cow<'a, str>>(raw.get())
        .map_err(|_| DecodeError::at(path, format!("must be a string, got {}", kind(raw))))
}

fn kind(raw: &RawValue) -> &'static str {
    match raw.get().trim_start().as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

const TOP_FIELDS: &[&str] = &[
    "action_id",
    "command_type",
    "params",
    "severity",
    "agent_id",
    "justification",
];
const PARAMS_FIELDS: &[&str] = &["service"];

/// Decodes one delivery's payload. `content_type`, when the publisher set one, must be JSON.
pub fn decode(
    payload: &[u8],
    content_type: Option<&str>,
    limits: DecodeLimits,
) -> Result<Command, DecodeError> {
    if payload.len() > limits.max_payload_bytes {
        return Err(DecodeError::TooLarge {
            size: payload.len(),
            limit: limits.max_payload_bytes,
        });
    }
    if let Some(ct) = content_type {
        let mime = ct.split(';').next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("application/json") {
            return Err(DecodeError::ContentType(ct.to_owned()));
        }
    }
    let text = std::str::from_utf8(payload)
        .map_err(|e| DecodeError::NotJson(format!("not UTF-8 ({e})")))?;

    let fields = object_fields(text, TOP_FIELDS, "", "payload")?;
    let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
    let required = |name: &str| get(name).ok_or_else(|| DecodeError::at(name, "is required"));

    let action_id = ActionId::parse(&string_field("action_id", required("action_id")?)?)
        .map_err(|r| DecodeError::at("action_id", r))?;

    let ct = string_field("command_type", required("command_type")?)?;
    if super::command::OPERATOR_ONLY_TYPES.contains(&ct.as_ref()) {
        return Err(DecodeError::OperatorLever(ct.into_owned()));
    }
    let command_type = CommandType::parse(&ct).ok_or_else(|| {
        DecodeError::at(
            "command_type",
            format!(
                "{:?} is not one of CHECK_INTEGRATION_STATUS, REFRESH_TOKEN, CONNECT_INTEGRATION",
                truncate(&ct)
            ),
        )
    })?;

    let params = required("params")?;
    let pfields = object_fields(params.get(), PARAMS_FIELDS, "params.", "params")?;
    let service_raw = pfields
        .iter()
        .find(|(k, _)| k == "service")
        .map(|(_, v)| *v)
        .ok_or_else(|| DecodeError::at("params.service", "is required"))?;
    let service = Service::parse(&string_field("params.service", service_raw)?)
        .map_err(|r| DecodeError::at("params.service", r))?;

    let sv = string_field("severity", required("severity")?)?;
    let severity = Severity::parse(&sv).ok_or_else(|| {
        DecodeError::at(
            "severity",
            format!("{:?} is not one of LOW, MEDIUM, HIGH", truncate(&sv)),
        )
    })?;

    let claimed_agent = match get("agent_id") {
        None => None,
        Some(raw) => Some(
            AgentId::parse(&string_field("agent_id", raw)?)
                .map_err(|r| DecodeError::at("agent_id", r))?,
        ),
    };

    let justification = match get("justification") {
        None => None,
        Some(raw) => Some(
            Command::parse_justification(&string_field("justification", raw)?)
                .map_err(|r| DecodeError::at("justification", r))?,
        ),
    };

    Ok(Command {
        action_id,
        command_type,
        service,
        severity,
        claimed_agent,
        justification,
    })
}

/// Echoing agent text back in an error is useful, but not at any length.
fn truncate(s: &str) -> String {
    if s.chars().count() <= 40 {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(40).collect::<String>())
    }
}

/// Best effort: the `action_id` of a payload that failed to decode, so its REJECTED result can
/// be correlated. Only a well-formed action_id is returned.
pub fn salvage_action_id(payload: &[u8], limits: DecodeLimits) -> Option<ActionId> {
    if payload.len() > limits.max_payload_bytes {
        return None;
    }
    #[derive(Deserialize)]
    struct Probe<'a> {
        #[serde(borrow)]
        action_id: Option<std::borrow::Cow<'a, str>>,
    }
    let probe: Probe = serde_json::from_slice(payload).ok()?;
    ActionId::parse(&probe.action_id?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Result<Command, DecodeError> {
        decode(
            s.as_bytes(),
            Some("application/json"),
            DecodeLimits::default(),
        )
    }

    const GOOD: &str = r#"{"action_id":"status-check-mailchimp-123","command_type":"CHECK_INTEGRATION_STATUS","params":{"service":"mailchimp"},"severity":"LOW"}"#;

    #[test]
    fn runbook_examples_decode() {
        let c = d(GOOD).unwrap();
        assert_eq!(c.action_id.as_str(), "status-check-mailchimp-123");
        assert_eq!(c.command_type, CommandType::CheckIntegrationStatus);
        assert_eq!(c.service.as_str(), "mailchimp");
        assert_eq!(c.severity, Severity::Low);
        assert!(c.claimed_agent.is_none());
    }

    fn field_of(s: &str) -> (String, String) {
        let e = d(s).unwrap_err();
        (e.field().to_owned(), e.to_string())
    }

    #[test]
    fn every_refusal_names_its_field() {
        let cases = [
            (
                r#"{"command_type":"REFRESH_TOKEN","params":{"service":"google"},"severity":"LOW"}"#,
                "action_id",
            ),
            (
                r#"{"action_id":"","command_type":"REFRESH_TOKEN","params":{"service":"google"},"severity":"LOW"}"#,
                "action_id",
            ),
            (
                r#"{"action_id":7,"command_type":"REFRESH_TOKEN","params":{"service":"google"},"severity":"LOW"}"#,
                "action_id",
            ),
            (
                r#"{"action_id":"a","command_type":"DELETE_ALL","params":{"service":"google"},"severity":"LOW"}"#,
                "command_type",
            ),
            (
                r#"{"action_id":"a","command_type":"REFRESH_TOKEN","params":{"service":"Google"},"severity":"LOW"}"#,
                "params.service",
            ),
            (
                r#"{"action_id":"a","command_type":"REFRESH_TOKEN","params":{},"severity":"LOW"}"#,
                "params.service",
            ),
            (
                r#"{"action_id":"a","command_type":"REFRESH_TOKEN","params":"google","severity":"LOW"}"#,
                "params",
            ),
            (
                r#"{"action_id":"a","command_type":"REFRESH_TOKEN","params":{"service":"google","scope":"all"},"severity":"LOW"}"#,
                "params.scope",
            ),
            (
                r#"{"action_id":"a","command_type":"REFRESH_TOKEN","params":{"service":"google"},"severity":"low"}"#,
                "severity",
            ),
            (
                r#"{"action_id":"a","command_type":"REFRESH_TOKEN","params":{"service":"google"}}"#,
                "severity",
            ),
            (
                r#"{"action_id":"a","command_type":"REFRESH_TOKEN","params":{"service":"google"},"severity":"LOW","extra":1}"#,
                "extra",
            ),
            (
                r#"{"action_id":"a","action_id":"b","command_type":"REFRESH_TOKEN","params":{"service":"google"},"severity":"LOW"}"#,
                "action_id",
            ),
            (
                r#"{"action_id":"a","command_type":"REFRESH_TOKEN","params":{"service":"google","service":"meta"},"severity":"LOW"}"#,
                "params.service",
            ),
            (
                r#"{"action_id":"a","command_type":"REFRESH_TOKEN","params":{"service":"google"},"severity":"LOW","agent_id":"x.y"}"#,
                "agent_id",
            ),
            (r#"[1,2]"#, "payload"),
            (r#"{"#, "payload"),
            (r#""just a string""#, "payload"),
        ];
        for (input, field) in cases {
            let (f, msg) = field_of(input);
            assert_eq!(f, field, "input {input}: {msg}");
            assert!(msg.starts_with(field), "{msg}");
        }
    }

    #[test]
    fn an_agent_can_never_send_an_operator_lever() {
        for t in crate::intake::OPERATOR_ONLY_TYPES {
            let body = format!(
                r#"{{"action_id":"a","command_type":"{t}","params":{{"service":"google"}},"severity":"HIGH"}}"#
            );
            let (field, why) = field_of(&body);
            assert_eq!(field, "command_type");
            assert!(why.contains("operator lever"), "{why}");
            assert!(why.contains(t), "{why}");
        }
    }

    #[test]
    fn size_utf8_and_content_type() {
        let big = format!(
            r#"{{"action_id":"a","command_type":"REFRESH_TOKEN","params":{{"service":"google"}},"severity":"LOW","agent_id":"{}"}}"#,
            "a".repeat(70_000)
        );
        assert!(matches!(d(&big), Err(DecodeError::TooLarge { .. })));
        let e = decode(&[0xff, 0xfe], None, DecodeLimits::default()).unwrap_err();
        assert_eq!(e.field(), "payload");
        assert!(e.to_string().contains("UTF-8"));
        let e = decode(GOOD.as_bytes(), Some("text/plain"), DecodeLimits::default()).unwrap_err();
        assert_eq!(e.field(), "content_type");
        assert!(decode(GOOD.as_bytes(), None, DecodeLimits::default()).is_ok());
        assert!(decode(
            GOOD.as_bytes(),
            Some("application/json; charset=utf-8"),
            DecodeLimits::default()
        )
        .is_ok());
    }

    #[test]
    fn salvage_reads_only_valid_ids() {
        let l = DecodeLimits::default();
        assert_eq!(
            salvage_action_id(br#"{"action_id":"abc","junk":1}"#, l)
                .unwrap()
                .as_str(),
            "abc"
        );
        assert!(salvage_action_id(br#"{"action_id":"a b"}"#, l).is_none());
        assert!(salvage_action_id(b"nope", l).is_none());
    }

    #[test]
    fn a_justification_is_optional_bounded_plain_text() {
        let with = |j: serde_json::Value| {
            let mut v = serde_json::json!({"action_id": "a-1", "command_type": "REFRESH_TOKEN",
                "params": {"service": "google"}, "severity": "MEDIUM"});
            v["justification"] = j;
            decode(v.to_string().as_bytes(), None, DecodeLimits::default())
        };
        let ok = with(serde_json::json!(
            "the newsletter goes out at 9:00;\nits token expires at 8:30"
        ));
        assert_eq!(
            ok.unwrap().justification.as_deref(),
            Some("the newsletter goes out at 9:00;\nits token expires at 8:30")
        );
        for bad in [
            serde_json::json!(""),
            serde_json::json!("x".repeat(Command::MAX_JUSTIFICATION + 1)),
            serde_json::json!("a\u{1b}[31mred"),
            serde_json::json!(42),
        ] {
            let e = with(bad).unwrap_err();
            assert_eq!(e.field(), "justification", "{e}");
        }
        let plain = serde_json::json!({"action_id": "a-1", "command_type": "REFRESH_TOKEN",
            "params": {"service": "google"}, "severity": "MEDIUM"});
        let cmd = decode(plain.to_string().as_bytes(), None, DecodeLimits::default()).unwrap();
        assert_eq!(cmd.justification, None);
    }
}
