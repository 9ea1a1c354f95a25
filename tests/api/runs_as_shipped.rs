//! The release binary run the way the image runs it: as uid 10001 (via `setpriv`), from a
//! read-only copy of the image's file layout (`/usr/local/bin/command-poller`,
//! `/etc/command-poller/config` with the Kubernetes ConfigMap's `production.toml`, a writable
//! `/data`), with `APP_ENVIRONMENT=production` and every variable of the Secret template. It must
//! start and carry the runbook's three SOPs through. Containers can't run on these machines; this
//! replays what the container would do. Needs root (to switch users) and the release binary
//! (`scripts/test.sh` builds it first).

use crate::common::free_port;
use crate::common::{suffix, test_settings, Cleanup};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEBUG_BIN: &str = env!("CARGO_BIN_EXE_command-poller");
const IMAGE_UID: &str = "10001";

fn release_binary() -> PathBuf {
    let p = Path::new("target/release/command-poller");
    assert!(
        p.exists(),
        "no release binary: run `cargo build --release --bin command-poller` (scripts/test.sh does)"
    );
    p.to_owned()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// Root-owned, read-only for everyone else: files 0444 (binaries 0555), directories 0555.
fn read_only(p: &Path) {
    let meta = std::fs::metadata(p).unwrap();
    if meta.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            read_only(&e.unwrap().path());
        }
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o555)).unwrap();
    } else {
        let exec = meta.permissions().mode() & 0o111 != 0;
        let mode = if exec { 0o555 } else { 0o444 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

/// The `production.toml` the ConfigMap mounts.
fn configmap_production_toml() -> String {
    let text = std::fs::read_to_string("deploy/k8s/configmap.yaml").unwrap();
    let cm: serde_json::Value = serde_norway::from_str(&text).unwrap();
    cm["data"]["production.toml"].as_str().unwrap().to_owned()
}

/// The Secret template's variable names (the poller's own Secret).
fn secret_variables() -> Vec<String> {
    let text = std::fs::read_to_string("deploy/k8s/secret.yaml").unwrap();
    let first = text.split("\n---").next().unwrap();
    let s: serde_json::Value = serde_norway::from_str(first).unwrap();
    s["stringData"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_release_binary_runs_as_the_image_does_and_carries_the_three_sops() {
    assert_eq!(
        effective_uid(),
        0,
        "this test switches to the image's uid, so it runs as root (as CI does)"
    );
    let bin = release_binary();
    let sfx = suffix();
    let settings = test_settings(&sfx);
    let _cleanup = Cleanup(settings.clone());

    // The image's layout, in a directory only root may write to, plus a writable /data.
    let root = std::env::temp_dir().join(format!("image-root-{sfx}"));
    let etc = root.join("etc/command-poller");
    copy_dir(Path::new("config"), &etc.join("config"));
    std::fs::write(
        etc.join("config/production.toml"),
        configmap_production_toml(),
    )
    .unwrap();
    let bindir = root.join("usr/local/bin");
    std::fs::create_dir_all(&bindir).unwrap();
    std::fs::copy(&bin, bindir.join("command-poller")).unwrap();
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    read_only(&root.join("etc"));
    read_only(&root.join("usr"));
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o555)).unwrap();
    assert!(Command::new("chown")
        .args([&format!("{IMAGE_UID}:{IMAGE_UID}")])
        .arg(&data)
        .status()
        .unwrap()
        .success());

    // The bridge the Secret points at: a simulator process.
    let secret = format!("shipped-{sfx}-with-enough-bytes");
    let sim_port = free_port();
    let _sim = Kill(
        crate::common::isolated(DEBUG_BIN)
            .args([
                "bridge-simulator",
                "--listen",
                &format!("127.0.0.1:{sim_port}"),
            ])
            .env("BRIDGE_SECRET", &secret)
            .env("APP_ENVIRONMENT", "local")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // Every variable of the Secret template, with values for this machine.
    let mut env: Vec<(String, String)> = Vec::new();
    for var in secret_variables() {
        let value = match var.as_str() {
            "POLLER__AMQP__URL" => crate::common::AMQP.to_owned(),
            "POLLER__BRIDGE__URL" => format!("http://127.0.0.1:{sim_port}/exec"),
            "BRIDGE_SECRET" => secret.clone(),
            "POLLER__IDEMPOTENCY__URL" => crate::common::REDIS.to_owned(),
            "POLLER_STORE_KEY" => format!("store-key-{sfx}-with-enough-bytes"),
            _ => String::new(),
        };
        env.push((var, value));
    }
    // This test's own broker names and store prefix (the broker and Redis are shared); the
    // health port moves off 9464 for the same reason. Nothing else is overridden.
    env.extend(
        crate::common::poller_env(&settings)
            .into_iter()
            .filter(|(k, _)| {
                k.starts_with("POLLER__TOPOLOGY__")
                    || k.starts_with("POLLER__CONTROL__")
                    || k.starts_with("POLLER__AUDIT__")
                    || k.starts_with("POLLER__APPROVAL__")
                    || k == "POLLER__INSTANCE_ID"
                    || k == "POLLER__AMQP__CONNECTION_NAME"
            }),
    );
    let health = free_port();
    env.push((
        "POLLER__HEALTH__LISTEN".into(),
        format!("127.0.0.1:{health}"),
    ));
    env.push(("POLLER__HEALTH__STATUS_LISTEN".into(), "127.0.0.1:0".into()));
    env.push((
        "POLLER__IDEMPOTENCY__KEY_PREFIX".into(),
        format!("shipped-{sfx}"),
    ));
    env.push(("APP_ENVIRONMENT".into(), "production".into()));
    // A new deployment holds paused until an operator's first lever; this broker has no
    // operator user for production's `control.operators` (definitions_e2e shows that
    // bootstrap), so this run takes its empty state stream for a new system.
    env.push(("POLLER__CONTROL__EMPTY_STREAM".into(), "running".into()));

    let log = std::env::temp_dir().join(format!("image-run-{sfx}.log"));
    let poller = Kill(
        crate::common::isolated("setpriv")
            .args(["--reuid", IMAGE_UID, "--regid", IMAGE_UID, "--clear-groups"])
            .arg(bindir.join("command-poller"))
            .args(["run", "--log-format", "json"])
            .current_dir(&etc)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .envs(env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    loop {
        let ready = http_status::get(&format!("http://127.0.0.1:{health}/readyz"));
        if ready == Some(200) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "never ready as uid {IMAGE_UID}: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The runbook's three commands, as an agent sends them.
    let agent_env: Vec<(String, String)> = crate::common::poller_env(&settings)
        .into_iter()
        .filter(|(k, _)| k.starts_with("POLLER__TOPOLOGY__") || k == "APP_ENVIRONMENT")
        .collect();
    let send = |file: &str| -> serde_json::Value {
        let out = crate::common::isolated(DEBUG_BIN)
            .args(["send", file, "--wait", "--timeout-secs", "20"])
            .envs(agent_env.iter().cloned())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let r1 = send("examples/commands/sop-int-01-check-status.json");
    assert_eq!(r1["status"], "SUCCESS", "{r1}");
    let r2 = send("examples/commands/sop-int-02-refresh-token.json");
    assert_eq!(r2["status"], "SUCCESS", "{r2}");
    let r3 = send("examples/commands/sop-int-03-connect-integration.json");
    assert_eq!(r3["status"], "BLOCKED", "{r3}");

    // The layout is read-only to uid 10001, so anything it tried to write outside /data would
    // have failed: nothing in its log says so, and the secret is not in it.
    drop(poller);
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!logs.contains("Permission denied"), "{logs}");
    assert!(!logs.contains(&secret), "the bridge secret in the logs");
    let _ = std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755));
    for sub in ["etc", "usr"] {
        let _ = Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(root.join(sub))
            .status();
    }
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_file(&log);
}

/// The effective uid of this process.
fn effective_uid() -> u32 {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// A tiny blocking HTTP GET returning the status code, without pulling in a blocking client.
mod http_status {
    pub fn get(url: &str) -> Option<u16> {
        use std::io::{Read, Write};
        let rest = url.strip_prefix("http://")?;
        let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}")))?;
        let mut s = std::net::TcpStream::connect(host).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        buf.split_whitespace().nth(1)?.parse().ok()
    }
}
