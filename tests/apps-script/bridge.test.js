// The Apps Script web app (Code.gs) under Node, with stand-ins for the Apps Script globals and a
// local server playing Mailchimp, Meta and Google. Run: node --test tests/apps-script/
'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const { Worker } = require('node:worker_threads');
const { load, event } = require('./support/gas');

const SECRET = 'test-bridge-secret';
const CREDS = {
  BRIDGE_SECRET: SECRET,
  MAILCHIMP_API_KEY: 'mc-secret-key-us21',
  META_ACCESS_TOKEN: 'EAAG-old-token',
  META_APP_ID: '1234',
  META_APP_SECRET: 'meta-app-secret',
  GOOGLE_CLIENT_ID: 'client-id.apps.googleusercontent.com',
  GOOGLE_CLIENT_SECRET: 'google-client-secret',
  GOOGLE_REFRESH_TOKEN: '1//refresh-token-value',
  GOOGLE_ACCESS_TOKEN: 'ya29.old-access-token',
};
const SECRET_VALUES = ['mc-secret-key', 'EAAG-old-token', 'EAAG-new-long-lived-token', 'meta-app-secret', 'google-client-secret', '1//refresh-token-value', 'ya29.', SECRET];

let worker;
let port;
test.before(async () => {
  worker = new Worker(path.join(__dirname, 'support', 'fake-services.js'));
  port = await new Promise((resolve) => worker.once('message', resolve));
});
test.after(() => worker.terminate());
test.beforeEach(async () => {
  await fetch(`http://127.0.0.1:${port}/_reset`, { method: 'POST' });
});

async function mode(service, m) {
  await fetch(`http://127.0.0.1:${port}/_mode`, { method: 'POST', body: JSON.stringify({ service, mode: m }) });
}
async function calls() {
  return (await (await fetch(`http://127.0.0.1:${port}/_calls`)).json());
}
function totalCalls(c, service) {
  return Object.entries(c.calls).filter(([k]) => k.startsWith(service + ' ')).reduce((n, [, v]) => n + v, 0);
}

let seq = 0;
function cmd(command_type, service, action_id, agent) {
  return { action_id: action_id || `act-${++seq}`, command_type, params: { service }, agent: agent || 'agent-7', agent_verified: true, requested_at: new Date().toISOString() };
}
function post(env, body, opts) {
  const out = env.gs.doPost(event(SECRET, body, opts));
  assert.equal(out.mime, 'application/json', 'answers with ContentService JSON');
  return JSON.parse(out.getContent());
}
function noSecrets(answer) {
  const text = JSON.stringify(answer);
  for (const s of SECRET_VALUES) assert.ok(!text.includes(s), `answer leaks ${s}: ${text}`);
}

test('CHECK_INTEGRATION_STATUS for each service', async () => {
  const env = load({ props: CREDS, servicePort: port });
  for (const service of ['mailchimp', 'meta', 'google']) {
    const a = post(env, cmd('CHECK_INTEGRATION_STATUS', service));
    assert.equal(a.status, 'success', JSON.stringify(a));
    assert.equal(a.integration_status, 'CONNECTED');
    assert.ok(!Number.isNaN(Date.parse(a.last_checked)));
    noSecrets(a);
  }
  const c = await calls();
  assert.equal(c.calls['mailchimp GET /3.0/ping'], 1);
  assert.equal(c.seen.mailchimp, 'Basic ' + Buffer.from('anystring:mc-secret-key-us21').toString('base64'));
  assert.equal(c.calls['meta GET /v19.0/debug_token'], 1);
  assert.equal(c.calls['google GET /tokeninfo'], 1);
  assert.ok(env.fetchLog.some((f) => f.url.startsWith('https://us21.api.mailchimp.com/3.0/ping')));
});

test('REFRESH_TOKEN for each service; Google stores the new token and expiry, results carry none', async () => {
  const env = load({ props: CREDS, servicePort: port });
  const g = post(env, cmd('REFRESH_TOKEN', 'google'));
  assert.deepEqual(g, { status: 'success', message: 'Token for google refreshed successfully.', new_token_expires_in: 3599 });
  assert.equal(env.props.store.GOOGLE_ACCESS_TOKEN, 'ya29.fresh-access-token');
  const expiresAt = Number(env.props.store.GOOGLE_ACCESS_TOKEN_EXPIRES_AT);
  assert.ok(Math.abs(expiresAt - (Date.now() / 1000 + 3599)) < 5);
  assert.equal((await calls()).seen.google, '1//refresh-token-value');

  const m = post(env, cmd('REFRESH_TOKEN', 'meta'));
  assert.equal(m.status, 'success');
  assert.equal(m.new_token_expires_in, 5183944);
  assert.equal(env.props.store.META_ACCESS_TOKEN, 'EAAG-new-long-lived-token');

  const mc = post(env, cmd('REFRESH_TOKEN', 'mailchimp'));
  assert.equal(mc.status, 'success');
  assert.equal(mc.new_token_expires_in, null);
  for (const a of [g, m, mc]) noSecrets(a);
});

test('a bad, missing or stale signature is refused and nothing is called', async () => {
  const env = load({ props: CREDS, servicePort: port });
  const body = cmd('REFRESH_TOKEN', 'google');
  const bad = post(env, body, { sig: 'f'.repeat(64) });
  assert.deepEqual(bad, { status: 'error', error: 'bad signature', retryable: false });
  const garbage = post(env, body, { sig: 'not-hex' });
  assert.equal(garbage.error, 'bad signature');
  const stale = post(env, body, { ts: Math.floor(Date.now() / 1000) - 301 });
  assert.match(stale.error, /outside the accepted window/);
  assert.equal(stale.retryable, false);
  const future = post(env, body, { ts: Math.floor(Date.now() / 1000) + 400 });
  assert.match(future.error, /outside the accepted window/);
  const missing = JSON.parse(env.gs.doPost({ parameter: {}, postData: { contents: JSON.stringify(body) } }).getContent());
  assert.match(missing.error, /ts/);
  // A body changed after signing.
  const e = event(SECRET, body);
  e.postData.contents = JSON.stringify(Object.assign({}, body, { params: { service: 'meta' } }));
  assert.equal(JSON.parse(env.gs.doPost(e).getContent()).error, 'bad signature');
  assert.equal(Object.keys((await calls()).calls).length, 0);
});

test('a replayed request returns the first answer without acting again', async () => {
  const env = load({ props: CREDS, servicePort: port });
  const e = event(SECRET, cmd('REFRESH_TOKEN', 'google', 'replay-1'));
  const first = JSON.parse(env.gs.doPost(e).getContent());
  const again = JSON.parse(env.gs.doPost(e).getContent());
  assert.deepEqual(again, first);
  assert.equal(totalCalls(await calls(), 'google'), 1);
});

test('a duplicate action_id is answered as the first time; the service is called once', async () => {
  const env = load({ props: CREDS, servicePort: port });
  const first = post(env, cmd('CHECK_INTEGRATION_STATUS', 'mailchimp', 'dup-1'));
  // A new, validly signed request (the poller's retry) with the same action_id.
  const second = post(env, cmd('CHECK_INTEGRATION_STATUS', 'mailchimp', 'dup-1'));
  assert.deepEqual(second, first);
  assert.equal(totalCalls(await calls(), 'mailchimp'), 1);
  // While a first call is still executing, a duplicate is told to retry, never run in parallel.
  const dup2 = cmd('CHECK_INTEGRATION_STATUS', 'mailchimp', 'dup-2');
  env.cache.put('claim:v:agent-7/dup-2', env.gs.requestDigest_(dup2), 60);
  const busy = post(env, dup2);
  assert.equal(busy.status, 'error');
  assert.equal(busy.retryable, true);
  assert.match(busy.error, /already being executed/);
  assert.equal(totalCalls(await calls(), 'mailchimp'), 1);
});

test('CONNECT_INTEGRATION is refused by the bridge, naming the policy', async () => {
  const env = load({ props: CREDS, servicePort: port });
  const a = post(env, cmd('CONNECT_INTEGRATION', 'salesforce'));
  assert.equal(a.status, 'error');
  assert.equal(a.retryable, false);
  assert.match(a.error, /CONNECT_INTEGRATION refused by bridge policy/);
  assert.match(a.error, /manual security and permissions review/);
  const known = post(env, cmd('CONNECT_INTEGRATION', 'google'));
  assert.match(known.error, /refused by bridge policy/);
  assert.equal(Object.keys((await calls()).calls).length, 0);
});

test('service failures give a clear error with the right retryable', async () => {
  const env = load({ props: CREDS, servicePort: port, fetchTimeoutMs: 700 });
  await mode('google', '401');
  const denied = post(env, cmd('REFRESH_TOKEN', 'google'));
  assert.equal(denied.status, 'error');
  assert.equal(denied.retryable, false);
  assert.match(denied.error, /google token refresh failed with HTTP 401 \(invalid_grant: Token has been expired or revoked\.\)/);
  assert.equal(env.props.store.GOOGLE_ACCESS_TOKEN, 'ya29.old-access-token', 'nothing stored on failure');

  await mode('mailchimp', '500');
  const down = post(env, cmd('CHECK_INTEGRATION_STATUS', 'mailchimp', 'mc-500'));
  assert.equal(down.retryable, true);
  assert.match(down.error, /mailchimp ping failed with HTTP 500/);

  await mode('meta', 'hang');
  const slow = post(env, cmd('CHECK_INTEGRATION_STATUS', 'meta'));
  assert.equal(slow.status, 'error');
  assert.equal(slow.retryable, true);
  assert.match(slow.error, /request to the service failed: Timeout/);
  assert.ok(!slow.error.includes('EAAG'), 'the query string (with the token) is not echoed');

  // A retryable failure is not remembered: once the service is back, the same action runs.
  await mode('mailchimp', 'ok');
  const back = post(env, cmd('CHECK_INTEGRATION_STATUS', 'mailchimp', 'mc-500'));
  assert.equal(back.status, 'success');
  // A non-retryable one is: the same action_id gets the same refusal without a new call.
  const before = totalCalls(await calls(), 'google');
  const denied2 = post(env, cmd('REFRESH_TOKEN', 'google', 'g-401'));
  assert.equal(denied2.status, 'error');
  assert.equal(totalCalls(await calls(), 'google'), before + 1);
  const denied3 = post(env, cmd('REFRESH_TOKEN', 'google', 'g-401'));
  assert.deepEqual(denied3, denied2);
  assert.equal(totalCalls(await calls(), 'google'), before + 1);
});

test('missing configuration and bad bodies are clear, non-retryable errors', async () => {
  const env = load({ props: { BRIDGE_SECRET: SECRET }, servicePort: port });
  const a = post(env, cmd('REFRESH_TOKEN', 'google'));
  assert.equal(a.retryable, false);
  assert.match(a.error, /Script Property GOOGLE_CLIENT_ID is not set/);
  const unknown = post(env, cmd('CHECK_INTEGRATION_STATUS', 'hubspot'));
  assert.match(unknown.error, /service hubspot is not configured/);
  assert.match(post(env, 'not json').error, /not JSON/);
  assert.match(post(env, { action_id: 'x y', command_type: 'REFRESH_TOKEN', params: { service: 'google' }, agent: 'a' }).error, /action_id/);
  const unconfigured = load({ props: {}, servicePort: port });
  const u = JSON.parse(unconfigured.gs.doPost(event(SECRET, cmd('REFRESH_TOKEN', 'google'))).getContent());
  assert.match(u.error, /BRIDGE_SECRET is not set/);
  assert.equal(JSON.parse(env.gs.doGet().getContent()).status, 'error');
});

test('the signature matches the poller\'s: HMAC-SHA256 over ts + "." + body, lower hex', () => {
  // The same vector as the Rust unit test in src/bridge/signing.rs.
  const env = load({ props: CREDS, servicePort: port });
  assert.equal(env.gs.verify_('k', 1, 'x', '976cb87e4f568d1c0f03f32859e90af8597cf00b978ba37c229c97d3a15b8449'), true);
  assert.equal(env.gs.verify_('k', 1, 'y', '976cb87e4f568d1c0f03f32859e90af8597cf00b978ba37c229c97d3a15b8449'), false);
});

test('the request digest matches the poller\'s', () => {
  // The same vector as the Rust unit test in src/bridge/mod.rs.
  const env = load({ props: CREDS, servicePort: port });
  const r = { action_id: 'token-refresh-google-456', command_type: 'REFRESH_TOKEN', params: { service: 'google' }, agent: 'agent-7', agent_verified: true };
  assert.equal(env.gs.requestDigest_(r), '6ef5b0535d1af4c4f15f1e645dd40591241418d9ab6084f4e732e0e1abff853f');
  assert.equal(env.gs.dedupKey_(r), 'v:agent-7/token-refresh-google-456');
});

test('another agent\'s request under the same action_id is its own action', async () => {
  const env = load({ props: CREDS, servicePort: port });
  const id = 'token-refresh-google-456';
  // Agent B plants a status check under the id agent A is about to use for a refresh.
  const planted = post(env, cmd('CHECK_INTEGRATION_STATUS', 'google', id, 'agent-b'));
  assert.equal(planted.integration_status, 'CONNECTED');
  const refresh = post(env, cmd('REFRESH_TOKEN', 'google', id, 'agent-7'));
  assert.equal(refresh.status, 'success', JSON.stringify(refresh));
  assert.equal(refresh.message, 'Token for google refreshed successfully.');
  assert.equal(env.props.store.GOOGLE_ACCESS_TOKEN, 'ya29.fresh-access-token', 'the token endpoint was called');
  // B reusing an id A already ran is B's own request, executed for B, not A's answer.
  const c0 = totalCalls(await calls(), 'mailchimp');
  post(env, cmd('CHECK_INTEGRATION_STATUS', 'mailchimp', 'mc-read', 'agent-7'));
  post(env, cmd('CHECK_INTEGRATION_STATUS', 'mailchimp', 'mc-read', 'agent-b'));
  assert.equal(totalCalls(await calls(), 'mailchimp'), c0 + 2);
  // An unverified name is another agent too.
  const unverified = Object.assign(cmd('CHECK_INTEGRATION_STATUS', 'mailchimp', 'mc-read', 'agent-7'), { agent_verified: false });
  assert.equal(post(env, unverified).status, 'success');
  assert.equal(totalCalls(await calls(), 'mailchimp'), c0 + 3);
});

test('a non-retryable error planted by another agent doesn\'t fail this agent\'s action', async () => {
  const env = load({ props: CREDS, servicePort: port });
  const id = 'planted-err';
  const planted = post(env, cmd('CHECK_INTEGRATION_STATUS', 'hubspot', id, 'agent-b'));
  assert.equal(planted.retryable, false);
  const mine = post(env, cmd('REFRESH_TOKEN', 'google', id, 'agent-7'));
  assert.equal(mine.status, 'success', JSON.stringify(mine));
});

test('the same agent reusing an action_id for a different request is refused', async () => {
  const env = load({ props: CREDS, servicePort: port });
  const first = post(env, cmd('CHECK_INTEGRATION_STATUS', 'google', 'reuse-1'));
  assert.equal(first.status, 'success');
  const before = totalCalls(await calls(), 'google');
  const other = post(env, cmd('REFRESH_TOKEN', 'google', 'reuse-1'));
  assert.equal(other.status, 'error');
  assert.equal(other.retryable, false);
  assert.match(other.error, /already used by this agent for a different request/);
  assert.equal(totalCalls(await calls(), 'google'), before, 'nothing executed');
  // While the first is still executing, too.
  const inFlight = cmd('CHECK_INTEGRATION_STATUS', 'meta', 'reuse-2');
  env.cache.put('claim:v:agent-7/reuse-2', env.gs.requestDigest_(inFlight), 60);
  assert.match(post(env, cmd('REFRESH_TOKEN', 'meta', 'reuse-2')).error, /different request/);
  // The same request again is answered as the first time.
  assert.deepEqual(post(env, cmd('CHECK_INTEGRATION_STATUS', 'google', 'reuse-1')), first);
});

test('agent_verified is required', async () => {
  const env = load({ props: CREDS, servicePort: port });
  const c = cmd('CHECK_INTEGRATION_STATUS', 'google');
  delete c.agent_verified;
  assert.match(post(env, c).error, /agent_verified/);
});

test('a lookup returns the remembered answer and never acts', async () => {
  const env = load({ props: CREDS, servicePort: port });
  const first = post(env, cmd('REFRESH_TOKEN', 'google', 'look-1'));
  assert.equal(first.status, 'success');
  const before = totalCalls(await calls(), 'google');
  const again = post(env, Object.assign(cmd('REFRESH_TOKEN', 'google', 'look-1'), { lookup: true }));
  assert.deepEqual(again, first);
  // Nothing remembered: an explicit "don't know", and no call to the service.
  const none = post(env, Object.assign(cmd('REFRESH_TOKEN', 'google', 'look-2'), { lookup: true }));
  assert.equal(none.status, 'error');
  assert.equal(none.retryable, false);
  assert.equal(none.remembered, false);
  assert.equal(totalCalls(await calls(), 'google'), before, 'a lookup never acts');
  // Still executing: ask again.
  const running = cmd('CHECK_INTEGRATION_STATUS', 'meta', 'look-3');
  env.cache.put('claim:v:agent-7/look-3', env.gs.requestDigest_(running), 60);
  const busy = post(env, Object.assign(running, { lookup: true }));
  assert.equal(busy.retryable, true);
  // Another request's answer is not given out.
  const other = post(env, Object.assign(cmd('CHECK_INTEGRATION_STATUS', 'google', 'look-1'), { lookup: true }));
  assert.match(other.error, /different request/);
});

test('answers outlive the script cache\'s 1,000-item limit: 20,000 later answers leave the first remembered', () => {
  const env = load({ props: CREDS, servicePort: port });
  const gs = env.gs;
  const answer = (i) => ({ status: 'success', integration_status: 'CONNECTED', service: 'google', n: i });
  let ran = 0;
  const first = gs.once_('v:agent-7/first', 'digest-first', () => { ran++; return answer(0); });
  assert.equal(first.n, 0);
  for (let i = 1; i <= 20000; i++) {
    gs.once_(`v:agent-${i % 37}/later-${i}`, `digest-${i}`, () => { ran++; return answer(i); });
  }
  assert.equal(ran, 20001);
  assert.ok(env.cache.store.size <= 1000, `the cache holds ${env.cache.store.size} items`);
  const again = gs.once_('v:agent-7/first', 'digest-first', () => { ran++; return answer(-1); });
  assert.equal(again.n, 0, 'the repeat got the first answer');
  assert.equal(ran, 20001, 'and did not act again');
  assert.equal(gs.lookup_('v:agent-7/first', 'digest-first').n, 0);
  assert.equal(gs.lookup_('v:agent-7/first', 'another-digest').status, 'error', 'a reused id is still refused');
});

test('a full page drops its oldest answers first and stays within the cache\'s value limit', () => {
  const env = load({ props: CREDS, servicePort: port });
  const gs = env.gs;
  gs.ANSWER_PAGES = 1;
  gs.PAGE_MAX_CHARS = 3000;
  for (let i = 0; i < 200; i++) {
    gs.once_(`v:a/p-${i}`, `d-${i}`, () => ({ status: 'success', padding: 'x'.repeat(40), n: i }));
  }
  const page = env.cache.get('answers:0');
  assert.ok(page.length <= 3000, `page of ${page.length} characters`);
  assert.equal(gs.lookup_('v:a/p-199', 'd-199').n, 199, 'the newest is kept');
  assert.equal(gs.lookup_('v:a/p-0', 'd-0').remembered, false, 'the oldest went first');
});

test('REVOKE_CREDENTIALS revokes at each provider that allows it, deletes every token either way, and says which', async () => {
  const env = load({ props: CREDS, servicePort: port });
  const g = post(env, cmd('REVOKE_CREDENTIALS', 'google', 'lever-g', 'operator:ops'));
  assert.equal(g.status, 'success', JSON.stringify(g));
  assert.equal(g.operation, 'REVOKE_CREDENTIALS');
  assert.equal(g.integration_status, 'REVOKED');
  assert.deepEqual(g.credentials, [
    { credential: 'GOOGLE_REFRESH_TOKEN', outcome: 'revoked at provider' },
    { credential: 'GOOGLE_ACCESS_TOKEN', outcome: 'revoked at provider' },
  ]);
  noSecrets(g);
  let c = await calls();
  assert.equal(c.calls['google POST /revoke'], 1);
  assert.equal(c.seen.google, '1//refresh-token-value', 'the refresh token is the one revoked (RFC 7009)');
  for (const k of ['GOOGLE_REFRESH_TOKEN', 'GOOGLE_ACCESS_TOKEN']) assert.ok(!(k in env.props.store), `${k} deleted`);
  assert.equal(env.props.store.GOOGLE_CLIENT_SECRET, 'google-client-secret', 'a revoke keeps the app credentials');

  const m = post(env, cmd('REVOKE_CREDENTIALS', 'meta', 'lever-m', 'operator:ops'));
  assert.deepEqual(m.credentials, [{ credential: 'META_ACCESS_TOKEN', outcome: 'revoked at provider' }]);
  c = await calls();
  assert.equal(c.calls['meta DELETE /v19.0/me/permissions'], 1);
  assert.equal(c.seen.meta, 'EAAG-old-token');
  assert.ok(!('META_ACCESS_TOKEN' in env.props.store));

  const mc = post(env, cmd('REVOKE_CREDENTIALS', 'mailchimp', 'lever-mc', 'operator:ops'));
  assert.deepEqual(mc.credentials, [
    { credential: 'MAILCHIMP_API_KEY', outcome: 'deleted locally, revoke by hand at https://admin.mailchimp.com/account/api/' },
  ]);
  assert.equal(totalCalls(await calls(), 'mailchimp'), 0, 'no API revokes a Mailchimp key: nothing is called');
  assert.ok(!('MAILCHIMP_API_KEY' in env.props.store));

  // Afterwards the bridge itself can't refresh: the tokens are gone.
  const after = post(env, cmd('REFRESH_TOKEN', 'google'));
  assert.equal(after.status, 'error');
  assert.match(after.error, /GOOGLE_REFRESH_TOKEN is not set/);
  assert.equal(post(env, cmd('CHECK_INTEGRATION_STATUS', 'google')).integration_status, 'NOT_CONNECTED');
});

test('a provider that refuses or is down: the token is still deleted and named for revoking by hand', async () => {
  const env = load({ props: CREDS, servicePort: port });
  await mode('google', '500');
  const g = post(env, cmd('REVOKE_CREDENTIALS', 'google', 'lever-g500', 'operator:ops'));
  assert.equal(g.status, 'success');
  assert.equal(g.credentials[0].outcome, 'deleted locally, revoke by hand at https://myaccount.google.com/permissions');
  assert.equal(g.credentials[0].provider_error, 'HTTP 500');
  assert.ok(!('GOOGLE_REFRESH_TOKEN' in env.props.store));
  await mode('meta', 'hang');
  const m = post(env, cmd('REVOKE_CREDENTIALS', 'meta', 'lever-mhang', 'operator:ops'));
  assert.equal(m.credentials[0].outcome, 'deleted locally, revoke by hand at https://www.facebook.com/settings?tab=business_tools');
  assert.match(m.credentials[0].provider_error, /Timeout/);
  noSecrets(m);
  // A token the provider no longer knows is revoked there already.
  const env2 = load({ props: CREDS, servicePort: port });
  await mode('google', 'gone');
  const gone = post(env2, cmd('REVOKE_CREDENTIALS', 'google', 'lever-ggone', 'operator:ops'));
  assert.equal(gone.credentials[0].outcome, 'revoked at provider');
});

test('DISCONNECT_INTEGRATION also deletes the app credentials, names where to rotate them, and acts once', async () => {
  const env = load({ props: CREDS, servicePort: port });
  const body = cmd('DISCONNECT_INTEGRATION', 'google', 'lever-d', 'operator:ops');
  const d = post(env, body);
  assert.equal(d.integration_status, 'DISCONNECTED');
  assert.deepEqual(d.credentials.map((x) => x.credential), ['GOOGLE_REFRESH_TOKEN', 'GOOGLE_ACCESS_TOKEN', 'GOOGLE_CLIENT_SECRET']);
  assert.equal(d.credentials[2].outcome, 'deleted locally, revoke by hand at https://console.cloud.google.com/apis/credentials');
  assert.ok(!('GOOGLE_CLIENT_SECRET' in env.props.store));
  assert.equal(env.props.store.GOOGLE_CLIENT_ID, 'client-id.apps.googleusercontent.com', 'an id is no secret');
  noSecrets(d);
  // The same request again (another replica, a retry) is answered as the first time.
  assert.deepEqual(post(env, body), d);
  assert.equal((await calls()).calls['google POST /revoke'], 1);
  // Nothing left to revoke: an empty list, still a success.
  const again = post(env, cmd('DISCONNECT_INTEGRATION', 'google', 'lever-d2', 'operator:ops'));
  assert.deepEqual(again.credentials, []);
});
