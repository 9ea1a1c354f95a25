// Plays Mailchimp, Meta's Graph API and Google's OAuth endpoints on 127.0.0.1, in a worker
// thread so it keeps answering while the main thread blocks in the synchronous fetch stand-in.
// Paths are /<original host>/<original path>. Control: POST /_mode {service, mode} with mode
// ok | 401 | 500 | hang | gone (Google's revoke: the token is already invalid); GET /_calls;
// POST /_reset.
'use strict';
const { parentPort } = require('node:worker_threads');
const http = require('node:http');

const modes = {};
const calls = {};
const seen = {}; // last credentials each endpoint received

function send(res, code, obj) {
  res.writeHead(code, { 'content-type': 'application/json' });
  res.end(JSON.stringify(obj));
}

const server = http.createServer((req, res) => {
  let body = '';
  req.on('data', (c) => (body += c));
  req.on('end', () => {
    const url = new URL(req.url, 'http://x');
    if (url.pathname === '/_mode') {
      const m = JSON.parse(body);
      modes[m.service] = m.mode;
      return send(res, 200, {});
    }
    if (url.pathname === '/_calls') return send(res, 200, { calls, seen });
    if (url.pathname === '/_reset') {
      for (const k of Object.keys(modes)) delete modes[k];
      for (const k of Object.keys(calls)) delete calls[k];
      return send(res, 200, {});
    }
    const [, host, ...rest] = url.pathname.split('/');
    const path = '/' + rest.join('/');
    const service = host.includes('mailchimp') ? 'mailchimp' : host.includes('facebook') ? 'meta' : 'google';
    const key = service + ' ' + req.method + ' ' + path;
    calls[key] = (calls[key] || 0) + 1;
    const mode = modes[service] || 'ok';
    if (mode === 'hang') return; // never answers
    if (mode === '401') return send(res, 401, service === 'google' ? { error: 'invalid_grant', error_description: 'Token has been expired or revoked.' } : { title: 'API Key Invalid', detail: 'Your API key may be invalid.', error: { message: 'Invalid OAuth access token.', type: 'OAuthException', code: 190 } });
    if (mode === '500') return send(res, 500, { error: 'backend_error' });
    if (service === 'mailchimp' && path === '/3.0/ping') {
      seen.mailchimp = req.headers.authorization;
      return send(res, 200, { health_status: "Everything's Chimpy!" });
    }
    if (service === 'meta' && path === '/v19.0/debug_token') {
      seen.meta = url.searchParams.get('input_token');
      return send(res, 200, { data: { is_valid: true, expires_at: 1893456000, app_id: '1' } });
    }
    if (service === 'meta' && path === '/v19.0/oauth/access_token') {
      seen.meta = url.searchParams.get('fb_exchange_token');
      return send(res, 200, { access_token: 'EAAG-new-long-lived-token', token_type: 'bearer', expires_in: 5183944 });
    }
    if (service === 'google' && path === '/token' && req.method === 'POST') {
      const form = new URLSearchParams(body);
      seen.google = form.get('refresh_token');
      if (form.get('grant_type') !== 'refresh_token') return send(res, 400, { error: 'unsupported_grant_type' });
      return send(res, 200, { access_token: 'ya29.fresh-access-token', expires_in: 3599, token_type: 'Bearer', scope: 'x' });
    }
    // Meta's documented de-authorization: DELETE /me/permissions answers {"success": true}.
    if (service === 'meta' && path === '/v19.0/me/permissions' && req.method === 'DELETE') {
      seen.meta = url.searchParams.get('access_token');
      return send(res, 200, { success: true });
    }
    // Google's RFC 7009 endpoint: POST /revoke with token=...; 200 with an empty body, 400
    // invalid_token for a token it no longer knows.
    if (service === 'google' && path === '/revoke' && req.method === 'POST') {
      const token = new URLSearchParams(body).get('token');
      seen.google = token;
      if (mode === 'gone') return send(res, 400, { error: 'invalid_token', error_description: 'Token expired or revoked' });
      return send(res, 200, {});
    }
    if (service === 'google' && path === '/tokeninfo') {
      return send(res, 200, { expires_in: '3000', scope: 'x' });
    }
    send(res, 404, { error: 'not found: ' + key });
  });
});
// No idle timeout on kept-alive connections. The tests run Code.gs synchronously on the main
// thread; one that blocks it for longer than Node's default 5 s (the 20,000-answer cache test under
// load) let this server close the idle socket while the client could not see the close, and the
// next test's first fetch, reusing that socket, failed with "fetch failed" (reproduced with a
// 6 s busy test; CI saw it once).
server.keepAliveTimeout = 0;
server.listen(0, '127.0.0.1', () => parentPort.postMessage(server.address().port));
