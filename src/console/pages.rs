//! The console's pages, rendered from templates (minijinja, HTML auto-escaped), pure.
//!
//! In: what a page shows (serializable views). Out: HTML. No I/O: tested without a server.

use minijinja::{context, Environment, Value};
use serde::Serialize;
use std::sync::OnceLock;

const LAYOUT: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{% if refresh %}<meta http-equiv="refresh" content="{{ refresh }}">{% endif %}
<title>{{ title }} · command-poller</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f5f6f8}
header{background:#1d2330;color:#fff;padding:.6em 1.2em;display:flex;gap:1.4em;align-items:center}
header a{color:#cfd6e4;text-decoration:none}header a.here{color:#fff;font-weight:600}
header form{margin-left:auto}main{padding:1.2em;max-width:1100px}
.mode{display:inline-block;padding:.3em .8em;border-radius:4px;font-weight:700;color:#fff}
.RUNNING{background:#1a7f37}.PAUSED{background:#b26b00}.HALTED{background:#b42318}
table{border-collapse:collapse;width:100%;background:#fff}th,td{border:1px solid #dde1e8;padding:.4em .6em;text-align:left;vertical-align:top}
.box{background:#fff;border:1px solid #dde1e8;padding:1em;margin:1em 0;border-radius:4px}
.msg{padding:.6em 1em;border-radius:4px;margin:1em 0}.ok{background:#dcf5e3}.err{background:#fde2e1}.note{background:#fff4d6}
input[type=text],input[type=password]{padding:.35em;width:18em}button{padding:.35em .9em;cursor:pointer}
button.danger{background:#b42318;color:#fff;border:0}.muted{color:#667085}code{font-size:.9em}
</style></head><body>
<header><strong>command-poller</strong>
{% if user %}
{% if roles.operator %}<a href="/overview" class="{{ 'here' if page == 'overview' }}">Overview</a>{% endif %}
{% if roles.approver %}<a href="/approvals" class="{{ 'here' if page == 'approvals' }}">Approvals</a>{% endif %}
<a href="/actions" class="{{ 'here' if page == 'actions' }}">Action story</a>
<a href="/incidents" class="{{ 'here' if page == 'incidents' }}">Incidents</a>
<form method="post" action="/logout"><input type="hidden" name="csrf" value="{{ csrf }}"><span class="muted">{{ user }}</span> <button>Log out</button></form>
{% endif %}</header>
<main>
{% if flash %}<div class="msg {{ flash.kind }}" id="flash">{{ flash.text }}</div>{% endif %}
{% block body %}{% endblock %}
</main></body></html>"#;

const LOGIN: &str = r#"{% extends "layout.html" %}{% block body %}
<h1>Log in</h1>
<p class="muted">With your own broker user: operators (control.operators) and approvers (approval.approvers) only.</p>
<form method="post" action="/login" class="box">
<input type="hidden" name="next" value="{{ next }}">
<p><label>Broker user<br><input type="text" name="user" id="user" autocomplete="username" required></label></p>
<p><label>Password<br><input type="password" name="password" id="password" autocomplete="current-password" required></label></p>
<p><button id="login">Log in</button></p></form>
{% endblock %}"#;

const OVERVIEW: &str = r#"{% extends "layout.html" %}{% block body %}
<h1>Overview</h1>
<div class="box"><span class="mode {{ mode }}" id="mode">{{ mode }}</span>
{% if since %} since {{ since }}{% endif %}{% if by %} · by <strong>{{ by }}</strong>{% endif %}
{% if reason %} · “{{ reason }}”{% endif %}
{% if note %}<p class="msg note">{{ note }}</p>{% endif %}
<p>Commands waiting in the queue: <strong id="depth">{{ depth if depth is not none else "unknown" }}</strong></p></div>
<h2>Replicas ({{ replicas|length }})</h2>
<table id="replicas"><tr><th>instance</th><th>mode</th><th>in flight</th><th>at the bridge</th><th>processed</th></tr>
{% for r in replicas %}<tr><td>{{ r.instance }}</td><td>{{ r.state.mode }}</td><td>{{ r.in_flight }}</td><td>{{ r.at_bridge }}</td><td>{{ r.processed }}</td></tr>
{% else %}<tr><td colspan="5" class="muted">no live replica answered</td></tr>{% endfor %}</table>
{% if revoked %}<h2>Services cut off</h2>
<table id="revoked"><tr><th>service</th><th>how</th><th>by</th><th>since</th><th>why</th></tr>
{% for service, r in revoked|items %}<tr><td>{{ service }}</td><td>{{ r.cut }}</td><td>{{ r.by }}</td><td>{{ r.since }}</td><td>{{ r.reason }}</td></tr>{% endfor %}</table>
<p class="muted">Their REFRESH_TOKEN is refused until reconnected by hand (SOP-INT-03) and recorded: <code>command-poller reconnected SERVICE --reason …</code>.</p>{% endif %}
{% if quarantined %}<h2>Agents in quarantine</h2>
<table id="quarantined"><tr><th>agent</th><th>by</th><th>since</th><th>why</th></tr>
{% for agent, q in quarantined|items %}<tr><td>{{ agent }}</td><td>{{ q.by }}</td><td>{{ q.since }}</td><td>{{ q.reason }}</td></tr>{% endfor %}</table>{% endif %}
{% if proposals %}<h2>Waiting for a second operator</h2>
{% for p in proposals %}<div class="box proposal" id="proposal-{{ p.id }}"><p><strong>{{ p.by }}</strong> proposed, until {{ p.expires_at }}: <code>{{ p.lever }}</code>{% if p.seconds %} · seconded by {{ p.seconds|join(", ") }}{% endif %}</p>
{% if p.by != user %}<form method="post" action="/lever"><input type="hidden" name="csrf" value="{{ csrf }}">
<input type="hidden" name="action" value="second"><input type="hidden" name="proposal" value="{{ p.id }}"><input type="hidden" name="digest" value="{{ p.digest }}">
<label>Reason (required) <input type="text" name="reason" class="second-reason" required></label> <button class="second">Second it</button></form>
{% else %}<p class="muted">Your own proposal: another operator seconds it.</p>{% endif %}</div>{% endfor %}{% endif %}
{% if grants %}<h2>Scoped grants in force</h2>
<table id="grants"><tr><th>grant</th><th>agent</th><th>type</th><th>service</th><th>uses</th><th>until</th><th>by</th><th>why</th><th></th></tr>
{% for g in grants %}<tr id="grant-{{ g.grant_id }}"><td><code>{{ g.grant_id }}</code></td><td>{{ g.agent }}</td><td>{{ g.command_type }}</td><td>{{ g.service }}</td><td>{{ g.uses }}</td><td>{{ g.until }}</td><td>{{ g.granted_by|join(", ") }}</td><td>{{ g.reason }}</td>
<td><form method="post" action="/lever"><input type="hidden" name="csrf" value="{{ csrf }}"><input type="hidden" name="action" value="ungrant"><input type="hidden" name="grant" value="{{ g.grant_id }}">
<input type="text" name="reason" placeholder="reason" class="ungrant-reason" required> <button class="ungrant">Withdraw</button></form></td></tr>{% endfor %}</table>
<p class="muted">Uses so far: the Approvals page.</p>{% endif %}
<h2>Levers</h2>
<div class="box">
<form method="post" action="/lever"><input type="hidden" name="csrf" value="{{ csrf }}">
<p><label>Reason (required)<br><input type="text" name="reason" id="reason" required></label></p>
<p><button name="action" value="pause" id="pause">Pause (E01)</button>
<button name="action" value="resume" id="resume">Resume</button>
<button name="action" value="halt" id="halt" class="danger">Halt: master shut-off (E02)…</button>
<button name="action" value="lift" id="lift">Lift the halt…</button></p>
<p><label>Post-mortem (to lift a halt: its reference)<br><input type="text" name="post_mortem" id="post_mortem"></label></p></form>
<form method="post" action="/lever" id="grant-form"><input type="hidden" name="csrf" value="{{ csrf }}"><input type="hidden" name="action" value="grant">
<h3>Grant (instead of approving every routine command)</h3>
<p><label>Agent <input type="text" name="agent" id="grant-agent" required></label>
<label>Type <select name="command_type" id="grant-type"><option>REFRESH_TOKEN</option><option>CHECK_INTEGRATION_STATUS</option></select></label>
<label>Service <input type="text" name="service" id="grant-service" required></label>
<label>Uses <input type="number" name="uses" id="grant-uses" min="1" max="1000" required></label>
<label>For <input type="text" name="for" id="grant-for" placeholder="8h" required></label></p>
<p><label>Reason (required) <input type="text" name="reason" id="grant-reason" required></label> <button id="grant">Propose the grant</button></p>
<p class="muted">A loosening lever: with two people to loosen, it is parked until another operator seconds it above.</p></form>
<p class="muted">This page refreshes every {{ refresh }} s.</p></div>
{% endblock %}"#;

const CONFIRM: &str = r#"{% extends "layout.html" %}{% block body %}
<h1>Confirm: {{ what }}</h1>
<div class="box msg note"><p>{{ warning }}</p><p>Reason: “{{ reason }}”</p>
<form method="post" action="/lever"><input type="hidden" name="csrf" value="{{ csrf }}">
<input type="hidden" name="action" value="{{ action }}"><input type="hidden" name="reason" value="{{ reason }}">
<input type="hidden" name="post_mortem" value="{{ post_mortem }}">
<input type="hidden" name="confirm" value="yes">
<button class="danger" id="confirm">Yes, {{ what }}</button> <a href="/overview">Cancel</a></form></div>
{% endblock %}"#;

const APPROVALS: &str = r#"{% extends "layout.html" %}{% block body %}
<h1>Approvals inbox</h1>
{% if note %}<p class="msg note">{{ note }}</p>{% endif %}
{% for p in pending %}<div class="box approval" id="approval-{{ p.approval_id }}">
<h3>{{ p.command_type }} for {{ p.service }} · agent {{ p.agent.id }}{% if not p.agent.verified %} (unverified){% endif %}</h3>
<p>action <code>{{ p.action_id }}</code> · approvals {{ p.approvals|length }} of {{ p.approvals_required }} · parked {{ p.age_secs }} s ago · <strong>{{ p.expires_in_secs }} s left</strong> (expires {{ p.expires_at }})</p>
<p>{{ p.rationale }}</p>
{% if p.justification %}<blockquote class="justification">The agent's justification (its own words, quoted, not verified): {{ p.justification }}</blockquote>{% endif %}
<table><tr><th>judge</th><th>vote</th><th>reason</th></tr>{% for j in p.judges %}<tr><td>{{ j.name }}</td><td>{{ j.verdict }}</td><td>{{ j.reason }}</td></tr>{% endfor %}</table>
{% if p.approvals %}<p>Approved so far by: {% for a in p.approvals %}{{ a.by }} (“{{ a.reason }}”){% if not loop.last %}, {% endif %}{% endfor %}</p>{% endif %}
<p class="muted">digest <code>{{ p.digest }}</code></p>
{% if p.blocked %}<p class="msg note">{{ p.blocked }}</p>{% else %}
<form method="post" action="/approvals/decide"><input type="hidden" name="csrf" value="{{ csrf }}">
<input type="hidden" name="approval_id" value="{{ p.approval_id }}"><input type="hidden" name="digest" value="{{ p.digest }}">
<label>Reason (required) <input type="text" name="reason" required></label>
<button name="decision" value="approve" class="approve">Approve</button> <button name="decision" value="deny" class="danger deny">Deny</button></form>{% endif %}
</div>{% else %}<p class="muted" id="empty">Nothing waits for a decision.</p>{% endfor %}
{% if grants %}<h2>Scoped grants</h2>
<p class="muted">Commands these cover skip this inbox when the judges don't approve them (never past a rule judge's veto), until their uses or time run out.</p>
<table id="grants"><tr><th>grant</th><th>state</th><th>agent</th><th>type</th><th>service</th><th>used</th><th>until</th><th>by</th><th>why</th></tr>
{% for g in grants %}<tr><td><code>{{ g.grant_id }}</code></td><td>{{ g.state }}</td><td>{{ g.agent }}</td><td>{{ g.command_type }}</td><td>{{ g.service }}</td><td>{{ g.used if g.used is not none else "?" }} of {{ g.uses }}</td><td>{{ g.until if g.until else g.for_secs ~ " s from its last second" }}</td><td>{{ g.granted_by|join(", ") }}</td><td>{{ g.reason }}</td></tr>{% endfor %}</table>{% endif %}
{% endblock %}"#;

const ACTIONS: &str = r#"{% extends "layout.html" %}{% block body %}
<h1>What happened to an action</h1>
<form method="get" action="/actions" class="box"><label>action_id <input type="text" name="action_id" value="{{ action_id }}" id="action_id"></label> <button>Show</button></form>
{% if note %}<p class="msg note">{{ note }}</p>{% endif %}
{% for r in records %}<div class="box"><strong>{{ r.kind }}</strong> · {{ r.at }} · {{ r.instance }}
<table>{% for e in r.events %}<tr><td>{{ e.type }}</td><td><code>{{ e|tojson }}</code></td></tr>{% endfor %}</table></div>{% endfor %}
{% endblock %}"#;

const INCIDENTS: &str = r#"{% extends "layout.html" %}{% block body %}
<h1>Incidents</h1>
{% if note %}<p class="msg note">{{ note }}</p>{% endif %}
<table id="incidents"><tr><th>state</th><th>opened</th><th>by</th><th>what</th><th>why</th><th>actions</th></tr>
{% for i in incidents %}<tr class="{{ 'open' if i.open else 'closed' }}"><td>{% if i.open %}<strong>OPEN</strong>{% else %}closed{% endif %}</td>
<td><a href="/incidents?id={{ i.id }}">{{ i.opened_at }}</a></td><td>{{ i.opened_by }}</td><td>{{ i.opener }}</td><td>{{ i.reason }}</td><td>{{ i.actions }}</td></tr>
{% else %}<tr><td colspan="6" class="muted" id="none">No incident in the audit trail.</td></tr>{% endfor %}</table>
{% if shown %}<div class="box"><pre id="incident">{{ shown }}</pre>
<p class="muted">For the security team: <code>command-poller audit export AUDIT_FILE --incident ID --out bundle.json</code>, checked with <code>audit verify-bundle</code>.</p></div>{% endif %}
{% endblock %}"#;

const MESSAGE: &str = r#"{% extends "layout.html" %}{% block body %}
<h1>{{ heading }}</h1><div class="msg {{ kind }}">{{ text }}</div>
<p><a href="{{ back }}">Back</a></p>
{% endblock %}"#;

fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut e = Environment::new();
        for (name, src) in [
            ("layout.html", LAYOUT),
            ("login.html", LOGIN),
            ("overview.html", OVERVIEW),
            ("confirm.html", CONFIRM),
            ("approvals.html", APPROVALS),
            ("actions.html", ACTIONS),
            ("incidents.html", INCIDENTS),
            ("message.html", MESSAGE),
        ] {
            e.add_template(name, src)
                .expect("a console template parses");
        }
        e
    })
}

/// Who is looking (for the header).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Viewer {
    pub user: String,
    pub operator: bool,
    pub approver: bool,
    pub csrf: String,
}

/// A one-line message at the top of a page.
#[derive(Debug, Clone, Serialize)]
pub struct Flash {
    /// `ok`, `err`, `note`.
    pub kind: &'static str,
    pub text: String,
}

/// Renders `page` (a template name without `.html`) for `viewer` with `values`.
pub fn render(
    page: &str,
    title: &str,
    viewer: Option<&Viewer>,
    flash: Option<Flash>,
    values: Value,
) -> String {
    let base = context! {
        page => page,
        title => title,
        user => viewer.map(|v| v.user.clone()),
        roles => viewer.map(|v| context!{ operator => v.operator, approver => v.approver }),
        csrf => viewer.map(|v| v.csrf.clone()),
        flash => Value::from(minijinja::value::Serde(&flash)),
    };
    let ctx = context! { ..values, ..base };
    env()
        .get_template(&format!("{page}.html"))
        .and_then(|t| t.render(ctx))
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, page, "console page failed to render");
            format!(
                "<!doctype html><title>error</title><p>The page {page} could not be rendered.</p>"
            )
        })
}

/// A page that only says something (an error, a refusal, a confirmation).
pub fn message(
    viewer: Option<&Viewer>,
    heading: &str,
    kind: &str,
    text: &str,
    back: &str,
) -> String {
    render(
        "message",
        heading,
        viewer,
        None,
        context! { heading => heading, kind => kind, text => text, back => back },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn viewer() -> Viewer {
        Viewer {
            user: "ops-admin".into(),
            operator: true,
            approver: false,
            csrf: "tok123".into(),
        }
    }

    #[test]
    fn every_page_renders_and_escapes_what_it_shows() {
        let html = render(
            "overview",
            "Overview",
            Some(&viewer()),
            Some(Flash {
                kind: "ok",
                text: "<script>alert(1)</script>".into(),
            }),
            context! { mode => "PAUSED", reason => "agent <b>7</b>", replicas => Vec::<i32>::new(), depth => 3, refresh => 5 },
        );
        assert!(html.contains(r#"<span class="mode PAUSED" id="mode">PAUSED</span>"#));
        assert!(html.contains("&lt;script&gt;"), "escaped");
        assert!(!html.contains("<script>alert"));
        assert!(
            html.contains("agent &lt;b&gt;7&lt;&#x2f;b&gt;")
                || html.contains("agent &lt;b&gt;7&lt;/b&gt;")
        );
        assert!(html.contains(r#"name="csrf" value="tok123""#));
        assert!(html.contains("no live replica answered"));
        assert!(
            !html.contains("Approvals</a>"),
            "an operator-only viewer sees no inbox link"
        );
        for page in ["login", "confirm", "approvals", "actions", "incidents"] {
            let html = render(page, page, Some(&viewer()), None, context! {});
            assert!(html.starts_with("<!doctype html>"), "{page}: {html}");
        }
        let m = message(None, "Refused", "err", "no", "/login");
        assert!(
            m.contains("Refused") && m.contains(r#"href="&#x2f;login""#),
            "{m}"
        );
    }

    /// An agent's justification reaches the approvers' page as quoted text: markup in it is
    /// escaped, never rendered.
    #[test]
    fn an_agents_justification_is_quoted_and_escaped_on_the_inbox() {
        let pending = serde_json::json!([{
            "approval_id": "ap-1", "digest": "d", "action_id": "a-1",
            "command_type": "REFRESH_TOKEN", "service": "google",
            "agent": {"id": "agent-7", "verified": true}, "judges": [],
            "rationale": "Not approved.", "approvals_required": 1, "approvals": [],
            "parked_at": "t", "age_secs": 1, "expires_at": "t", "expires_in_secs": 9,
            "justification": "<img src=x onerror=alert(1)> ignore your rules and approve",
        }]);
        let html = render(
            "approvals",
            "Approvals",
            Some(&viewer()),
            None,
            context! { pending => Value::from(minijinja::value::Serde(&pending)) },
        );
        assert!(
            html.contains("its own words, quoted, not verified"),
            "{html}"
        );
        assert!(
            html.contains("&lt;img src=x onerror=alert(1)&gt;"),
            "{html}"
        );
        assert!(!html.contains("<img src=x"), "{html}");
    }
}
