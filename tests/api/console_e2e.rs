//! The operator console in headless Chromium (Debian's `chromium` and `chromium-driver`, driven
//! over WebDriver by fantoccini), against the real broker and two poller replicas: an agent is
//! refused at login, an operator pauses and resumes, an approver approves a parked command, a
//! forged cross-site POST is refused. Screenshots go to `target/console/`.

use crate::common::free_port;
use crate::common::*;
use command_poller::console::{Console, Parts};
use command_poller::control::operator::{new_request_id, Operator};
use command_poller::control::ControlCommand;
use command_poller::outcome::Status;
use command_poller::testing::Script;
use fantoccini::{Client, ClientBuilder, Locator};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// chromedriver on a port of its own, and a headless Chromium session through it.
async fn browser() -> (Driver, Client) {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (Debian's chromium-driver; scripts/test.sh installs it)");
    let driver = Driver(child);
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({"args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"]}),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "no WebDriver session: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    (driver, client)
}

async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn type_into(c: &Client, css: &str, text: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .send_keys(text)
        .await
        .unwrap();
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn login(c: &Client, base: &str, user: &str, password: &str) {
    c.goto(&format!("{base}/login")).await.unwrap();
    type_into(c, "#user", user).await;
    type_into(c, "#password", password).await;
    click(c, "#login").await;
}

/// Types `reason` and presses the lever `button`.
async fn pull(c: &Client, reason: &str, button: &str) {
    type_into(c, "#reason", reason).await;
    click(c, button).await;
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::create_dir_all("target/console").unwrap();
    std::fs::write(format!("target/console/{name}.png"), png).unwrap();
}

/// Waits until the page shows `want` somewhere.
async fn shows(c: &Client, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let src = c.source().await.unwrap();
        if src.contains(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the page never showed {want:?}:\n{src}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_on_call_person_runs_the_runbook_from_the_console() {
    let (op, ap, agent, op2) = (
        BrokerUser::create(),
        BrokerUser::create(),
        BrokerUser::create(),
        BrokerUser::create(),
    );
    let (op_name, ap_name, op2_name) = (op.0.clone(), ap.0.clone(), op2.0.clone());
    let audit_file = std::env::temp_dir().join(format!("console-audit-{}.jsonl", suffix()));
    let audit_path = audit_file.display().to_string();
    let h = Harness::start(Options {
        panel: Some(command_poller::testing::scripted_panel(
            vec![("security", Script::Deny, 0), ("business", Script::Deny, 0)],
            Duration::from_secs(2),
            2,
        )),
        tweak: Box::new(move |s| {
            s.control.operators = vec![op_name, op2_name];
            s.control.loosening_approvals = 2;
            s.approval.approvers = vec![ap_name];
            s.console.audit_file = audit_path;
        }),
        ..Default::default()
    })
    .await;
    let sink_stop = tokio_util::sync::CancellationToken::new();
    spawn_sink(&h.settings, &audit_file, sink_stop.clone());
    let second = h.spawn_replica(
        "b",
        Some(command_poller::testing::scripted_panel(
            vec![("security", Script::Deny, 0)],
            Duration::from_secs(2),
            1,
        )),
    );
    eventually("two replicas connected", Duration::from_secs(15), || {
        second.connected()
    })
    .await;
    let (base, stop) = serve_console(Parts::from_settings(&h.settings)).await;
    let (_driver, c) = browser().await;

    // An agent's credentials never get a session.
    login(&c, &base, &agent.0, "agent-pass").await;
    shows(&c, "neither an operator").await;
    assert!(c.current_url().await.unwrap().path().starts_with("/login"));
    login(&c, &base, &op.0, "wrong-password").await;
    shows(&c, "Wrong user or password").await;

    // The operator: RUNNING, two replicas.
    login(&c, &base, &op.0, "agent-pass").await;
    shows(&c, "id=\"mode\">RUNNING").await;
    let rows = c
        .find_all(Locator::Css("#replicas tr"))
        .await
        .unwrap()
        .len();
    assert_eq!(rows, 3, "a header and two replicas");
    screenshot(&c, "overview").await;

    // E01: pause. No bridge call starts while commands queue.
    pull(
        &c,
        "repeated unapproved REFRESH_TOKEN from agent-7",
        "#pause",
    )
    .await;
    shows(&c, "id=\"mode\">PAUSED").await;
    for i in 0..3 {
        h.send(&cmd(
            &format!("paused-{i}"),
            "CHECK_INTEGRATION_STATUS",
            "mailchimp",
            "LOW",
        ))
        .await;
    }
    settle().await;
    assert_eq!(
        h.sim.calls().posts.len(),
        0,
        "a bridge call started while paused"
    );
    assert_eq!(h.queue_depth().await, 3);
    pull(&c, "agent-7 revoked", "#resume").await;
    shows(&c, "id=\"mode\">RUNNING").await;
    for i in 0..3 {
        assert_eq!(
            h.result(&format!("paused-{i}")).await.status,
            Status::Success
        );
    }

    // E02: halt asks for a confirmation first.
    pull(&c, "drill", "#halt").await;
    shows(&c, "Confirm: halt everything").await;
    click(&c, "#confirm").await;
    shows(&c, "id=\"mode\">HALTED").await;
    type_into(&c, "#post_mortem", "PM-2026-12-drill").await;
    pull(&c, "post-mortem done", "#lift").await;
    shows(&c, "Confirm: lift the halt").await;
    click(&c, "#confirm").await;
    // Two people to loosen: parked until another operator seconds it.
    shows(&c, "parked as proposal").await;
    shows(&c, "Your own proposal").await;
    assert_eq!(
        h.poller_state.gate.mode(),
        command_poller::control::Mode::Halted
    );
    c.find(Locator::Css("header button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    shows(&c, "Log in").await;
    login(&c, &base, &op2.0, "agent-pass").await;
    shows(&c, "Waiting for a second operator").await;
    screenshot(&c, "second").await;
    type_into(&c, ".second-reason", "read PM-2026-12-drill").await;
    click(&c, "button.second").await;
    shows(&c, "id=\"mode\">RUNNING").await;
    // The halt's incident, opened by the halt and closed by the lift, from the audit file.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        c.goto(&format!("{base}/incidents")).await.unwrap();
        let src = c.source().await.unwrap();
        if src.contains("<td>Halt</td>") && src.contains("closed") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the incident never showed:\n{src}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.goto(&format!("{base}/overview")).await.unwrap();
    shows(&c, "id=\"mode\">RUNNING").await;

    // A scoped grant proposed from the console, seconded by the other operator, shown, and
    // withdrawn from the console.
    type_into(&c, "#grant-agent", &agent.0).await;
    type_into(&c, "#grant-service", "meta").await;
    type_into(&c, "#grant-uses", "2").await;
    type_into(&c, "#grant-for", "1h").await;
    type_into(&c, "#grant-reason", "CHG-9 weekly refreshes").await;
    click(&c, "#grant").await;
    shows(&c, "parked as proposal").await;
    let s = h.settings.clone();
    let first = Operator::new(&s, &node(&op.url()), Duration::from_millis(1500));
    let grant_second = |state: &command_poller::control::ControlState| {
        let (id, p) = state
            .proposals
            .iter()
            .find(|(_, p)| matches!(p.lever, ControlCommand::Grant { .. }))
            .expect("the grant's proposal");
        ControlCommand::Second {
            proposal: id.clone(),
            digest: p.digest.clone(),
            reason: "CHG-9 approved".into(),
            request_id: new_request_id(),
        }
    };
    let stored = first
        .run(status_request())
        .await
        .unwrap()
        .stored_state
        .unwrap();
    first.run(grant_second(&stored)).await.unwrap();
    c.goto(&format!("{base}/overview")).await.unwrap();
    shows(&c, "Scoped grants in force").await;
    shows(&c, "CHG-9 weekly refreshes").await;
    screenshot(&c, "grant").await;
    type_into(&c, ".ungrant-reason", "CHG-9 closed").await;
    click(&c, "button.ungrant").await;
    shows(&c, "ungrant: done").await;
    assert!(!c.source().await.unwrap().contains("Scoped grants in force"));
    // One left proposed, for the approvers' inbox below.
    first
        .run(ControlCommand::Grant {
            agent: agent.0.clone(),
            command_type: command_poller::intake::CommandType::RefreshToken,
            service: "meta".into(),
            uses: 3,
            for_secs: 600,
            reason: "CHG-10 proposed".into(),
            request_id: new_request_id(),
        })
        .await
        .unwrap();

    // A forged cross-site POST with the operator's cookie: refused, nothing pulled.
    let cookie = c
        .get_named_cookie(command_poller::console::COOKIE)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let csrf = {
        let src = c.source().await.unwrap();
        let at = src.find("name=\"csrf\" value=\"").unwrap() + "name=\"csrf\" value=\"".len();
        src[at..at + 64].to_owned()
    };
    for (form, origin) in [
        ("action=halt&confirm=yes&reason=forged".to_string(), None),
        (
            format!("action=halt&confirm=yes&reason=forged&csrf={csrf}"),
            Some("http://evil.example"),
        ),
    ] {
        let mut req = http
            .post(format!("{base}/lever"))
            .header("cookie", format!("{}={}", cookie.name(), cookie.value()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 403);
        assert!(r.text().await.unwrap().contains("nothing was done"));
    }
    assert_eq!(
        h.poller_state.gate.mode(),
        command_poller::control::Mode::Running
    );
    let r = http
        .get(format!("{base}/no-such-page"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("no such page"));
    c.find(Locator::Css("header button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    shows(&c, "Log in").await;

    // SOP-INT-02: the approver approves a parked REFRESH_TOKEN; it executes once.
    h.send(&cmd(
        "console-refresh-1",
        "REFRESH_TOKEN",
        "google",
        "MEDIUM",
    ))
    .await;
    assert_eq!(
        h.result("console-refresh-1").await.status,
        Status::NeedsApproval
    );
    login(&c, &base, &ap.0, "agent-pass").await;
    shows(&c, "console-refresh-1").await;
    shows(&c, "CHG-10 proposed").await;
    screenshot(&c, "inbox").await;
    let card = c.find(Locator::Css(".approval")).await.unwrap();
    card.find(Locator::Css("input[name=reason]"))
        .await
        .unwrap()
        .send_keys("customer ticket 4411")
        .await
        .unwrap();
    card.find(Locator::Css("button.approve"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    shows(&c, "approved (1 of 1)").await;
    let done = h
        .wait_until(
            "the approved command's result",
            Duration::from_secs(20),
            |i| {
                i.results
                    .iter()
                    .find(|(_, r)| {
                        r.action_id.as_deref() == Some("console-refresh-1")
                            && r.status == Status::Success
                    })
                    .map(|(_, r)| r.clone())
            },
        )
        .await;
    assert_eq!(done.approvals[0].by, ap.0);
    settle().await;
    assert_eq!(h.sim.executions("console-refresh-1"), 1);
    // What happened to it: its audit records, from receipt to the final result.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        c.goto(&format!("{base}/actions?action_id=console-refresh-1"))
            .await
            .unwrap();
        let src = c.source().await.unwrap();
        if src.contains("approval_parked") && src.contains("bridge_call") {
            assert!(src.contains("approval_decision"), "{src}");
            break;
        }
        assert!(Instant::now() < deadline, "the story never showed:\n{src}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(text(&c, "h1").await, "What happened to an action");
    screenshot(&c, "story").await;
    c.close().await.unwrap();
    sink_stop.cancel();
    let _ = std::fs::remove_file(&audit_file);
    let _ = std::fs::remove_file(command_poller::audit::chain::head_path(&audit_file));
    stop.cancel();
    second.stop().await;
}

/// Serves a console of `parts` on a free loopback port: its base URL, and what stops it.
async fn serve_console(parts: Parts) -> (String, tokio_util::sync::CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(command_poller::console::serve(
        listener,
        Console::new(parts),
        stop.clone(),
    ));
    (base, stop)
}

/// Logs in with a plain HTTP client; returns the session cookie (`name=value`).
async fn http_login(
    http: &reqwest::Client,
    base: &str,
    user: &str,
    password: &str,
) -> reqwest::Response {
    http.post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("user={user}&password={password}&next=%2Foverview"))
        .send()
        .await
        .unwrap()
}

fn session_cookie(r: &reqwest::Response) -> String {
    r.headers()
        .get("set-cookie")
        .expect("a session cookie")
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn expiry_bad_input_rate_limits_and_a_broker_that_is_down_are_said_plainly() {
    let op = BrokerUser::create();
    let op_name = op.0.clone();
    let h = Harness::start(Options {
        tweak: Box::new(move |s| {
            s.control.operators = vec![op_name];
            s.console.idle_timeout = Duration::from_secs(1);
            s.console.max_failed_logins = 3;
        }),
        ..Default::default()
    })
    .await;
    let (base, stop) = serve_console(Parts::from_settings(&h.settings)).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    // The cookie is HttpOnly and SameSite=Strict.
    let r = http_login(&http, &base, &op.0, "agent-pass").await;
    assert_eq!(r.status(), 303, "{:?}", r.headers());
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = session_cookie(&r);
    let page = http
        .get(format!("{base}/overview"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let at = page.find("name=\"csrf\" value=\"").unwrap() + 19;
    let csrf = page[at..at + 64].to_owned();

    // Idle past the timeout: the pause the page was about to send is not done, and it says so.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = http
        .post(format!("{base}/lever"))
        .header("cookie", &cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}&action=pause&reason=late"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let to = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(to.contains("expired=form"), "{to}");
    let login = http
        .get(format!("{base}{to}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(login.contains("NOT carried out"), "{login}");
    assert_eq!(
        h.poller_state.gate.mode(),
        command_poller::control::Mode::Running
    );

    // A stranger learns nothing about who the operators are: a wrong password is a wrong
    // password, whatever the user name.
    for user in ["nobody-at-all", op.0.as_str()] {
        let r = http_login(&http, &base, user, "guessing").await;
        assert_eq!(r.status(), 401, "{user}");
        assert!(r.text().await.unwrap().contains("Wrong user or password"));
    }

    // An oversized form is refused, not parsed.
    let r = http
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("user=x&password={}", "p".repeat(40_000)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    // Failed logins are limited (per user and per address): with the two guesses above, after
    // a third even the right password waits.
    let r = http_login(&http, &base, &op.0, "wrong").await;
    assert_eq!(r.status(), 401);
    let r = http_login(&http, &base, &op.0, "agent-pass").await;
    assert_eq!(r.status(), 429);
    assert!(r.text().await.unwrap().contains("Too many failed logins"));
    stop.cancel();

    // A broker that is down is said plainly, never a blank page.
    let mut parts = Parts::from_settings(&h.settings);
    parts.endpoints = command_poller::broker::Endpoints::new([format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        free_port()
    )])
    .unwrap();
    let (base, stop) = serve_console(parts).await;
    let r = http_login(&http, &base, &op.0, "agent-pass").await;
    assert_eq!(r.status(), 502);
    let body = r.text().await.unwrap();
    assert!(body.contains("The broker is unreachable"), "{body}");
    assert!(!body.contains("agent-pass"), "the password is never echoed");
    stop.cancel();
}

#[tokio::test]
async fn a_stranger_cant_lock_an_operator_out_redirect_away_or_frame_the_levers() {
    let op = BrokerUser::create();
    let op_name = op.0.clone();
    let h = Harness::start(Options {
        tweak: Box::new(move |s| {
            s.control.operators = vec![op_name];
            s.console.max_failed_logins = 3;
            s.console.trusted_proxies = vec![std::net::Ipv4Addr::new(127, 0, 0, 3).into()];
        }),
        ..Default::default()
    })
    .await;
    let mut parts = Parts::from_settings(&h.settings);
    // The console's own alerts, as a user that may publish alerts (guest on the test broker).
    parts.alerts = Some(command_poller::console::alerts::AlertSink {
        endpoints: node(AMQP),
        exchange: h.settings.topology.alerts_exchange.clone(),
        instance: "console-test".into(),
    });
    let (base, stop) = serve_console(parts).await;
    let client = |from: [u8; 4]| {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .local_address(std::net::IpAddr::from(from))
            .build()
            .unwrap()
    };
    // Item 10: five wrong passwords for the operator's name from another address.
    let stranger = client([127, 0, 0, 2]);
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(
            http_login(&stranger, &base, &op.0, "guessing")
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(
        statuses,
        [401, 401, 401, 429, 429],
        "the stranger is throttled"
    );
    // The operator, from its own address, with the right password: in.
    let operator = client([127, 0, 0, 1]);
    let r = http_login(&operator, &base, &op.0, "agent-pass").await;
    assert_eq!(r.status(), 303, "the operator was locked out by a stranger");
    // Security hears of it once (the operator's name is under attack), as the console's user.
    let (received, alert) = h
        .wait_until("security's alert", Duration::from_secs(10), |i| {
            i.alerts
                .iter()
                .find(|(_, a)| a.summary.contains(&format!("as operator {}", op.0)))
                .cloned()
        })
        .await;
    assert_eq!(received.routing_key, "security.high");
    assert_eq!(received.user_id.as_deref(), Some("guest"));
    assert!(alert.summary.contains("127.0.0.2"), "{}", alert.summary);
    // Behind a trusted proxy (127.0.0.3) each forwarded client is throttled on its own; a
    // forged X-Forwarded-For from anyone else changes nothing.
    let proxy = client([127, 0, 0, 3]);
    let via = |xff: &'static str, password: &'static str| {
        proxy
            .post(format!("{base}/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-forwarded-for", xff)
            .body(format!("user={}&password={password}&next=%2F", op.0))
            .send()
    };
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            via("203.0.113.5", "guessing")
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(
        statuses,
        [401, 401, 401, 429],
        "the forwarded client is throttled"
    );
    let other = via("203.0.113.6", "agent-pass").await.unwrap();
    assert_eq!(
        other.status(),
        303,
        "another client behind the proxy was throttled"
    );
    let forged = stranger
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-for", "203.0.113.7")
        .body(format!("user={}&password=guessing&next=%2F", op.0))
        .send()
        .await
        .unwrap();
    assert_eq!(
        forged.status(),
        429,
        "a forged X-Forwarded-For dodged the throttle"
    );
    // A name that is no operator's is logged, never alerted.
    let nobody = client([127, 0, 0, 4]);
    for _ in 0..3 {
        let _ = http_login(&nobody, &base, "nobody-at-all", "x").await;
    }
    settle().await;
    let alerts = h.inbox.lock().unwrap().alerts.clone();
    assert!(!alerts
        .iter()
        .any(|(_, a)| a.summary.contains("nobody-at-all")));
    assert_eq!(
        alerts
            .iter()
            .filter(|(_, a)| a.summary.contains("failed console logins"))
            .count(),
        1,
        "security is alerted once per window per name"
    );

    // Item 11: no redirect off the site after login, and no 500 for a newline.
    for next in [
        "%2F%09%2Fevil.example%2Flogin",
        "%2F%5Cevil.example",
        "%2F%0A%2Fevil.example",
        "https%3A%2F%2Fevil.example",
    ] {
        let r = operator
            .post(format!("{base}/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("user={}&password=agent-pass&next={next}", op.0))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303, "{next}");
        assert_eq!(r.headers()["location"], "/", "{next}");
    }

    // Item 12: a login posted from another site is refused; every answer carries the headers.
    let r = operator
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", "http://evil.example")
        .body(format!("user={}&password=agent-pass", op.0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("set-cookie").is_none());
    for path in ["/login", "/overview", "/nope"] {
        let r = operator.get(format!("{base}{path}")).send().await.unwrap();
        for (name, value) in command_poller::console::HARDENING {
            assert_eq!(r.headers()[name], value, "{path}: {name}");
        }
    }
    stop.cancel();
}

#[tokio::test]
async fn in_chromium_the_login_never_redirects_off_the_site_and_the_levers_are_never_framed() {
    let op = BrokerUser::create();
    let op_name = op.0.clone();
    let h = Harness::start(Options {
        tweak: Box::new(move |s| s.control.operators = vec![op_name]),
        ..Default::default()
    })
    .await;
    let (base, stop) = serve_console(Parts::from_settings(&h.settings)).await;
    // Another page on this machine that frames the levers.
    let framer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let framer_url = format!("http://{}/", framer.local_addr().unwrap());
    let page = format!(
        "<html><body><h1>framer</h1><iframe id=\"f\" src=\"{base}/overview\" width=800 height=600></iframe></body></html>"
    );
    tokio::spawn(async move {
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(move || {
                let page = page.clone();
                async move { axum::response::Html(page) }
            }),
        );
        let _ = axum::serve(framer, app).await;
    });
    let (_driver, c) = browser().await;
    // Item 11: a tab in `next` (browsers drop it) used to land on //evil.example.
    c.goto(&format!("{base}/login?next=%2F%09%2Fevil.example%2Flogin"))
        .await
        .unwrap();
    type_into(&c, "#user", &op.0).await;
    type_into(&c, "#password", "agent-pass").await;
    click(&c, "#login").await;
    shows(&c, "Pause").await;
    let at = c.current_url().await.unwrap();
    assert!(at.as_str().starts_with(&base), "landed on {at}");
    // Item 12: logged in, the levers inside another page: Chromium refuses to render them.
    c.goto(&framer_url).await.unwrap();
    shows(&c, "framer").await;
    c.clone().enter_frame(0).await.unwrap();
    let inside = c.source().await.unwrap();
    assert!(
        !inside.contains("command-poller") && !inside.contains("name=\"csrf\""),
        "the levers rendered inside another page:\n{inside}"
    );
    screenshot(&c, "framed").await;
    c.close().await.unwrap();
    stop.cancel();
}

/// Item 3 of the levers issue: the overview read the state stream on every refresh (every 5 s
/// per open tab). Now an operator's session follows the stream from its login: with its read
/// right on the stream taken away after login, the overview still shows the state (a read per
/// page would be refused), and a lever pulled elsewhere shows up on the next refresh.
#[tokio::test]
async fn the_overview_follows_the_state_instead_of_reading_it_per_page() {
    let op = BrokerUser::create();
    let op_name = op.0.clone();
    let h = Harness::start(Options {
        tweak: Box::new(move |s| {
            s.control.operators = vec![op_name, "guest".into()];
        }),
        ..Default::default()
    })
    .await;
    let (base, stop) = serve_console(Parts::from_settings(&h.settings)).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http_login(&http, &base, &op.0, "agent-pass").await;
    assert_eq!(r.status(), 303);
    let cookie = session_cookie(&r);
    let overview = || async {
        let r = http
            .get(format!("{base}/overview"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let (status, page) = overview().await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("RUNNING"), "{page}");
    // The follower is reading: take the session's user's right to read the state stream.
    let state_queue = regex_escape(&h.settings.control.state_queue);
    let revoked = std::process::Command::new("rabbitmqctl")
        .args(["set_permissions", "-p", "/", &op.0, ".*", ".*"])
        .arg(format!("^(?!{state_queue}$).*"))
        .output()
        .unwrap();
    assert!(revoked.status.success());
    for _ in 0..3 {
        let (status, page) = overview().await;
        assert_eq!(status, 200, "the page read the stream again: {page}");
        assert!(page.contains("RUNNING"), "{page}");
    }
    // Another operator pauses from the CLI: the next refresh shows it.
    h.operator()
        .run(command_poller::control::ControlCommand::Pause {
            reason: "incident drill".into(),
            request_id: command_poller::control::operator::new_request_id(),
        })
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, page) = overview().await;
        assert_eq!(status, 200, "{page}");
        if page.contains("PAUSED") && page.contains("incident drill") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pause never showed: {page}"
        );
    }
    stop.cancel();
}

/// `s` with the regular-expression metacharacters of queue names escaped.
fn regex_escape(s: &str) -> String {
    s.replace('.', "\\.")
}
