//! The layering `docs/ARCHITECTURE.md` describes, checked against the code: which workspace
//! member may depend on which, which members may hold the I/O crates, and that no crate has a
//! cycle between its top-level modules. Reads `cargo metadata` and the sources; no broker.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The members, bottom up, and the members each may depend on.
const LAYERS: &[(&str, &[&str])] = &[
    ("poller-core", &[]),
    ("poller-adapters", &["poller-core"]),
    ("poller-runtime", &["poller-core", "poller-adapters"]),
    (
        "command-poller",
        &["poller-core", "poller-adapters", "poller-runtime"],
    ),
    // The benchmark (benches/Cargo.toml): above everything, like the integration tests, which
    // are dev-dependencies and so not counted here.
    ("poller-bench", &["command-poller"]),
];

/// The crates that reach outside the process, and the members allowed to depend on them.
const IO_CRATES: &[(&str, &[&str])] = &[
    // The broker: the adapters, the runtime's consumers and the surfaces' clients; the
    // benchmark's load and raw relay.
    (
        "lapin",
        &[
            "poller-adapters",
            "poller-runtime",
            "command-poller",
            "poller-bench",
        ],
    ),
    // The stores: the adapters only.
    ("redb", &["poller-adapters"]),
    ("redis", &["poller-adapters"]),
    ("tokio-postgres", &["poller-adapters"]),
    ("deadpool-postgres", &["poller-adapters"]),
    // HTTP clients: the adapters, and the runtime's health probe of the bridge.
    ("reqwest", &["poller-adapters", "poller-runtime"]),
    // HTTP servers: the bridge simulator, the health endpoint, the console and MCP.
    (
        "axum",
        &["poller-adapters", "poller-runtime", "command-poller"],
    ),
    ("rmcp", &["command-poller"]),
];

fn metadata() -> serde_json::Value {
    cargo_metadata(&["--no-deps"])
}

/// `cargo metadata` (offline) with `extra` arguments, as JSON.
fn cargo_metadata(extra: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(extra)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata is JSON")
}

/// Each member's normal (not dev or build) dependencies, by name.
fn normal_dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let meta = metadata();
    meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter(|d| d["kind"].is_null())
                .map(|d| d["name"].as_str().expect("name").to_owned())
                .collect();
            (p["name"].as_str().expect("name").to_owned(), deps)
        })
        .collect()
}

#[test]
fn each_member_depends_only_on_the_layers_below_it() {
    let deps = normal_dependencies();
    let members: BTreeSet<&str> = LAYERS.iter().map(|(m, _)| *m).collect();
    assert_eq!(
        deps.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        members,
        "the workspace's members are the layers"
    );
    for (member, allowed) in LAYERS {
        let on_members: BTreeSet<&str> = deps[*member]
            .iter()
            .map(String::as_str)
            .filter(|d| members.contains(d))
            .collect();
        assert_eq!(
            on_members,
            allowed.iter().copied().collect::<BTreeSet<_>>(),
            "{member} depends on members {on_members:?}; it may depend on {allowed:?} only"
        );
    }
}

#[test]
fn the_io_crates_appear_only_in_the_members_that_hold_them() {
    let deps = normal_dependencies();
    for (krate, holders) in IO_CRATES {
        for (member, d) in &deps {
            if d.contains(*krate) {
                assert!(
                    holders.contains(&member.as_str()),
                    "{member} depends on {krate}; only {holders:?} may"
                );
            }
        }
    }
}

/// The `.rs` files under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("source dir") {
        let p = entry.expect("entry").path();
        if p.is_dir() {
            out.extend(sources(&p));
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
    out
}

/// The top-level modules named by `crate::<module>` in `code` (also inside `use crate::{..}`).
fn crate_references(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let preceded_by_ident = rest[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if !preceded_by_ident {
            if let Some(g) = after.strip_prefix('{') {
                // A nested group's inner names are not top-level: take the first ident of each
                // comma-separated part at depth 0.
                let mut depth = 0;
                let mut start = 0;
                for (j, c) in g.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => {
                            found.insert(ident(&g[start..j]));
                            break;
                        }
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            found.insert(ident(&g[start..j]));
                            start = j + 1;
                        }
                        _ => {}
                    }
                }
            } else {
                found.insert(ident(after));
            }
        }
        rest = after;
    }
    found.retain(|m| !m.is_empty());
    found
}

/// The code of a file that is not a comment and not test code (a `#[cfg(test)]` module is at
/// the end of the files that have one).
fn production_code(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// For the crate whose sources are in `src`: top-level module → the top-level modules it uses.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in sources(src) {
        let rel = file.strip_prefix(src).expect("under src");
        let top = rel
            .components()
            .next()
            .expect("a component")
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        // The crate root, the test doubles and test modules are not part of the layering.
        let test_file = file.file_name().is_some_and(|n| n == "tests.rs");
        if test_file || ["lib", "main", "testing", "test_util"].contains(&top.as_str()) {
            continue;
        }
        let code = production_code(&std::fs::read_to_string(&file).expect("readable"));
        let uses = graph.entry(top.clone()).or_default();
        for m in crate_references(&code) {
            if m != top {
                uses.insert(m);
            }
        }
    }
    graph
}

/// A cycle in `graph`, if there is one (its modules in order).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            return Some(path[at..].to_vec());
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(c) = visit(node, graph, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn no_crate_has_a_cycle_between_its_modules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for src in [
        root.join("crates/core/src"),
        root.join("crates/adapters/src"),
        root.join("crates/runtime/src"),
        root.join("src"),
    ] {
        let graph = module_graph(&src);
        assert!(graph.len() > 3, "{}: modules found", src.display());
        if let Some(cycle) = find_cycle(&graph) {
            panic!(
                "{}: the modules {} use each other in a circle",
                src.display(),
                cycle.join(" → ")
            );
        }
    }
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let refs = crate_references("use crate::{a::X, b::{c, d}};\nlet y = crate::e::f();");
    assert_eq!(
        refs,
        ["a", "b", "e"].into_iter().map(String::from).collect()
    );
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    g.entry("c".into()).or_default();
    assert_eq!(find_cycle(&g), None);
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        find_cycle(&g),
        Some(vec!["a".into(), "b".into(), "c".into()])
    );
}

/// The production part of a file: its lines before a `#[cfg(test)]` module.
fn production_lines(text: &str) -> Vec<&str> {
    text.lines()
        .take_while(|l| !l.trim_start().starts_with("#[cfg(test)]"))
        .collect()
}

/// The functions of `lines` longer than `max` lines, signature to closing brace, by name.
fn long_functions(lines: &[&str], max: usize) -> Vec<(String, usize)> {
    let mut long = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let indent = &line[..line.len() - t.len()];
        let sig = ["pub(crate) ", "pub(super) ", "pub ", ""]
            .iter()
            .filter_map(|v| t.strip_prefix(v))
            .find_map(|r| {
                r.strip_prefix("async fn ")
                    .or_else(|| r.strip_prefix("fn "))
            });
        let Some(rest) = sig else { continue };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        // A declaration without a body (a trait's) ends at ';' before any '{'.
        let ahead = lines[i..lines.len().min(i + 12)].join(" ");
        match (ahead.find('{'), ahead.find(';')) {
            (Some(b), Some(s)) if s < b => continue,
            (None, _) => continue,
            _ => {}
        }
        let close = format!("{indent}}}");
        let end = lines[i + 1..]
            .iter()
            .position(|l| l.starts_with(&close) && !l.starts_with(&format!("{close} else")))
            .map_or(lines.len(), |p| i + 1 + p);
        let len = end - i + 1;
        if len > max {
            long.push((name, len));
        }
    }
    long
}

#[test]
fn no_production_file_or_function_is_too_long() {
    const MAX_FILE: usize = 500;
    const MAX_FN: usize = 100;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut over = Vec::new();
    for src in [
        root.join("crates/core/src"),
        root.join("crates/adapters/src"),
        root.join("crates/runtime/src"),
        root.join("src"),
    ] {
        for file in sources(&src) {
            let name = file.file_name().unwrap().to_string_lossy().into_owned();
            // Test doubles and test modules are not production code.
            if ["tests.rs", "test_util.rs", "testing.rs"].contains(&name.as_str()) {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            let lines = production_lines(&text);
            if lines.len() > MAX_FILE {
                over.push(format!("{}: {} lines", file.display(), lines.len()));
            }
            for (f, n) in long_functions(&lines, MAX_FN) {
                over.push(format!("{}: fn {f} is {n} lines", file.display()));
            }
        }
    }
    assert!(
        over.is_empty(),
        "over {MAX_FILE} lines a file or {MAX_FN} a function:\n{}",
        over.join("\n")
    );
}

#[test]
fn the_length_check_measures_functions_from_signature_to_brace() {
    let text = "trait T {\n    fn decl(&self) -> u8;\n}\nfn short() {\n    let x = 1;\n}\n";
    let lines: Vec<&str> = text.lines().collect();
    assert!(long_functions(&lines, 3).is_empty());
    assert_eq!(long_functions(&lines, 2), vec![("short".to_owned(), 3)]);
}

/// `rust-version` in Cargo.toml is a promise: it may not be older than what any locked
/// dependency built for this platform (tests included) declares it needs. It said 1.89 while
/// the locked redb needed 1.90.
#[test]
fn the_declared_rust_version_is_at_least_every_locked_dependencys() {
    let meta = cargo_metadata(&["--locked", "--filter-platform", "x86_64-unknown-linux-gnu"]);
    let version = |s: &str| -> (u64, u64, u64) {
        let mut parts = s.split('.').map(|p| p.parse::<u64>().expect("a number"));
        (
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        )
    };
    let resolved: BTreeSet<&str> = meta["resolve"]["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    let packages = meta["packages"].as_array().expect("packages");
    let declared = packages
        .iter()
        .find(|p| p["name"] == "command-poller")
        .and_then(|p| p["rust_version"].as_str())
        .expect("command-poller declares a rust-version");
    let needs: Vec<String> = packages
        .iter()
        .filter(|p| p["id"].as_str().is_some_and(|id| resolved.contains(id)))
        .filter_map(|p| {
            let needed = p["rust_version"].as_str()?;
            (version(needed) > version(declared))
                .then(|| format!("{} {} needs {needed}", p["name"], p["version"]))
        })
        .collect();
    assert!(
        needs.is_empty(),
        "Cargo.toml declares rust-version {declared}, but: {needs:?}"
    );
}
