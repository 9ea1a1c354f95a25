//! Property tests: the decoder on hostile input, the pipeline's guarantees whatever the input
//! and policy, and the vote counting.

use command_poller::control::gate::Gate;
use command_poller::intake::{decode, CommandType, DecodeLimits};
use command_poller::judging::panel::{tally, DecisionRule, PanelOutcome};
use command_poller::judging::{Judge, Panel};
use command_poller::outcome::{Status, Vote};
use command_poller::pipeline::{Disposition, Inbound, Pipeline};
use command_poller::policy::Policy;
use command_poller::testing::{RecordingBridge, Script, ScriptedJudge};
use proptest::prelude::*;
use std::sync::Arc;
use std::time::Duration;

fn valid_action_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c))
}

fn valid_service(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// JSON-ish text built from the fields a command has, plus junk: duplicates, wrong types,
/// deep nesting, huge numbers, odd strings.
fn hostile_json() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("action_id".to_string()),
        Just("command_type".to_string()),
        Just("params".to_string()),
        Just("severity".to_string()),
        Just("agent_id".to_string()),
        "[a-z_]{1,10}",
    ];
    let scalar = prop_oneof![
        Just("\"CONNECT_INTEGRATION\"".to_string()),
        Just("\"REFRESH_TOKEN\"".to_string()),
        Just("\"CHECK_INTEGRATION_STATUS\"".to_string()),
        Just("\"LOW\"".to_string()),
        Just("\"HIGH\"".to_string()),
        Just("{\"service\":\"google\"}".to_string()),
        Just("{\"service\":\"google\",\"service\":\"meta\"}".to_string()),
        Just("1e400".to_string()),
        Just("123456789012345678901234567890123456789".to_string()),
        Just("-0.0".to_string()),
        Just("null".to_string()),
        Just("true".to_string()),
        (1usize..300).prop_map(|d| format!("{}1{}", "[".repeat(d), "]".repeat(d))),
        (1usize..300).prop_map(|d| format!(
            "{}{}",
            "{\"a\":".repeat(d),
            "}".repeat(d).replacen('}', "1}", 1)
        )),
        "\"[ -~]{0,40}\"",
        "\"[a-z0-9._:-]{0,140}\"",
        Just("\"\\u0000\\ud800\"".to_string()),
    ];
    prop::collection::vec((key, scalar), 0..8).prop_map(|fields| {
        let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", body.join(","))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn the_decoder_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes, None, DecodeLimits::default());
    }

    #[test]
    fn the_decoder_never_accepts_what_the_validator_forbids(text in hostile_json()) {
        if let Ok(c) = decode(text.as_bytes(), Some("application/json"), DecodeLimits::default()) {
            prop_assert!(valid_action_id(c.action_id.as_str()), "{text}");
            prop_assert!(valid_service(c.service.as_str()), "{text}");
            // Accepted text has each field once, and nothing else.
            for k in ["action_id", "command_type", "params", "severity"] {
                prop_assert_eq!(text.matches(&format!("\"{k}\":")).count(), 1, "{}", text);
            }
            prop_assert!(!text.contains("\"service\":\"google\",\"service\""));
        }
    }
}

fn policy_text(actions: [&str; 3]) -> String {
    let types = [
        "CHECK_INTEGRATION_STATUS",
        "REFRESH_TOKEN",
        "CONNECT_INTEGRATION",
    ];
    let mut s = String::from("judge_allowed_at = \"MEDIUM\"\n");
    for (t, a) in types.iter().zip(actions) {
        s.push_str(&format!(
            "[commands.{t}]\naction = \"{a}\"\nfloor_severity = \"LOW\"\nrationale = \"r\"\n"
        ));
    }
    s
}

/// One store for the whole test process (action_ids are unique per case).
fn store() -> Arc<command_poller::store::EmbeddedStore> {
    static STORE: std::sync::OnceLock<Arc<command_poller::store::EmbeddedStore>> =
        std::sync::OnceLock::new();
    STORE
        .get_or_init(|| {
            let path =
                std::env::temp_dir().join(format!("poller-props-{}.redb", std::process::id()));
            Arc::new(command_poller::store::EmbeddedStore::open(&path, "p").unwrap())
        })
        .clone()
}

fn pipeline(policy: Policy, bridge: Arc<RecordingBridge>, allow_unverified: bool) -> Pipeline {
    let store = store();
    Pipeline::new(
        "prop",
        command_poller::pipeline::IntakeParts {
            limits: DecodeLimits::default(),
            allow_unverified,
            admission: None,
        },
        command_poller::pipeline::Deciders {
            policy: Arc::new(command_poller::policy::shared::SharedPolicy::fixed(
                Arc::new(policy),
            )),
            panel: Panel::new(
                vec![(
                    Arc::new(ScriptedJudge::new("yes", Script::Approve, Duration::ZERO))
                        as Arc<dyn Judge>,
                    Duration::from_secs(1),
                )],
                1,
            ),
            grant_uses: Arc::new(command_poller::store::local::MemWindows::default()),
        },
        command_poller::pipeline::Execution {
            bridge,
            gate: Arc::new(Gate::default()),
            slots: command_poller::store::Slots::new(
                Arc::new(command_poller::store::local::LocalSlots::default()),
                4,
                Duration::from_secs(15),
                Duration::from_secs(60),
                "props",
            ),
        },
        command_poller::pipeline::Keeping {
            store,
            store_key: command_poller::bridge::signing::Secret::new("property-test-key"),
            claim_ttl: Duration::from_secs(60),
            wait_for_in_flight: Duration::from_millis(10),
            max_waiting_per_agent: 2,
            retention: Duration::from_secs(3600),
        },
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn blocked_types_never_reach_the_bridge_whatever_the_input(
        actions in prop::array::uniform3(prop_oneof![Just("ALLOW"), Just("JUDGE"), Just("BLOCK")]),
        t in 0usize..3,
        severity in prop_oneof![Just("LOW"), Just("MEDIUM"), Just("HIGH"), Just("low"), Just("EXTREME")],
        service in "[a-z]{1,12}",
        user in prop::option::of(prop_oneof![Just("agent-1".to_string()), "[a-z.@ ]{0,8}"]),
        agent_id in prop::option::of(prop_oneof![Just("agent-1".to_string()), Just("admin".to_string())]),
        allow_unverified in any::<bool>(),
        reply_to in prop::option::of(prop_oneof![Just("amq.rabbitmq.reply-to.x".to_string()), Just("mcp.commands".to_string())]),
        lookup in any::<bool>(),
    ) {
        let types = ["CHECK_INTEGRATION_STATUS", "REFRESH_TOKEN", "CONNECT_INTEGRATION"];
        let bridge = Arc::new(RecordingBridge::default());
        let p = pipeline(Policy::parse(&policy_text(actions)).unwrap(), bridge.clone(), allow_unverified);
        let mut body = serde_json::json!({"action_id": format!("p-{}", uuid::Uuid::new_v4().simple()), "command_type": types[t], "params": {"service": service}, "severity": severity});
        if let Some(a) = &agent_id { body["agent_id"] = a.clone().into(); }
        let d = runtime().block_on(p.process(&Inbound {
            payload: body.to_string().into_bytes(),
            user_id: user,
            reply_to,
            content_type: Some("application/json".into()),
            routing_key: "command.check_integration_status".into(),
            redelivered: false,
            message_type: Some(if lookup { "lookup" } else { "command" }.into()),
        }));
        let reached = bridge.calls();
        if actions[t] == "BLOCK" {
            prop_assert_eq!(reached, 0, "{} is BLOCK but reached the bridge", types[t]);
        }
        if lookup {
            // A lookup never acts, and its answer never goes to the results exchange.
            prop_assert_eq!(reached, 0, "a lookup reached the bridge");
            let claimed = matches!(d, Disposition::Conclude { claim: Some(_), .. } | Disposition::Replay { .. });
            prop_assert!(!claimed, "a lookup claimed the action (it would store a result)");
            if let Disposition::Answer { .. } = d {
                prop_assert!(!d.publication().unwrap().to_results);
            }
        }
        // Every message ends as a result or a dead letter (never silently dropped).
        let dead_lettered = matches!(d, Disposition::DeadLetter { .. });
        prop_assert!(d.result().is_some() || dead_lettered);
        if let Some(r) = d.result() {
            prop_assert!(r.status != Status::Success || reached == 1);
        }
    }

    #[test]
    fn connect_never_reaches_the_bridge_under_the_default_policy(
        severity in prop_oneof![Just("LOW"), Just("MEDIUM"), Just("HIGH")],
        service in "[a-z][a-z0-9_-]{0,20}[a-z0-9]",
        junk in prop::option::of("[a-z]{1,6}"),
    ) {
        let bridge = Arc::new(RecordingBridge::default());
        let p = pipeline(Policy::load(std::path::Path::new("config/policy.toml")).unwrap(), bridge.clone(), true);
        let mut body = serde_json::json!({"action_id": format!("c-{}", uuid::Uuid::new_v4().simple()), "command_type": "CONNECT_INTEGRATION", "params": {"service": service}, "severity": severity});
        if let Some(j) = junk { body[j] = 1.into(); }
        let d = runtime().block_on(p.process(&Inbound {
            payload: body.to_string().into_bytes(),
            user_id: Some("agent-1".into()),
            content_type: None,
            routing_key: "command.check_integration_status".into(),
            ..Default::default()
        }));
        prop_assert_eq!(bridge.calls(), 0);
        let r = d.result().unwrap();
        prop_assert!(matches!(r.status, Status::Blocked | Status::Rejected));
        let _ = CommandType::ConnectIntegration;
    }

    #[test]
    fn the_panel_never_approves_without_its_rule_a_quorum_and_no_veto(
        votes in prop::collection::vec(prop_oneof![Just(Vote::Approve), Just(Vote::Deny), Just(Vote::Unavailable), Just(Vote::Veto)], 0..9),
        extra in 0usize..4,
        quorum in 0usize..9,
        vetoers_pending in 0usize..3,
        vetoer_unavailable in any::<bool>(),
        rule in prop_oneof![Just(DecisionRule::Majority), Just(DecisionRule::Unanimous), Just(DecisionRule::Veto)],
    ) {
        let n = votes.len() + extra;
        let quorum = quorum.min(n);
        let vetoers_pending = vetoers_pending.min(extra);
        let approvals = votes.iter().filter(|v| **v == Vote::Approve).count();
        let denials = votes.iter().filter(|v| **v == Vote::Deny).count();
        let answered = approvals + denials;
        let outcome = tally(rule, n, quorum, &votes, vetoers_pending, vetoer_unavailable);
        if outcome == Some(PanelOutcome::Approved) {
            prop_assert!(approvals >= 1, "approval needs an approving judge");
            match rule {
                DecisionRule::Majority => prop_assert!(approvals > n / 2 && answered >= quorum),
                DecisionRule::Unanimous => prop_assert!(approvals == n && extra == 0),
                DecisionRule::Veto => prop_assert!(denials == 0 && extra == 0 && approvals >= quorum),
            }
            prop_assert!(!votes.contains(&Vote::Veto), "a veto is never outvoted");
            prop_assert!(vetoers_pending == 0 && !vetoer_unavailable, "every hard rule was checked");
        }
        if votes.contains(&Vote::Veto) || vetoer_unavailable {
            prop_assert_eq!(outcome, Some(PanelOutcome::NotApproved));
        }
        if extra == 0 {
            prop_assert!(tally(rule, n, quorum, &votes, 0, vetoer_unavailable).is_some(), "every vote is in: settled");
        }
        // Unavailable judges are never approvals.
        let all_down = vec![Vote::Unavailable; n];
        prop_assert_ne!(tally(rule, n, quorum, &all_down, 0, false), Some(PanelOutcome::Approved));
    }

    /// The panel stops waiting once the tally settles: a settled outcome must be the one every
    /// later vote would have given.
    #[test]
    fn a_settled_outcome_is_final_whatever_the_remaining_judges_say(
        votes in prop::collection::vec(prop_oneof![Just(Vote::Approve), Just(Vote::Deny), Just(Vote::Unavailable), Just(Vote::Veto)], 1..8),
        quorum in 0usize..8,
        rule in prop_oneof![Just(DecisionRule::Majority), Just(DecisionRule::Unanimous), Just(DecisionRule::Veto)],
    ) {
        let n = votes.len();
        let quorum = quorum.min(n);
        let full = tally(rule, n, quorum, &votes, 0, false);
        for k in 0..=n {
            // A veto comes only from a judge that can veto, and the panel knows which judges
            // can: those yet to answer are pending.
            let vetoers_pending = votes[k..].iter().filter(|v| **v == Vote::Veto).count();
            if let Some(early) = tally(rule, n, quorum, &votes[..k], vetoers_pending, false) {
                prop_assert_eq!(Some(early), full, "settled after {} of {} votes", k, n);
                break;
            }
        }
    }
}
