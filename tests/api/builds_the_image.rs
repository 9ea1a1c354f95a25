//! Containers can't run on these machines (the sandbox refuses the runtime's setrlimit), so the
//! image's build stage is replayed instead: exactly what `deploy/Dockerfile` copies into its
//! build stage goes into an empty directory, cargo must accept the manifest there, and every file
//! cargo read to build the release binary (its dep-info) must be in it; without a release build,
//! the binary is checked from the copy. The build context's `.dockerignore` must let every COPY
//! source through.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `COPY <src>... <dest>` lines of the stage named `stage` (up to the next FROM).
fn copies(dockerfile: &str, stage: &str) -> Vec<(Vec<String>, String)> {
    let mut in_stage = false;
    let mut out = Vec::new();
    for line in dockerfile.lines().map(str::trim) {
        if let Some(from) = line.strip_prefix("FROM ") {
            in_stage = from.trim_end().ends_with(&format!(" AS {stage}"));
            continue;
        }
        if !in_stage {
            continue;
        }
        if let Some(args) = line.strip_prefix("COPY ") {
            let mut words: Vec<String> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .map(str::to_owned)
                .collect();
            let dest = words.pop().expect("COPY has a destination");
            out.push((words, dest));
        }
    }
    out
}

/// The repository files a dep-info file (`target: input input ...`, spaces in names escaped)
/// names that are not in `copy` at the same relative path.
fn missing_inputs(dep_info: &str, repo: &Path, copy: &Path) -> Vec<PathBuf> {
    let inputs = dep_info.lines().next().unwrap_or_default();
    let inputs = inputs.split_once(": ").map_or("", |(_, rest)| rest);
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = inputs.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            ' ' => words.push(std::mem::take(&mut word)),
            c => word.push(c),
        }
    }
    words.push(word);
    assert!(
        words.len() > 10,
        "a dep-info file names the binary's sources: {inputs:.200}"
    );
    words
        .iter()
        .filter_map(|w| Path::new(w).strip_prefix(repo).ok())
        .filter(|rel| !copy.join(rel).exists())
        .map(Path::to_path_buf)
        .collect()
}

/// `cargo check` of the binary from the copied tree, in a target directory of its own.
fn check_from_copy(manifest: &Path) {
    let target = std::env::current_dir()
        .unwrap()
        .join("target")
        .join("image-replay");
    let check = Command::new(env!("CARGO"))
        .args(["check", "--locked", "--offline", "--bin", "command-poller"])
        .arg("--manifest-path")
        .arg(manifest)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "the build stage does not build: {}",
        String::from_utf8_lossy(&check.stderr)
    );
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            copy_tree(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}

#[test]
fn the_build_stage_has_what_the_manifest_needs_and_builds() {
    let dockerfile = std::fs::read_to_string("deploy/Dockerfile").unwrap();
    let build = copies(&dockerfile, "build");
    assert!(!build.is_empty(), "no COPY in the build stage");
    let dir = std::env::temp_dir().join(format!("image-build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (sources, dest) in &build {
        for src in sources {
            let target: PathBuf = if dest.ends_with('/') || dest == "." || dest == "./" {
                dir.join(dest).join(Path::new(src).file_name().unwrap())
            } else {
                dir.join(dest)
            };
            copy_tree(Path::new(src), &target);
        }
    }
    let manifest = dir.join("Cargo.toml");
    // The manifest is accepted there (every target it names is present, the lock file holds)…
    let meta = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--locked",
            "--offline",
            "--format-version",
            "1",
            "--manifest-path",
        ])
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(
        meta.status.success(),
        "cargo refuses the build stage's manifest: {}",
        String::from_utf8_lossy(&meta.stderr)
    );
    // …and every file cargo read to build the release binary (its dep-info, written by the
    // build scripts/test.sh makes first) is in the copied tree. Without that build, the binary
    // is checked from the copy instead (minutes of compiling: every dependency again).
    let dep_info = Path::new("target/release/command-poller.d");
    match std::fs::read_to_string(dep_info) {
        Ok(text) => {
            let missing = missing_inputs(&text, &std::env::current_dir().unwrap(), &dir);
            assert!(
                missing.is_empty(),
                "the build stage lacks what cargo read to build the binary: {missing:?}"
            );
        }
        Err(_) => check_from_copy(&manifest),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_build_context_lets_every_copy_source_through() {
    let dockerfile = std::fs::read_to_string("deploy/Dockerfile").unwrap();
    let ignore = std::fs::read_to_string(".dockerignore").expect("a .dockerignore");
    let lines: Vec<&str> = ignore.lines().map(str::trim).collect();
    assert!(
        lines.contains(&"*"),
        "the context starts from nothing (target/ stays out)"
    );
    let all: Vec<String> = dockerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("COPY "))
        .filter(|a| !a.contains("--from="))
        .flat_map(|a| {
            let mut w: Vec<&str> = a.split_whitespace().collect();
            w.pop();
            w.into_iter().map(str::to_owned).collect::<Vec<_>>()
        })
        .collect();
    assert!(all.contains(&"config".to_string()));
    for src in all {
        let allowed = lines.contains(&format!("!{src}").as_str())
            || lines.contains(&format!("!{src}/").as_str());
        assert!(allowed, "{src} is copied but .dockerignore keeps it out");
    }
}

#[test]
fn the_image_pins_its_bases_and_checks_its_health() {
    let dockerfile = std::fs::read_to_string("deploy/Dockerfile").unwrap();
    for from in dockerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("FROM "))
    {
        let image = from.split_whitespace().next().unwrap();
        let tag = image.split(':').nth(1).unwrap_or("");
        assert!(
            !tag.is_empty() && tag != "latest" && !tag.starts_with("1-"),
            "{image}: pin a version"
        );
    }
    assert!(dockerfile.contains("HEALTHCHECK"));
    assert!(dockerfile.contains("USER 10001"));
    assert!(dockerfile.contains("VOLUME /data"));
}

#[test]
fn a_source_the_build_stage_did_not_copy_is_named() {
    let root = std::env::temp_dir().join(format!("dep-info-{}", std::process::id()));
    let (repo, copy) = (root.join("repo"), root.join("copy"));
    for d in [repo.join("src"), copy.join("src")] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(copy.join("src/main.rs"), "").unwrap();
    let mut text = format!("{}/target/release/x:", repo.display());
    for name in ["main.rs", "with\\ space.rs"].iter().chain(&["a.rs"; 9]) {
        text.push_str(&format!(" {}/src/{name}", repo.display()));
    }
    text.push_str(" /elsewhere/registry/lib.rs\n");
    let missing = missing_inputs(&text, &repo, &copy);
    std::fs::remove_dir_all(&root).unwrap();
    assert_eq!(
        missing,
        [&["src/with space.rs"][..], &["src/a.rs"; 9][..]]
            .concat()
            .iter()
            .map(PathBuf::from)
            .collect::<Vec<_>>()
    );
}
