//! Every deployment manifest parses, and the parts that must agree with the code do.

use std::path::Path;

fn docs(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.split("\n---")
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .map(|d| {
            serde_norway::from_str::<serde_json::Value>(d)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect()
}

#[test]
fn every_k8s_manifest_parses_and_has_kind_and_api_version() {
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir("deploy/k8s").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            for d in docs(&path) {
                assert!(
                    d["apiVersion"].is_string() && d["metadata"]["name"].is_string(),
                    "{}",
                    path.display()
                );
                kinds.push(d["kind"].as_str().unwrap().to_owned());
            }
        }
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ConfigMap",
            "Deployment",
            "Namespace",
            "NetworkPolicy",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "PrometheusRule",
            "ScaledObject",
            "Secret",
            "Secret",
            "Secret",
            "Secret",
            "Service",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
            "StatefulSet",
            "StatefulSet",
            "TriggerAuthentication"
        ]
    );
}

#[test]
fn the_deployment_matches_the_poller() {
    let d = &docs(Path::new("deploy/k8s/deployment.yaml"))[0];
    let pod = &d["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(
        c["resources"]["limits"]["memory"].is_string()
            && c["resources"]["requests"]["cpu"].is_string()
    );
    let settings =
        command_poller::settings::Settings::load_isolated(Path::new("config"), "production")
            .unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > settings.processing.drain_timeout.as_secs(),
        "graceful termination must outlast the drain"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let port = c["ports"][0]["containerPort"].as_u64().unwrap();
    assert_eq!(port, u64::from(settings.health.listen.port()));
    let keda = docs(Path::new("deploy/k8s/keda-scaledobject.yaml"));
    let so = keda.iter().find(|d| d["kind"] == "ScaledObject").unwrap();
    assert_eq!(
        so["spec"]["triggers"][0]["metadata"]["queueName"],
        settings.topology.commands_queue.as_str()
    );
    assert_eq!(so["spec"]["scaleTargetRef"]["name"], d["metadata"]["name"]);
}

#[test]
fn compose_and_definitions_parse() {
    let compose = &docs(Path::new("docker-compose.yml"))[0];
    for svc in ["rabbitmq", "poller", "bridge", "audit-sink"] {
        assert!(compose["services"][svc].is_object(), "compose has no {svc}");
    }
    let defs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("deploy/rabbitmq/definitions.json").unwrap())
            .unwrap();
    let queues: Vec<&str> = defs["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    let settings =
        command_poller::settings::Settings::load_isolated(Path::new("config"), "production")
            .unwrap();
    for q in [
        &settings.topology.commands_queue,
        &settings.topology.dead_letter_queue,
        &settings.audit.queue,
        &settings.control.state_queue,
        &settings.approval.queue,
    ] {
        assert!(queues.contains(&q.as_str()), "definitions lack {q}");
    }
}

#[test]
fn clasp_pushes_only_the_web_app() {
    // clasp pushes every .gs, .js, .html and .json file under its rootDir (the Node tests,
    // with their top-level require, used to be pushed as server code).
    fn pushable(dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                pushable(&p, out);
            } else if matches!(
                p.extension().and_then(|x| x.to_str()),
                Some("gs" | "js" | "html" | "json")
            ) {
                out.push(
                    p.strip_prefix("deploy/apps-script")
                        .unwrap()
                        .display()
                        .to_string(),
                );
            }
        }
    }
    let mut files = Vec::new();
    pushable(Path::new("deploy/apps-script"), &mut files);
    files.sort();
    assert_eq!(files, ["Code.gs", "appsscript.json"]);
}

#[test]
fn the_disruption_budget_never_blocks_a_drain_during_a_halt() {
    let pdb = docs(Path::new("deploy/k8s/pdb.yaml"));
    assert_eq!(pdb[0]["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow");
}

#[test]
fn everything_lives_in_its_namespace_without_an_api_token() {
    let ns = docs(Path::new("deploy/k8s/namespace.yaml"))[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    for entry in std::fs::read_dir("deploy/k8s").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        for d in docs(&path) {
            if d["kind"] != "Namespace" {
                assert_eq!(
                    d["metadata"]["namespace"],
                    ns.as_str(),
                    "{}",
                    path.display()
                );
            }
        }
    }
    let dep = &docs(Path::new("deploy/k8s/deployment.yaml"))[0]["spec"]["template"]["spec"];
    let sa = &docs(Path::new("deploy/k8s/serviceaccount.yaml"))[0];
    assert_eq!(dep["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(dep["automountServiceAccountToken"], false);
    assert_eq!(sa["automountServiceAccountToken"], false);
    let np = &docs(Path::new("deploy/k8s/networkpolicy.yaml"))[0]["spec"];
    assert_eq!(
        np["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "command-poller"
    );
    assert_eq!(
        np["ingress"][0]["ports"][0]["port"], 9464,
        "only the health port"
    );
    let egress: Vec<u64> = np["egress"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["ports"].as_array().unwrap().iter())
        .filter_map(|p| p["port"].as_u64())
        .collect();
    for port in [53, 5672, 443] {
        assert!(egress.contains(&port), "egress to {port}");
    }
}

#[test]
fn the_audit_sink_is_a_workload_of_one_writer_with_its_own_volume() {
    let sts = &docs(Path::new("deploy/k8s/audit-sink.yaml"))[0];
    assert_eq!(sts["kind"], "StatefulSet");
    assert_eq!(
        sts["spec"]["replicas"], 1,
        "one writer, so the chain can't fork"
    );
    let pod = &sts["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["args"][0], "audit");
    assert_eq!(c["args"][1], "sink");
    assert!(c["args"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a == "/data/audit.jsonl"));
    assert_eq!(c["volumeMounts"][0]["mountPath"], "/data");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"],
        c["volumeMounts"][0]["name"]
    );
    // Compose restarts what stops.
    let compose: serde_json::Value =
        serde_norway::from_str(&std::fs::read_to_string("docker-compose.yml").unwrap()).unwrap();
    assert!(
        compose["services"]["rabbitmq"]["image"]
            .as_str()
            .unwrap()
            .starts_with("rabbitmq:4."),
        "a supported RabbitMQ release line"
    );
    for (name, svc) in compose["services"].as_object().unwrap() {
        assert_eq!(svc["restart"], "unless-stopped", "{name}");
    }
}

#[test]
fn more_than_one_replica_always_shares_a_store() {
    // Production refuses the embedded store (one poller per file): compose and the ConfigMap
    // configure Redis, and each ships one.
    let cm = &docs(Path::new("deploy/k8s/configmap.yaml"))[0];
    let prod: toml::Value =
        toml::from_str(cm["data"]["production.toml"].as_str().unwrap()).unwrap();
    assert_eq!(prod["idempotency"]["backend"].as_str(), Some("redis"));
    let redis = docs(Path::new("deploy/k8s/redis.yaml"));
    assert!(redis.iter().any(|d| d["kind"] == "StatefulSet"));
    let secret = &docs(Path::new("deploy/k8s/secret.yaml"))[0]["stringData"];
    assert!(secret["POLLER__IDEMPOTENCY__URL"]
        .as_str()
        .unwrap()
        .contains("command-poller-redis"));
    assert!(secret["POLLER_STORE_KEY"].is_string());
    let compose: serde_json::Value =
        serde_norway::from_str(&std::fs::read_to_string("docker-compose.yml").unwrap()).unwrap();
    let env = &compose["services"]["poller"]["environment"];
    assert_eq!(env["POLLER__IDEMPOTENCY__BACKEND"], "redis");
    assert_eq!(
        env["POLLER__IDEMPOTENCY__URL"],
        "redis://poller:${REDIS_PASSWORD:?set REDIS_PASSWORD}@redis:6379"
    );
    assert!(compose["services"]["redis"].is_object());
    let cmd = compose["services"]["redis"]["command"].to_string();
    assert!(cmd.contains(r#""default","off""#), "{cmd}");
    // Item 13 of the levers issue: any pod could plant slot leases in the shipped Redis.
    let sts = redis.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    let args: Vec<String> = sts["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let default_off = args.windows(3).any(|w| w == ["--user", "default", "off"]);
    assert!(default_off, "the default user must be off: {args:?}");
    assert!(args.iter().any(|a| a == ">$(REDIS_PASSWORD)"), "{args:?}");
    let url = secret["POLLER__IDEMPOTENCY__URL"].as_str().unwrap();
    assert!(url.starts_with("rediss://poller:"), "{url}");
    let np = redis
        .iter()
        .find(|d| d["kind"] == "NetworkPolicy")
        .expect("a NetworkPolicy for Redis");
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "command-poller-redis"
    );
    let from = &np["spec"]["ingress"][0]["from"];
    assert_eq!(from.as_array().unwrap().len(), 1, "only the poller's pods");
    assert_eq!(
        from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "command-poller"
    );
}

#[test]
fn the_deploying_guides_users_table_matches_the_definitions() {
    let defs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("deploy/rabbitmq/definitions.json").unwrap())
            .unwrap();
    let mut users: Vec<String> = defs["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap().to_owned())
        .collect();
    users.sort();
    let readme = std::fs::read_to_string("docs/deploying.md").unwrap();
    let start = readme
        .find("The users in the definitions:")
        .expect("the users table");
    let mut table: Vec<String> = readme[start..]
        .lines()
        .skip_while(|l| !l.starts_with("| user"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cell = l.split('|').nth(1).unwrap().trim();
            cell.split('`').nth(1).unwrap().to_owned()
        })
        .collect();
    table.sort();
    assert_eq!(
        table, users,
        "docs/deploying.md users table vs deploy/rabbitmq/definitions.json"
    );
}

/// The test CA's directory (scripts/ensure-stores.sh): the server's key lives beside the
/// private servers when root made it, else in this checkout.
fn test_tls_dir() -> std::path::PathBuf {
    let shared = Path::new("/var/tmp/command-poller-test-stores/tls");
    if shared.join("server.key").exists() {
        shared.to_owned()
    } else {
        Path::new("target/test-stores/tls").to_owned()
    }
}

/// Item 13 of the levers issue, replayed: the shipped Redis StatefulSet's own arguments run by
/// the real redis-server (its certificate paths pointed at the test CA's, its port moved): it
/// speaks TLS only, its default user is off, and the poller's store reaches it as `poller` over
/// `rediss://`, verifying the certificate against the CA file the ConfigMap names.
#[tokio::test]
async fn the_shipped_redis_runs_tls_only_with_the_poller_its_one_user() {
    let redis = docs(Path::new("deploy/k8s/redis.yaml"));
    let sts = redis.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    let container = &sts["spec"]["template"]["spec"]["containers"][0];
    let mounts = container["volumeMounts"].as_array().unwrap();
    let tls_mount = mounts
        .iter()
        .find(|m| m["name"] == "tls")
        .expect("a tls mount");
    assert_eq!(tls_mount["mountPath"], "/tls");
    let volumes = sts["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    assert!(volumes
        .iter()
        .any(|v| v["secret"]["secretName"] == "command-poller-redis-tls"));
    // The poller mounts the CA only, where the ConfigMap's ca_file says.
    let cm = &docs(Path::new("deploy/k8s/configmap.yaml"))[0];
    let prod: toml::Value =
        toml::from_str(cm["data"]["production.toml"].as_str().unwrap()).unwrap();
    let ca_file = prod["idempotency"]["ca_file"].as_str().unwrap().to_owned();
    let dep = &docs(Path::new("deploy/k8s/deployment.yaml"))[0]["spec"]["template"]["spec"];
    let ca_vol = dep["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["secret"]["secretName"] == "command-poller-redis-tls")
        .expect("the poller mounts the Redis CA");
    assert_eq!(
        ca_vol["secret"]["items"].as_array().unwrap().len(),
        1,
        "the CA only"
    );
    assert_eq!(ca_vol["secret"]["items"][0]["key"], "ca.crt");
    let ca_mount = dep["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == ca_vol["name"])
        .unwrap();
    assert_eq!(
        format!("{}/ca.crt", ca_mount["mountPath"].as_str().unwrap()),
        ca_file
    );

    // The arguments, as Kubernetes passes them, with this machine's paths and a free port.
    let tls = test_tls_dir();
    let dir = std::env::temp_dir().join(format!("redis-replay-{}", crate::common::suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let password = format!("pw-{}", crate::common::suffix());
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(args[0], "redis-server");
    let mut replayed = Vec::new();
    for a in &args[1..] {
        replayed.push(match a.as_str() {
            "/tls/tls.crt" => tls.join("server.pem").display().to_string(),
            "/tls/tls.key" => tls.join("server.key").display().to_string(),
            "/tls/ca.crt" => tls.join("ca.pem").display().to_string(),
            "/data" => dir.display().to_string(),
            "6379" => port.to_string(),
            other => other.replace("$(REDIS_PASSWORD)", &password),
        });
    }
    replayed.extend([
        "--bind".into(),
        "127.0.0.1".into(),
        "--save".into(),
        "".into(),
    ]);
    let mut server = std::process::Command::new("redis-server")
        .args(&replayed)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-server (scripts/ensure-stores.sh installs it)");
    let settings = |url: String| {
        let mut s = crate::common::test_settings(&crate::common::suffix()).idempotency;
        s.backend = command_poller::store::Backend::Redis;
        s.url = url;
        s.ca_file = Some(tls.join("ca.pem"));
        s.key_prefix = format!("t-{}", crate::common::suffix());
        s
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let store = loop {
        let tls_url = format!("rediss://poller:{password}@127.0.0.1:{port}");
        match command_poller::store::open(&settings(tls_url)).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the poller never reached the shipped Redis over TLS: {e}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(
        store
            .claim("k", "owner", std::time::Duration::from_secs(5))
            .await
            .unwrap(),
        command_poller::store::Claim::Mine
    );
    // In the clear, or as the default user, or with a wrong password: nothing.
    let refused = [
        format!("redis://poller:{password}@127.0.0.1:{port}"),
        format!("rediss://127.0.0.1:{port}"),
        format!("rediss://poller:wrong@127.0.0.1:{port}"),
    ];
    for url in refused {
        let got = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            command_poller::store::open(&settings(url.clone())),
        )
        .await;
        let reached = match got {
            Ok(Ok(s)) => s
                .claim("k2", "o", std::time::Duration::from_secs(5))
                .await
                .is_ok(),
            _ => false,
        };
        assert!(!reached, "{url} reached the store");
    }
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The compose recipe in docs/deploying.md, run as a new user would (without its last line,
/// `docker compose up`), writes every variable docker-compose.yml requires (`${NAME:?...}`):
/// otherwise `docker compose` refuses to start, naming the first one missing. It left out
/// APPROVER_PASSWORD.
#[test]
fn the_compose_recipe_sets_every_variable_compose_requires() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let guide = std::fs::read_to_string(root.join("docs/deploying.md")).unwrap();
    let recipe = guide
        .split("```sh\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .find(|b| b.contains("> .env") && b.contains("docker compose up"))
        .expect("the compose recipe in docs/deploying.md");
    let script: String = recipe
        .lines()
        .filter(|l| !l.trim_start().starts_with("docker compose"))
        .map(|l| format!("{l}\n"))
        .collect();
    let dir = std::env::temp_dir().join(format!("compose-recipe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = std::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env = std::fs::read_to_string(dir.join(".env")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let set: std::collections::BTreeSet<&str> = env
        .lines()
        .filter_map(|l| l.split_once('=').filter(|(_, v)| !v.is_empty()))
        .map(|(k, _)| k)
        .collect();
    let compose = std::fs::read_to_string(root.join("docker-compose.yml")).unwrap();
    let required: std::collections::BTreeSet<&str> = compose
        .split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once(":?").map(|(name, _)| name))
        .filter(|name| name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect();
    assert!(!required.is_empty());
    let missing: Vec<_> = required.difference(&set).collect();
    assert!(
        missing.is_empty(),
        "docker-compose.yml requires {missing:?}, which the recipe doesn't set"
    );
    // The file's own header lists them too.
    let header: String = compose.lines().take_while(|l| l.starts_with('#')).collect();
    for name in &required {
        assert!(
            header.contains(name),
            "docker-compose.yml's header leaves out {name}"
        );
    }
}

/// The alert rules pass `promtool check rules` and their unit tests (each rule fires on what it
/// is for and stays quiet otherwise), and the Prometheus Operator's manifest carries exactly
/// the same groups.
#[test]
fn the_alert_rules_pass_promtool_and_the_operator_manifest_carries_them_unchanged() {
    for args in [
        ["check", "rules", "deploy/monitoring/alerts.rules.yml"],
        ["test", "rules", "deploy/monitoring/alerts.test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .output()
            .expect("promtool (Debian's prometheus package; scripts/test.sh installs it)");
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let plain = &docs(Path::new("deploy/monitoring/alerts.rules.yml"))[0];
    let operator = &docs(Path::new("deploy/k8s/prometheusrule.yaml"))[0];
    assert_eq!(operator["kind"], "PrometheusRule");
    assert_eq!(operator["spec"]["groups"], plain["groups"]);
}

/// Every metric the dashboard and the alert rules query is one the poller exports (a renamed
/// metric would leave a panel empty and a rule silent).
#[test]
fn the_dashboard_and_the_rules_query_only_metrics_the_poller_exports() {
    let m = command_poller::metrics::Metrics::with_every_family();
    let text =
        command_poller::metrics::classic_text(&m.render(0, command_poller::control::Mode::Running));
    let exported: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let used = |text: &str| -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        let mut rest = text;
        while let Some(at) = rest.find("command_poller_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            out.insert(base.to_owned());
        }
        out
    };
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string("deploy/monitoring/grafana-dashboard.json").unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect();
    assert!(exprs.len() >= 15, "{exprs:?}");
    let rules = std::fs::read_to_string("deploy/monitoring/alerts.rules.yml").unwrap();
    let mut all = used(&exprs.join("\n"));
    all.extend(used(&rules));
    assert!(all.len() >= 15, "{all:?}");
    for name in &all {
        assert!(
            exported.contains(name.as_str()),
            "{name} is queried but not exported; exported: {exported:?}"
        );
    }
}
