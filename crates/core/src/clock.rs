//! Wall-clock time as the messages carry it: RFC 3339 strings and Unix seconds.

/// Now, as RFC 3339 (UTC).
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Now, in seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64
}

/// Unix seconds as RFC 3339 (UTC).
pub fn rfc3339(unix_secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_secs.min(i64::MAX as u64) as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Durations written back in their configuration unit.
pub mod ser {
    use serde::Serializer;
    use std::time::Duration;

    /// Whole seconds.
    pub fn secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
}

/// Durations in configuration: keys keep their unit in the name (`*_secs`, `*_ms`) and the
/// fields are typed [`std::time::Duration`]s from the moment they are read.
pub mod de {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    /// Whole seconds.
    pub fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }

    /// Milliseconds.
    pub fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}
