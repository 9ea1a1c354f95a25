/**
 * MCP Orchestrator bridge: the Apps Script web app that command-poller calls.
 *
 * In:  POST /exec?ts=<unix seconds>&sig=<hex HMAC-SHA256(secret, ts + "." + body)> with JSON
 *      {"action_id","command_type","params":{"service"},"agent","agent_verified","requested_at"}.
 * Out: JSON {"status":"success", ...tool fields} or {"status":"error","error","retryable"}.
 *      Apps Script serves it through a 302 to an echo URL, which the poller fetches with GET.
 *
 * Credentials live in Script Properties and never leave the script: answers carry statuses and
 * expiry times, never a token. Two operations are the operators' (the poller sends them only
 * for `command-poller revoke` and `disconnect`, never for an agent): REVOKE_CREDENTIALS revokes
 * the service's tokens at the provider where it has a revocation endpoint and deletes them here
 * either way; DISCONNECT_INTEGRATION does the same and also deletes the app credentials the
 * integration was set up with. Both answer what was done to each credential. Requests are deduplicated per agent (verified or not) and
 * action_id, as the poller keys its results: a repeated request is answered as it was the first
 * time, without acting again, and a reused action_id with a different request (another
 * command type or service) is refused, never answered with the other request's answer.
 */

/**
 * The one table to edit to add a service: its kind (how it is checked, refreshed and revoked),
 * its endpoints, the Script Properties that hold its credentials (`tokenProperties`: deleted by
 * a revoke; `appCredentialProperties`: deleted by a disconnect too), and the admin pages where
 * what the bridge can't revoke is revoked by hand.
 */
var SERVICES = {
  mailchimp: {
    kind: 'api_key_ping',
    // {dc} is the data center suffix of the API key (e.g. "us21" in "xxxx-us21").
    pingUrl: 'https://{dc}.api.mailchimp.com/3.0/ping',
    apiKeyProperty: 'MAILCHIMP_API_KEY',
    tokenProperties: ['MAILCHIMP_API_KEY'],
    // No API revokes an API key: it is deleted here and revoked by hand there.
    adminUrl: 'https://admin.mailchimp.com/account/api/'
  },
  meta: {
    kind: 'meta_long_lived',
    debugTokenUrl: 'https://graph.facebook.com/v19.0/debug_token',
    exchangeUrl: 'https://graph.facebook.com/v19.0/oauth/access_token',
    // DELETE /me/permissions de-authorizes the app for the token's user (every permission).
    permissionsUrl: 'https://graph.facebook.com/v19.0/me/permissions',
    adminUrl: 'https://www.facebook.com/settings?tab=business_tools',
    appAdminUrl: 'https://developers.facebook.com/apps/',
    accessTokenProperty: 'META_ACCESS_TOKEN',
    appIdProperty: 'META_APP_ID',
    appSecretProperty: 'META_APP_SECRET',
    expiresAtProperty: 'META_ACCESS_TOKEN_EXPIRES_AT',
    tokenProperties: ['META_ACCESS_TOKEN', 'META_ACCESS_TOKEN_EXPIRES_AT'],
    appCredentialProperties: ['META_APP_SECRET']
  },
  google: {
    kind: 'oauth2_refresh',
    tokenUrl: 'https://oauth2.googleapis.com/token',
    tokenInfoUrl: 'https://oauth2.googleapis.com/tokeninfo',
    // RFC 7009 revocation: revoking the refresh token ends the grant and its access tokens.
    revokeUrl: 'https://oauth2.googleapis.com/revoke',
    adminUrl: 'https://myaccount.google.com/permissions',
    appAdminUrl: 'https://console.cloud.google.com/apis/credentials',
    clientIdProperty: 'GOOGLE_CLIENT_ID',
    clientSecretProperty: 'GOOGLE_CLIENT_SECRET',
    refreshTokenProperty: 'GOOGLE_REFRESH_TOKEN',
    accessTokenProperty: 'GOOGLE_ACCESS_TOKEN',
    expiresAtProperty: 'GOOGLE_ACCESS_TOKEN_EXPIRES_AT',
    tokenProperties: ['GOOGLE_REFRESH_TOKEN', 'GOOGLE_ACCESS_TOKEN', 'GOOGLE_ACCESS_TOKEN_EXPIRES_AT'],
    appCredentialProperties: ['GOOGLE_CLIENT_SECRET']
  }
};

/** Requests older or newer than this are refused (replays outside the window). */
var MAX_SKEW_SECONDS = 300;
/** How long answers are remembered for dedup (CacheService's maximum is 6 hours). */
var ANSWER_TTL_SECONDS = 21600;
/**
 * Answers are kept in pages: a page per bucket of dedup keys, each a cache item of at most
 * PAGE_MAX_CHARS. The script cache holds about 1,000 items and evicts the oldest when full, so
 * one item per answer forgot an answer after about 1,000 later ones (seconds at full load);
 * 500 pages hold every answer of the last 6 hours up to their size (500 x 90,000 characters:
 * about 100,000 answers of 400 characters), oldest dropped first.
 */
var ANSWER_PAGES = 500;
var PAGE_MAX_CHARS = 90000;
/** How long a claim on an action_id holds while it executes (above the 6-minute cap). */
var CLAIM_TTL_SECONDS = 420;
var SECRET_PROPERTY = 'BRIDGE_SECRET';
var COMMAND_TYPES = ['CHECK_INTEGRATION_STATUS', 'REFRESH_TOKEN', 'CONNECT_INTEGRATION',
  'REVOKE_CREDENTIALS', 'DISCONNECT_INTEGRATION'];
/** What each credential came to in a revoke or disconnect. */
var REVOKED_AT_PROVIDER = 'revoked at provider';
var DELETED_LOCALLY = 'deleted locally, revoke by hand at ';

function doPost(e) {
  return json_(handle_(e));
}

/** A GET on /exec is not part of the contract. */
function doGet() {
  return json_(error_('this web app only answers POST requests from command-poller', false));
}

function json_(obj) {
  return ContentService.createTextOutput(JSON.stringify(obj)).setMimeType(ContentService.MimeType.JSON);
}

function error_(message, retryable) {
  return { status: 'error', error: message, retryable: !!retryable };
}

/** The whole request, as a pure-ish function of e (testable without ContentService). */
function handle_(e) {
  try {
    var props = PropertiesService.getScriptProperties();
    var secret = props.getProperty(SECRET_PROPERTY);
    if (!secret) {
      return error_('bridge not configured: Script Property ' + SECRET_PROPERTY + ' is not set', false);
    }
    var params = (e && e.parameter) || {};
    var body = e && e.postData && typeof e.postData.contents === 'string' ? e.postData.contents : '';
    var ts = parseInt(params.ts, 10);
    if (!params.ts || isNaN(ts) || String(ts) !== String(params.ts)) {
      return error_('missing or malformed ts', false);
    }
    var now = Math.floor(Date.now() / 1000);
    if (Math.abs(now - ts) > MAX_SKEW_SECONDS) {
      return error_('request timestamp outside the accepted window of ' + MAX_SKEW_SECONDS + ' s', false);
    }
    if (!verify_(secret, ts, body, params.sig)) {
      return error_('bad signature', false);
    }
    var req;
    try {
      req = JSON.parse(body);
    } catch (err) {
      return error_('body is not JSON', false);
    }
    var invalid = validate_(req);
    if (invalid) {
      return error_(invalid, false);
    }
    if (req.lookup === true) {
      return lookup_(dedupKey_(req), requestDigest_(req));
    }
    return once_(dedupKey_(req), requestDigest_(req), function () {
      return act_(req, props);
    });
  } catch (err) {
    return error_('bridge internal error: ' + safeMessage_(err), isTransient_(err));
  }
}

function validate_(req) {
  if (!req || typeof req !== 'object' || Array.isArray(req)) return 'body must be a JSON object';
  if (typeof req.action_id !== 'string' || !/^[A-Za-z0-9._:-]{1,128}$/.test(req.action_id)) return 'action_id: invalid';
  if (COMMAND_TYPES.indexOf(req.command_type) < 0) return 'command_type: invalid';
  if (!req.params || typeof req.params.service !== 'string' || !/^[a-z0-9]([a-z0-9_-]{0,62}[a-z0-9])?$/.test(req.params.service)) {
    return 'params.service: invalid';
  }
  if (typeof req.agent !== 'string' || !/^[A-Za-z0-9_@:-]{1,64}$/.test(req.agent)) return 'agent: invalid';
  if (typeof req.agent_verified !== 'boolean') return 'agent_verified: must be true or false';
  if (req.lookup !== undefined && typeof req.lookup !== 'boolean') return 'lookup: must be true or false';
  return null;
}

/** The dedup key: agent (verified or not) and action_id, as the poller keys its results. */
function dedupKey_(req) {
  return (req.agent_verified ? 'v:' : 'u:') + req.agent + '/' + req.action_id;
}

/**
 * SHA-256 (lower hex) of what this web app acts on, the same as BridgeRequest::digest in the
 * poller: compact JSON of ["bridge/v1", agent, agent_verified, action_id, command_type, service].
 */
function requestDigest_(req) {
  var canonical = JSON.stringify(['bridge/v1', req.agent, req.agent_verified, req.action_id, req.command_type, req.params.service]);
  return hex_(Utilities.computeDigest(Utilities.DigestAlgorithm.SHA_256, canonical, Utilities.Charset.UTF_8));
}

/** Lower-hex HMAC-SHA256 of ts + "." + body, compared in constant time. */
function verify_(secret, ts, body, sig) {
  if (typeof sig !== 'string' || !/^[0-9a-f]{64}$/.test(sig)) return false;
  var expected = hex_(Utilities.computeHmacSha256Signature(ts + '.' + body, secret));
  var diff = 0;
  for (var i = 0; i < expected.length; i++) {
    diff |= expected.charCodeAt(i) ^ sig.charCodeAt(i);
  }
  return diff === 0;
}

function hex_(bytes) {
  var out = '';
  for (var i = 0; i < bytes.length; i++) {
    var b = (bytes[i] + 256) % 256;
    out += (b < 16 ? '0' : '') + b.toString(16);
  }
  return out;
}

/**
 * Runs fn at most once per key (agent and action_id). The answer is remembered with the
 * request's digest (unless it is a retryable error, so a retry can succeed); a repeat of the
 * same request gets the remembered answer, and a different request under the same key is
 * refused. The script lock only guards the claim, so executions of different actions run
 * concurrently.
 */
function once_(key, digest, fn) {
  var cache = CacheService.getScriptCache();
  var claimKey = 'claim:' + key;
  var reused = error_('action_id already used by this agent for a different request; refused (use a new action_id)', false);
  var remembered = function () {
    var entry = pageEntry_(cache, key);
    if (!entry) return null;
    return entry.d === digest ? entry.a : reused;
  };
  var answer = remembered();
  if (answer) return answer;
  var lock = LockService.getScriptLock();
  if (!lock.tryLock(10000)) {
    return error_('bridge busy (lock timeout); retry', true);
  }
  try {
    answer = remembered();
    if (answer) return answer;
    var claim = cache.get(claimKey);
    if (claim) {
      if (claim !== digest) return reused;
      return error_('action ' + key + ' is already being executed; retry for its answer', true);
    }
    cache.put(claimKey, digest, CLAIM_TTL_SECONDS);
  } finally {
    lock.releaseLock();
  }
  try {
    answer = fn();
  } catch (err) {
    answer = error_('bridge internal error: ' + safeMessage_(err), isTransient_(err));
  }
  if (!(answer.status === 'error' && answer.retryable)) {
    remember_(cache, key, digest, answer);
  }
  cache.remove(claimKey);
  return answer;
}

/** The cache item holding the answers of `key`'s bucket. */
function pageKey_(key) {
  var h = Utilities.computeDigest(Utilities.DigestAlgorithm.SHA_256, key, Utilities.Charset.UTF_8);
  var n = (((h[0] + 256) % 256) * 256 + ((h[1] + 256) % 256)) % ANSWER_PAGES;
  return 'answers:' + n;
}

/** The page of `key`'s bucket: {key: {d: digest, a: answer, t: remembered until (ms)}}. */
function page_(cache, pageKey) {
  var raw = cache.get(pageKey);
  if (!raw) return {};
  try {
    return JSON.parse(raw);
  } catch (err) {
    return {};
  }
}

/** The live entry remembered for `key`, if any. */
function pageEntry_(cache, key) {
  var entry = page_(cache, pageKey_(key))[key];
  return entry && entry.t > Date.now() ? entry : null;
}

/**
 * Adds `key`'s answer to its page under the script lock (pages are read, changed and written
 * back), dropping expired entries and then the oldest until the page fits.
 */
function remember_(cache, key, digest, answer) {
  var lock = LockService.getScriptLock();
  if (!lock.tryLock(10000)) {
    // Not remembered: a repeat of this request would act again. Rare (the lock is held for a
    // cache read and write); logged so it shows in the executions log.
    console.error('answer to ' + key + ' not remembered: lock timeout');
    return;
  }
  try {
    var pageKey = pageKey_(key);
    var page = page_(cache, pageKey);
    var now = Date.now();
    var keys = Object.keys(page).filter(function (k) { return page[k].t > now && k !== key; });
    keys.sort(function (a, b) { return page[a].t - page[b].t; });
    var entry = { d: digest, a: answer, t: now + ANSWER_TTL_SECONDS * 1000 };
    var size = function (k, v) { return JSON.stringify(k).length + JSON.stringify(v).length + 2; };
    var kept = {};
    var total = 2 + size(key, entry);
    keys.forEach(function (k) { kept[k] = page[k]; total += size(k, page[k]); });
    kept[key] = entry;
    for (var i = 0; total > PAGE_MAX_CHARS && i < keys.length; i++) {
      total -= size(keys[i], kept[keys[i]]);
      delete kept[keys[i]];
    }
    cache.put(pageKey, JSON.stringify(kept), ANSWER_TTL_SECONDS);
  } finally {
    lock.releaseLock();
  }
}

/**
 * The remembered answer to a request, without ever acting: what the poller asks when the
 * answer to a request that ran was lost on the way back. "remembered": false means there is
 * none (it did not complete, or the cache forgot it), so the outcome is unknown.
 */
function lookup_(key, digest) {
  var cache = CacheService.getScriptCache();
  var entry = pageEntry_(cache, key);
  if (entry) {
    if (entry.d === digest) return entry.a;
    return error_('action_id already used by this agent for a different request; refused (use a new action_id)', false);
  }
  if (cache.get('claim:' + key)) {
    return error_('action ' + key + ' is still being executed; ask again for its answer', true);
  }
  var none = error_('no answer remembered for this request; whether it ran is unknown', false);
  none.remembered = false;
  return none;
}

function act_(req, props) {
  var service = req.params.service;
  if (req.command_type === 'CONNECT_INTEGRATION') {
    // Defence in depth for Emergency-INT-E02: whatever the poller sends.
    return error_(
      'CONNECT_INTEGRATION refused by bridge policy: new integrations require manual security and permissions review (runbook SOP-INT-03)',
      false
    );
  }
  var spec = SERVICES[service];
  if (!spec) {
    return error_('service ' + service + ' is not configured in the bridge', false);
  }
  var kind = KINDS[spec.kind];
  if (req.command_type === 'CHECK_INTEGRATION_STATUS') return kind.check(service, spec, props);
  if (req.command_type === 'REVOKE_CREDENTIALS' || req.command_type === 'DISCONNECT_INTEGRATION') {
    return cut_(service, spec, kind, props, req.command_type === 'DISCONNECT_INTEGRATION');
  }
  return kind.refresh(service, spec, props);
}

/**
 * A revoke or disconnect: the kind revokes what the provider lets it (each credential's
 * outcome), then every credential of the service is deleted here whatever the provider said,
 * and a disconnect deletes the app credentials too (rotated by hand: no API does it).
 */
function cut_(service, spec, kind, props, disconnect) {
  var outcomes = kind.revoke(service, spec, props);
  var app = disconnect ? (spec.appCredentialProperties || []) : [];
  app.forEach(function (name) {
    if (props.getProperty(name)) {
      outcomes.push({ credential: name, outcome: DELETED_LOCALLY + (spec.appAdminUrl || spec.adminUrl) });
    }
  });
  (spec.tokenProperties || []).concat(app).forEach(function (name) {
    props.deleteProperty(name);
  });
  return {
    status: 'success',
    operation: disconnect ? 'DISCONNECT_INTEGRATION' : 'REVOKE_CREDENTIALS',
    service: service,
    integration_status: disconnect ? 'DISCONNECTED' : 'REVOKED',
    credentials: outcomes,
    done_at: nowIso_()
  };
}

/**
 * One credential revoked at the provider by `request` (a fetch answer), or, when the provider
 * refused or could not be reached, deleted here and named for revoking by hand. A token the
 * provider already considers invalid (400) is revoked there already.
 */
function revokedBy_(name, spec, request) {
  var out = { credential: name };
  try {
    var resp = request();
    var code = resp.getResponseCode();
    if (code === 200 || code === 400) {
      out.outcome = REVOKED_AT_PROVIDER;
      return out;
    }
    out.provider_error = 'HTTP ' + code;
  } catch (err) {
    out.provider_error = safeMessage_(err);
  }
  out.outcome = DELETED_LOCALLY + spec.adminUrl;
  return out;
}

function nowIso_() {
  return new Date().toISOString();
}

function need_(props, name) {
  var v = props.getProperty(name);
  if (!v) throw new ConfigError_('Script Property ' + name + ' is not set');
  return v;
}

function ConfigError_(message) {
  this.message = message;
  this.config = true;
}

/** Fetch that never throws on HTTP status, and turns transport failures into errors. */
function fetch_(url, options) {
  options = options || {};
  options.muteHttpExceptions = true;
  options.followRedirects = false;
  try {
    return UrlFetchApp.fetch(url, options);
  } catch (err) {
    throw new FetchError_(err);
  }
}

function FetchError_(cause) {
  this.message = 'request to the service failed: ' + safeMessage_(cause);
  this.transient = true;
}

/** An answer for a service HTTP failure: 429 and 5xx are retryable, others are not. */
function httpError_(service, what, resp) {
  var code = resp.getResponseCode();
  var detail = '';
  try {
    var j = JSON.parse(resp.getContentText());
    // Only error codes and descriptions: never echo a body that could hold a credential.
    var parts = [j.error && (j.error.type || j.error.code || j.error), j.error_description, j.title, j.detail,
      j.error && j.error.message];
    detail = parts.filter(function (p) { return typeof p === 'string' || typeof p === 'number'; }).join(': ');
  } catch (err) {
    detail = '';
  }
  return error_(service + ' ' + what + ' failed with HTTP ' + code + (detail ? ' (' + detail + ')' : ''),
    code === 429 || code >= 500);
}

function safeMessage_(err) {
  var m = err && err.message ? String(err.message) : String(err);
  // UrlFetchApp messages quote the URL; strip query strings, which can carry tokens.
  return m.replace(/\?[^\s"']*/g, '?…').slice(0, 300);
}

function isTransient_(err) {
  if (err && err.config) return false;
  if (err && err.transient) return true;
  var m = safeMessage_(err);
  return /too many times|timeout|timed out|address unavailable|temporarily|try again/i.test(m);
}

function form_(obj) {
  return Object.keys(obj).map(function (k) {
    return encodeURIComponent(k) + '=' + encodeURIComponent(obj[k]);
  }).join('&');
}

/** How each kind of service is checked and refreshed. */
var KINDS = {
  api_key_ping: {
    check: function (service, spec, props) {
      var r = pingMailchimp_(service, spec, props);
      if (r.status === 'error') return r;
      return { status: 'success', integration_status: 'CONNECTED', last_checked: nowIso_() };
    },
    revoke: function (service, spec, props) {
      if (!props.getProperty(spec.apiKeyProperty)) return [];
      return [{ credential: spec.apiKeyProperty, outcome: DELETED_LOCALLY + spec.adminUrl }];
    },
    refresh: function (service, spec, props) {
      // API keys don't expire: there is nothing to refresh, so confirm the key still works.
      var r = pingMailchimp_(service, spec, props);
      if (r.status === 'error') return r;
      return {
        status: 'success',
        message: 'Token for ' + service + ' does not expire; verified it still works.',
        new_token_expires_in: null
      };
    }
  },
  meta_long_lived: {
    revoke: function (service, spec, props) {
      var token = props.getProperty(spec.accessTokenProperty);
      if (!token) return [];
      return [revokedBy_(spec.accessTokenProperty, spec, function () {
        return fetch_(spec.permissionsUrl + '?' + form_({ access_token: token }), { method: 'delete' });
      })];
    },
    check: function (service, spec, props) {
      var token;
      try {
        token = need_(props, spec.accessTokenProperty);
        var appToken = need_(props, spec.appIdProperty) + '|' + need_(props, spec.appSecretProperty);
      } catch (err) {
        return error_(service + ': ' + err.message, false);
      }
      var resp = fetch_(spec.debugTokenUrl + '?' + form_({ input_token: token, access_token: appToken }), { method: 'get' });
      if (resp.getResponseCode() !== 200) return httpError_(service, 'token check', resp);
      var data = (JSON.parse(resp.getContentText()) || {}).data || {};
      var status = data.is_valid ? 'CONNECTED' : 'TOKEN_INVALID';
      var out = { status: 'success', integration_status: status, last_checked: nowIso_() };
      if (data.expires_at) out.token_expires_at = new Date(data.expires_at * 1000).toISOString();
      return out;
    },
    refresh: function (service, spec, props) {
      var params;
      try {
        params = {
          grant_type: 'fb_exchange_token',
          client_id: need_(props, spec.appIdProperty),
          client_secret: need_(props, spec.appSecretProperty),
          fb_exchange_token: need_(props, spec.accessTokenProperty)
        };
      } catch (err) {
        return error_(service + ': ' + err.message, false);
      }
      var resp = fetch_(spec.exchangeUrl + '?' + form_(params), { method: 'get' });
      if (resp.getResponseCode() !== 200) return httpError_(service, 'token exchange', resp);
      var j = JSON.parse(resp.getContentText());
      if (!j.access_token) return error_(service + ' token exchange returned no token', false);
      var expiresIn = j.expires_in || null;
      var update = {};
      update[spec.accessTokenProperty] = j.access_token;
      if (expiresIn) update[spec.expiresAtProperty] = String(Math.floor(Date.now() / 1000) + expiresIn);
      props.setProperties(update);
      return { status: 'success', message: 'Token for ' + service + ' refreshed successfully.', new_token_expires_in: expiresIn };
    }
  },
  oauth2_refresh: {
    revoke: function (service, spec, props) {
      var refresh = props.getProperty(spec.refreshTokenProperty);
      var access = props.getProperty(spec.accessTokenProperty);
      var revoke = function (token) {
        return function () {
          return fetch_(spec.revokeUrl, {
            method: 'post',
            contentType: 'application/x-www-form-urlencoded',
            payload: form_({ token: token })
          });
        };
      };
      var out = [];
      if (refresh) {
        var r = revokedBy_(spec.refreshTokenProperty, spec, revoke(refresh));
        out.push(r);
        // Revoking the refresh token ends the grant, and its access tokens with it.
        if (access) out.push({ credential: spec.accessTokenProperty, outcome: r.outcome });
      } else if (access) {
        out.push(revokedBy_(spec.accessTokenProperty, spec, revoke(access)));
      }
      return out;
    },
    check: function (service, spec, props) {
      var token = props.getProperty(spec.accessTokenProperty);
      if (!props.getProperty(spec.refreshTokenProperty)) {
        return { status: 'success', integration_status: 'NOT_CONNECTED', last_checked: nowIso_() };
      }
      if (!token) {
        return { status: 'success', integration_status: 'TOKEN_EXPIRED', last_checked: nowIso_() };
      }
      var resp = fetch_(spec.tokenInfoUrl + '?' + form_({ access_token: token }), { method: 'get' });
      var code = resp.getResponseCode();
      if (code === 400 || code === 401) {
        return { status: 'success', integration_status: 'TOKEN_EXPIRED', last_checked: nowIso_() };
      }
      if (code !== 200) return httpError_(service, 'token check', resp);
      return { status: 'success', integration_status: 'CONNECTED', last_checked: nowIso_() };
    },
    refresh: function (service, spec, props) {
      var payload;
      try {
        payload = {
          grant_type: 'refresh_token',
          client_id: need_(props, spec.clientIdProperty),
          client_secret: need_(props, spec.clientSecretProperty),
          refresh_token: need_(props, spec.refreshTokenProperty)
        };
      } catch (err) {
        return error_(service + ': ' + err.message, false);
      }
      var resp = fetch_(spec.tokenUrl, {
        method: 'post',
        contentType: 'application/x-www-form-urlencoded',
        payload: form_(payload)
      });
      if (resp.getResponseCode() !== 200) return httpError_(service, 'token refresh', resp);
      var j = JSON.parse(resp.getContentText());
      if (!j.access_token || !j.expires_in) return error_(service + ' token refresh returned no token', false);
      var update = {};
      update[spec.accessTokenProperty] = j.access_token;
      update[spec.expiresAtProperty] = String(Math.floor(Date.now() / 1000) + j.expires_in);
      if (j.refresh_token) update[spec.refreshTokenProperty] = j.refresh_token;
      props.setProperties(update);
      return { status: 'success', message: 'Token for ' + service + ' refreshed successfully.', new_token_expires_in: j.expires_in };
    }
  }
};

function pingMailchimp_(service, spec, props) {
  var key;
  try {
    key = need_(props, spec.apiKeyProperty);
  } catch (err) {
    return error_(service + ': ' + err.message, false);
  }
  var dc = key.slice(key.lastIndexOf('-') + 1);
  if (key.indexOf('-') < 0 || !/^[a-z]+[0-9]+$/.test(dc)) return error_(service + ': the API key has no data center suffix (xxxx-us21)', false);
  var resp = fetch_(spec.pingUrl.replace('{dc}', dc), {
    method: 'get',
    headers: { Authorization: 'Basic ' + Utilities.base64Encode('anystring:' + key) }
  });
  if (resp.getResponseCode() !== 200) return httpError_(service, 'ping', resp);
  return { status: 'success' };
}
