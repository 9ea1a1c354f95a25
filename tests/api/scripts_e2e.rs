//! The shell scripts a user runs (`scripts/ensure-rabbitmq.sh`, `scripts/ensure-stores.sh`,
//! `scripts/stop-stores.sh`) work both ways the README promises: for root without `sudo`, and
//! for a non-root user with `sudo`. Each run starts private Redis and PostgreSQL instances on
//! ports of its own (`TEST_REDIS_PORT`, `TEST_POSTGRES_PORT`), checks they answer, and stops
//! them again. A `sudo` shim first on the PATH records every call: root must never call it, the
//! user must go through it for the broker check (`rabbitmqctl` needs root). Needs root (to
//! create the throwaway user and its sudoers entry, both removed afterwards) and `sudo`
//! (`scripts/test.sh` installs it).

use crate::common::free_port;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("command starts");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A working directory laid out like a checkout: `scripts/` copied in, and `bin/sudo`, a shim
/// that appends its arguments to `sudo.log` and then hands over to the real `sudo`, or refuses
/// when `real` is false.
struct Workspace {
    dir: PathBuf,
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Workspace {
    fn new(real_sudo: bool) -> Self {
        let dir = PathBuf::from(format!("/tmp/cp-scripts-{}", uuid::Uuid::new_v4().simple()));
        let scripts = dir.join("scripts");
        std::fs::create_dir_all(&scripts).unwrap();
        for f in ["ensure-rabbitmq.sh", "ensure-stores.sh", "stop-stores.sh"] {
            std::fs::copy(Path::new("scripts").join(f), scripts.join(f)).unwrap();
        }
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let log = dir.join("sudo.log");
        let then = if real_sudo {
            "exec /usr/bin/sudo \"$@\"".to_owned()
        } else {
            "echo 'sudo called by root' >&2; exit 97".to_owned()
        };
        let shim = format!("#!/bin/sh\necho \"$*\" >> '{}'\n{then}\n", log.display());
        std::fs::write(bin.join("sudo"), shim).unwrap();
        std::fs::set_permissions(bin.join("sudo"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(&log, "").unwrap();
        std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666)).unwrap();
        Workspace { dir }
    }

    fn path(&self) -> &Path {
        &self.dir
    }

    fn sudo_calls(&self) -> String {
        std::fs::read_to_string(self.path().join("sudo.log")).unwrap()
    }

    fn path_var(&self) -> String {
        format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            self.path().join("bin").display()
        )
    }
}

/// A throwaway login with passwordless sudo; the user, its home and its sudoers entry are
/// removed when this is dropped.
struct SudoUser {
    name: String,
    sudoers: PathBuf,
}

impl SudoUser {
    fn create() -> Self {
        let name = format!("cpt{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        run(Command::new("useradd").args(["-m", "-s", "/bin/bash", &name]));
        let sudoers = PathBuf::from(format!("/etc/sudoers.d/{name}"));
        std::fs::write(&sudoers, format!("{name} ALL=(ALL) NOPASSWD:ALL\n")).unwrap();
        std::fs::set_permissions(&sudoers, std::fs::Permissions::from_mode(0o440)).unwrap();
        SudoUser { name, sudoers }
    }
}

impl Drop for SudoUser {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.sudoers);
        let _ = Command::new("pkill").args(["-u", &self.name]).status();
        let _ = Command::new("userdel").args(["-r", &self.name]).output();
    }
}

/// Stops the instances on these ports even when an assertion failed half-way.
struct StopStores {
    ws: PathBuf,
    user: Option<String>,
    redis: u16,
    redis_tls: u16,
    postgres: u16,
}

impl StopStores {
    fn command(&self) -> Command {
        let script = self.ws.join("scripts/stop-stores.sh");
        let mut cmd = match &self.user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--", "bash"]).arg(script);
                c
            }
            None => {
                let mut c = Command::new("bash");
                c.arg(script);
                c
            }
        };
        cmd.env("TEST_REDIS_PORT", self.redis.to_string())
            .env("TEST_REDIS_TLS_PORT", self.redis_tls.to_string())
            .env("TEST_POSTGRES_PORT", self.postgres.to_string())
            .current_dir("/");
        cmd
    }
}

impl Drop for StopStores {
    fn drop(&mut self) {
        let _ = self.command().output();
        let _ = std::fs::remove_dir_all(format!(
            "/var/tmp/command-poller-test-stores/postgres-{}",
            self.postgres
        ));
    }
}

/// Runs the three scripts as `user` (root when `None`) with the shim first on the PATH and
/// checks the private instances answer, then stop.
fn ensure_and_stop(ws: &Workspace, user: Option<&str>) {
    let (redis, redis_tls, postgres) = (free_port(), free_port(), free_port());
    let stop = StopStores {
        ws: ws.path().to_owned(),
        user: user.map(str::to_owned),
        redis,
        redis_tls,
        postgres,
    };
    let script = |name: &str| {
        let mut cmd = match user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--", "bash"]);
                c
            }
            None => Command::new("bash"),
        };
        cmd.arg(ws.path().join("scripts").join(name))
            .env_clear()
            .env("PATH", ws.path_var())
            .env("HOME", if user.is_some() { "/tmp" } else { "/root" })
            .env("TEST_REDIS_PORT", redis.to_string())
            .env("TEST_REDIS_TLS_PORT", redis_tls.to_string())
            .env("TEST_POSTGRES_PORT", postgres.to_string())
            .current_dir("/");
        cmd
    };
    run(&mut script("ensure-rabbitmq.sh"));
    let out = run(&mut script("ensure-stores.sh"));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("redis: running (private, 127.0.0.1:{redis})")),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "postgres: running (private, 127.0.0.1:{postgres})"
        )),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "redis: running with TLS (private, 127.0.0.1:{redis_tls})"
        )),
        "{said}"
    );
    assert!(port_open(redis) && port_open(redis_tls) && port_open(postgres));
    let pong = run(Command::new("redis-cli").args(["-p", &redis.to_string(), "ping"]));
    assert_eq!(String::from_utf8_lossy(&pong.stdout).trim(), "PONG");
    let one = run(Command::new("psql").args([
        "-At",
        &format!("postgres://postgres@127.0.0.1:{postgres}/test"),
        "-c",
        "select 1",
    ]));
    assert_eq!(String::from_utf8_lossy(&one.stdout).trim(), "1");
    // Running it again finds them up and starts nothing.
    let again = run(&mut script("ensure-stores.sh"));
    assert!(!String::from_utf8_lossy(&again.stdout).contains("starting"));

    run(&mut stop.command());
    assert!(!port_open(redis), "redis still up on {redis}");
    assert!(!port_open(redis_tls), "redis (TLS) still up on {redis_tls}");
    assert!(!port_open(postgres), "postgres still up on {postgres}");
}

#[test]
fn the_scripts_run_as_root_without_calling_sudo() {
    assert!(is_root(), "this test creates users and needs root");
    let ws = Workspace::new(false);
    ensure_and_stop(&ws, None);
    assert_eq!(ws.sudo_calls(), "", "root called sudo");
}

#[test]
fn the_scripts_run_as_a_user_with_sudo() {
    assert!(is_root(), "this test creates users and needs root");
    assert!(
        Path::new("/usr/bin/sudo").exists(),
        "needs sudo (scripts/test.sh installs it)"
    );
    let user = SudoUser::create();
    let ws = Workspace::new(true);
    run(Command::new("chown")
        .args(["-R", &user.name])
        .arg(ws.path()));
    ensure_and_stop(&ws, Some(&user.name));
    let calls = ws.sudo_calls();
    assert!(
        calls.contains("rabbitmqctl"),
        "the broker check should go through sudo: {calls:?}"
    );
    // The user's own PostgreSQL cluster lives in its workspace, owned by it.
    let stores = ws.path().join("target/test-stores");
    let owner = run(Command::new("stat").args(["-c", "%U"]).arg(&stores));
    assert_eq!(String::from_utf8_lossy(&owner.stdout).trim(), user.name);
}
