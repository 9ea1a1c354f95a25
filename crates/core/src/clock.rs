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

/// A duration in whole seconds: `90`, `90s`, `30m`, `12h`, `7d`.
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: a number with s, m, h or d (30m, 12h, 7d)"))?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("{other:?}: the unit is s, m, h or d")),
    };
    n.checked_mul(unit)
        .ok_or_else(|| format!("{s:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::parse_duration_secs as secs;

    #[test]
    fn durations_read_with_their_unit() {
        assert_eq!(secs("90"), Ok(90));
        assert_eq!(secs("90s"), Ok(90));
        assert_eq!(secs("30m"), Ok(1800));
        assert_eq!(secs("12h"), Ok(43_200));
        assert_eq!(secs("7d"), Ok(604_800));
        assert!(secs("").is_err());
        assert!(secs("1w").is_err());
        assert!(secs("h").is_err());
        assert!(secs("99999999999999999999d").is_err());
    }
}
