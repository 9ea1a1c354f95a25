//! Containers can't run on these machines (the sandbox refuses the runtime's setrlimit), so the
//! image's build stage is replayed instead: exactly what `deploy/Dockerfile` copies into its
//! build stage goes into an empty directory, and cargo must accept the manifest there and build
//! the binary. The build context's `.dockerignore` must let every COPY source through.

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
    // …and the binary builds from what was copied (checked, sharing this repository's compiled
    // dependencies, so it takes seconds rather than a release build's minutes).
    let target = std::env::current_dir()
        .unwrap()
        .join("target")
        .join("image-replay");
    let check = Command::new(env!("CARGO"))
        .args([
            "check",
            "--locked",
            "--offline",
            "--bin",
            "command-poller",
            "--manifest-path",
        ])
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "the build stage does not build: {}",
        String::from_utf8_lossy(&check.stderr)
    );
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
