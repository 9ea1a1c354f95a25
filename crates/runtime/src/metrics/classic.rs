//! The classic Prometheus text format (0.0.4), rewritten from the OpenMetrics text the registry
//! renders. In: OpenMetrics text. Out: the same series as classic text.

/// The classic Prometheus text format's content type, for [`classic_text`].
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The same metrics in the classic Prometheus text format (0.0.4), for scrapers that don't ask
/// for OpenMetrics (promtool, older Prometheus): a counter's HELP and TYPE name the `_total`
/// series it exposes, and OpenMetrics' `# UNIT` and `# EOF` lines go.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classic_text_names_the_total_series_and_drops_openmetrics_lines() {
        let om = "# HELP a_commands Commands.\n# TYPE a_commands counter\na_commands_total{x=\"1\"} 2\n# HELP a_seconds Time.\n# TYPE a_seconds histogram\n# UNIT a_seconds seconds\na_seconds_count 1\n# EOF\n";
        let classic = classic_text(om);
        assert_eq!(
            classic,
            "# HELP a_commands_total Commands.\n# TYPE a_commands_total counter\na_commands_total{x=\"1\"} 2\n# HELP a_seconds Time.\n# TYPE a_seconds histogram\na_seconds_count 1\n"
        );
    }
}
