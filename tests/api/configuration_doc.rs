//! Configuration is described once: every key is described in `config/default.toml` (set, or
//! shown commented out when optional), and `docs/configuration.md` indexes the keys of each
//! section. This keeps both true to what the settings accept, asked of the settings themselves:
//! a key nobody accepts is refused by name, with the list of the keys that section accepts.
//! No broker, store or network.

use command_poller::settings::Settings;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const PROBE: &str = "zz_probe_key";

/// The tables of `config/default.toml` to check: a header (its first occurrence), or `""` for
/// the keys before the first table.
const TABLES: &[&str] = &[
    "",
    "[amqp]",
    "[topology]",
    "[topology.replication]",
    "[intake]",
    "[processing]",
    "[policy]",
    "[panel]",
    "[[panel.judges]]",
    "[panel.judges.rules]",
    "[panel.canary]",
    "[bridge]",
    "[logging]",
    "[health]",
    "[control]",
    "[[control.trips]]",
    "[audit]",
    "[idempotency]",
    "[approval]",
    "[mcp]",
    "[console]",
];

fn section_name(header: &str) -> String {
    let name = header.trim_matches(|c| c == '[' || c == ']');
    if name.is_empty() {
        "(top)".into()
    } else {
        name.into()
    }
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// What the settings accept in the table under `header`: an unknown key placed there is
/// refused with the list of accepted ones.
fn accepted(default: &str, header: &str) -> BTreeSet<String> {
    accepted_in(default, None, header)
}

/// With `overlay` (an environment's file, as `(name, text)`), the probe goes into the overlay.
fn accepted_in(default: &str, overlay: Option<(&str, &str)>, header: &str) -> BTreeSet<String> {
    let probe = |text: &str| {
        if header.is_empty() {
            return format!("{PROBE} = 1\n{text}");
        }
        let at = *starts(text, header)
            .first()
            .unwrap_or_else(|| panic!("{header} is not in the file probed"));
        format!("{}{PROBE} = 1\n{}", &text[..at], &text[at..])
    };
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "config-probe-{}-{}-{}",
        std::process::id(),
        overlay.map_or("default", |(name, _)| name),
        section_name(header)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let environment = match overlay {
        None => {
            std::fs::write(dir.join("default.toml"), probe(default)).unwrap();
            "probe"
        }
        Some((name, text)) => {
            std::fs::write(dir.join("default.toml"), default).unwrap();
            std::fs::write(dir.join(format!("{name}.toml")), probe(text)).unwrap();
            name
        }
    };
    let loaded = Settings::load_isolated(&dir, environment);
    let _ = std::fs::remove_dir_all(&dir);
    let err = loaded
        .err()
        .unwrap_or_else(|| panic!("{header}: an unknown key was accepted"))
        .to_string();
    let list = err
        .split("expected one of ")
        .nth(1)
        .or_else(|| err.split("expected ").nth(1))
        .unwrap_or_else(|| panic!("{header}: no list of keys in {err:?}"));
    let list = list.split(" for key").next().unwrap();
    let mut keys: BTreeSet<String> = list
        .split(", ")
        .flat_map(|k| k.split(" or "))
        .map(|k| k.trim().trim_matches('`').to_owned())
        .filter(|k| !k.is_empty())
        .collect();
    if header.starts_with("[[panel.judges]]") {
        // The judge's kind is serde's tag, which the list leaves out.
        keys.insert("kind".into());
    }
    keys
}

/// The line a key of `line` sets (`key = value`), set or commented out.
fn key_of(line: &str) -> Option<(&str, bool)> {
    let line = line.trim();
    let commented = line.starts_with('#');
    let (k, _) = line
        .trim_start_matches('#')
        .trim_start()
        .split_once(" = ")?;
    (!k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .then_some((k, commented))
}

/// Where the tables under `header` start in `default` (every occurrence; one for `""`).
fn starts(default: &str, header: &str) -> Vec<usize> {
    if header.is_empty() {
        return vec![0];
    }
    let needle = format!("\n{header}\n");
    default
        .match_indices(&needle)
        .map(|(i, _)| i + needle.len())
        .collect()
}

/// The keys `config/default.toml` describes in the tables under `header` (each up to the next
/// header): set, or commented out (`# key = ...`). In the first such table each key must have a
/// comment above it (over the keys and the header between).
fn described(default: &str, header: &str, undescribed: &mut Vec<String>) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for (n, start) in starts(default, header).into_iter().enumerate() {
        let lines: Vec<&str> = default[start..]
            .lines()
            .take_while(|l| !l.trim_start().starts_with('['))
            .collect();
        for (i, line) in lines.iter().enumerate() {
            let Some((key, _)) = key_of(line) else {
                continue;
            };
            keys.insert(key.to_owned());
            let above = lines[..i]
                .iter()
                .rev()
                .find(|l| key_of(l).is_none())
                .copied()
                .or_else(|| {
                    // The first keys of a table: the comment above its header.
                    let before = &default[..start.saturating_sub(header.len() + 1)];
                    before.lines().next_back()
                });
            if n == 0 && !above.is_some_and(|l| l.trim_start().starts_with('#')) {
                undescribed.push(format!("{} {key}", section_name(header)));
            }
        }
    }
    keys
}

/// `docs/configuration.md`'s index: the table headed `| section | keys |`, one row per table of
/// `config/default.toml`, its keys in backticks (a note in parentheses after them).
fn indexed(doc: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut rows = BTreeMap::new();
    let table = doc
        .lines()
        .skip_while(|l| !l.starts_with("| section | keys |"))
        .skip(2)
        .take_while(|l| l.starts_with("| "));
    for line in table {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let section = cells[1].trim_matches('`').to_owned();
        let keys = cells[2].split(" (").next().unwrap_or_default();
        let keys = keys
            .split(", ")
            .map(|k| k.trim().trim_matches('`').to_owned())
            .collect();
        rows.insert(section, keys);
    }
    assert!(
        !rows.is_empty(),
        "docs/configuration.md has no `| section | keys |` table"
    );
    rows
}

#[test]
fn every_key_the_settings_accept_is_described_in_default_toml_and_indexed_in_the_docs() {
    let default = std::fs::read_to_string(repo().join("config/default.toml")).unwrap();
    let doc = std::fs::read_to_string(repo().join("docs/configuration.md")).unwrap();
    let index = indexed(&doc);
    let mut wrong = Vec::new();
    let mut undescribed = Vec::new();
    for header in TABLES {
        let section = section_name(header);
        let accepted = accepted(&default, header);
        // A nested table is its own row, not a key of its parent.
        let nested: BTreeSet<String> = TABLES
            .iter()
            .map(|h| section_name(h))
            .filter_map(|s| {
                let prefix = if section == "(top)" {
                    String::new()
                } else {
                    format!("{section}.")
                };
                s.strip_prefix(&prefix)
                    .filter(|rest| !rest.contains('.') && s != section)
                    .map(str::to_owned)
            })
            .collect();
        let keys: BTreeSet<String> = accepted.difference(&nested).cloned().collect();
        let described = described(&default, header, &mut undescribed);
        if described != keys {
            wrong.push(format!(
                "config/default.toml [{section}]: accepted but not described {:?}, described but not accepted {:?}",
                keys.difference(&described).collect::<Vec<_>>(),
                described.difference(&keys).collect::<Vec<_>>()
            ));
        }
        match index.get(&section) {
            Some(listed) if *listed == keys => {}
            Some(listed) => wrong.push(format!(
                "docs/configuration.md `{section}`: missing {:?}, not accepted {:?}",
                keys.difference(listed).collect::<Vec<_>>(),
                listed.difference(&keys).collect::<Vec<_>>()
            )),
            None => wrong.push(format!("docs/configuration.md has no row for `{section}`")),
        }
    }
    let checked: BTreeSet<String> = TABLES.iter().map(|h| section_name(h)).collect();
    for extra in index.keys().filter(|s| !checked.contains(*s)) {
        wrong.push(format!(
            "docs/configuration.md indexes `{extra}`, which is not a table of config/default.toml"
        ));
    }
    if !undescribed.is_empty() {
        wrong.push(format!(
            "config/default.toml: no comment describes {}",
            undescribed.join(", ")
        ));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The LLM judges' keys, which `config/default.toml` doesn't set, are described once: in
/// `docs/configuration.md`'s "LLM judges" table, which must list exactly what such a judge
/// accepts (probed in `config/llm-local.toml`'s first judge).
#[test]
fn the_llm_judges_table_lists_every_key_an_llm_judge_accepts() {
    let default = std::fs::read_to_string(repo().join("config/default.toml")).unwrap();
    let llm = std::fs::read_to_string(repo().join("config/llm-local.toml")).unwrap();
    let doc = std::fs::read_to_string(repo().join("docs/configuration.md")).unwrap();
    let accepted = accepted_in(&default, Some(("llm-local", &llm)), "[[panel.judges]]");
    let listed: BTreeSet<String> = doc
        .lines()
        .skip_while(|l| !l.starts_with("### LLM judges"))
        .skip_while(|l| !l.starts_with("| key | meaning |"))
        .skip(2)
        .take_while(|l| l.starts_with("| "))
        .flat_map(|l| {
            let cell = l.split('|').nth(1).unwrap_or_default();
            cell.split(", ")
                .map(|k| k.trim().trim_matches('`').to_owned())
                .collect::<Vec<_>>()
        })
        .chain(["kind".to_owned()])
        .collect();
    assert_eq!(
        listed, accepted,
        "docs/configuration.md's LLM judges table against what an llm judge accepts"
    );
}

/// The runbook the poller implements is in the repository (a reader of a clone can follow the
/// README to it), and it is the team's runbook word for word: when the team's copy is beside
/// the checkout (`../shared/runbook`), the two are the same.
#[test]
fn the_runbook_is_in_the_repository_and_is_the_teams() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let ours = std::fs::read_to_string(root.join("docs/runbook/integration-management.md"))
        .expect("docs/runbook/integration-management.md");
    let teams = root.join("../shared/runbook/integration-management.md");
    if let Ok(theirs) = std::fs::read_to_string(&teams) {
        assert!(
            ours == theirs,
            "docs/runbook/integration-management.md differs from {}: copy it again",
            teams.display()
        );
    }
}

/// Every relative link in the README and docs/ leads to a file of the repository: none leaves
/// it (`../`) and none is broken.
#[test]
fn the_readme_and_docs_link_only_into_the_repository() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    for e in std::fs::read_dir(root.join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            pages.push(p);
        }
    }
    let mut bad = Vec::new();
    for page in pages {
        let text = std::fs::read_to_string(&page).unwrap();
        let dir = page.parent().unwrap();
        for link in text.split("](").skip(1).filter_map(|r| r.split(')').next()) {
            let target = link.split('#').next().unwrap_or("").trim();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let at = dir.join(target);
            let inside = at
                .canonicalize()
                .is_ok_and(|p| p.starts_with(root.canonicalize().unwrap()));
            if !inside {
                bad.push(format!("{}: {link}", page.display()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "links that leave the repository or lead nowhere: {bad:#?}"
    );
}
