// Small stand-ins for the Apps Script globals Code.gs uses, and a loader that runs Code.gs in a
// fresh context with them. UrlFetchApp does real HTTP (synchronously, through a child process),
// with https://<host>/<path> rewritten to the local fake services.
'use strict';
const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const vm = require('node:vm');
const { execFileSync } = require('node:child_process');

const CODE = fs.readFileSync(path.join(__dirname, '..', '..', '..', 'deploy', 'apps-script', 'Code.gs'), 'utf8');
const FETCH = path.join(__dirname, 'fetch-sync.js');

function properties(initial) {
  const store = Object.assign({}, initial);
  return {
    store,
    getProperty: (k) => (k in store ? store[k] : null),
    setProperty: (k, v) => { store[k] = String(v); },
    setProperties: (o) => { for (const k of Object.keys(o)) store[k] = String(o[k]); },
    deleteProperty: (k) => { delete store[k]; },
  };
}

/**
 * The script cache with the limits Google documents and that have been measured: at most 1,000
 * items (when full, the oldest by creation time go, about 100 at once, however recently they
 * were read), keys of at most 250 characters, values of at most 100 KB, at most 6 hours.
 */
const CACHE_MAX_ITEMS = 1000;
const CACHE_EVICT = 100;
function cache() {
  const store = new Map(); // insertion order = creation order (a put deletes first)
  return {
    store,
    evicted: 0,
    get: (k) => {
      const e = store.get(k);
      return e && e.until > Date.now() ? e.value : null;
    },
    put(k, v, ttl) {
      if (typeof v !== 'string') throw new Error('cache values are strings');
      if (k.length > 250) throw new Error('cache key over 250 characters');
      if (Buffer.byteLength(v, 'utf8') > 100 * 1024) throw new Error('Argument too large: value');
      if ((ttl || 600) > 21600) throw new Error('cache expiration over 6 hours');
      store.delete(k);
      if (store.size >= CACHE_MAX_ITEMS) {
        for (const old of Array.from(store.keys()).slice(0, CACHE_EVICT)) store.delete(old);
        this.evicted += CACHE_EVICT;
      }
      store.set(k, { value: v, until: Date.now() + (ttl || 600) * 1000 });
    },
    remove: (k) => store.delete(k),
  };
}

function lock() {
  let held = false;
  return {
    tryLock: () => (held ? false : (held = true)),
    releaseLock: () => { held = false; },
    hasLock: () => held,
  };
}

function urlFetchApp(servicePort, log, timeoutMs) {
  return {
    fetch(url, params) {
      params = params || {};
      const u = new URL(url);
      const local = `http://127.0.0.1:${servicePort}/${u.host}${u.pathname}${u.search}`;
      const headers = Object.assign({}, params.headers || {});
      if (params.contentType) headers['content-type'] = params.contentType;
      const req = { url: local, method: (params.method || 'get').toUpperCase(), headers, body: params.payload, timeoutMs };
      log.push({ url, method: req.method });
      const out = JSON.parse(execFileSync(process.execPath, [FETCH], { input: JSON.stringify(req) }).toString());
      if (out.error) throw new Error(out.error);
      if (!params.muteHttpExceptions && out.status >= 400) throw new Error('Request failed for ' + url + ' returned code ' + out.status);
      return {
        getResponseCode: () => out.status,
        getContentText: () => out.body,
        getHeaders: () => out.headers,
      };
    },
  };
}

/** Loads Code.gs with fresh stand-ins. Returns the context (doPost, handle_...) and the stand-ins. */
function load({ props = {}, servicePort, fetchTimeoutMs = 1500 } = {}) {
  const scriptProps = properties(props);
  const scriptCache = cache();
  const scriptLock = lock();
  const fetchLog = [];
  const sandbox = {
    PropertiesService: { getScriptProperties: () => scriptProps },
    CacheService: { getScriptCache: () => scriptCache },
    LockService: { getScriptLock: () => scriptLock },
    UrlFetchApp: urlFetchApp(servicePort, fetchLog, fetchTimeoutMs),
    Utilities: {
      computeHmacSha256Signature: (value, key) =>
        Array.from(crypto.createHmac('sha256', key).update(value, 'utf8').digest()).map((b) => (b > 127 ? b - 256 : b)),
      base64Encode: (s) => Buffer.from(s, 'utf8').toString('base64'),
      DigestAlgorithm: { SHA_256: 'SHA_256' },
      Charset: { UTF_8: 'UTF_8' },
      computeDigest: (algorithm, value, charset) => {
        if (algorithm !== 'SHA_256' || charset !== 'UTF_8') throw new Error('unsupported digest in the stand-in');
        return Array.from(crypto.createHash('sha256').update(value, 'utf8').digest()).map((b) => (b > 127 ? b - 256 : b));
      },
    },
    ContentService: {
      MimeType: { JSON: 'application/json' },
      createTextOutput: (text) => ({
        text,
        mime: null,
        setMimeType(m) { this.mime = m; return this; },
        getContent() { return this.text; },
      }),
    },
    Logger: { log: () => {} },
    console,
    Date,
    JSON,
    Math,
  };
  vm.createContext(sandbox);
  vm.runInContext(CODE, sandbox, { filename: 'Code.gs' });
  return { gs: sandbox, props: scriptProps, cache: scriptCache, lock: scriptLock, fetchLog };
}

/** A signed doPost event, as Apps Script builds it. */
function event(secret, body, { ts = Math.floor(Date.now() / 1000), sig } = {}) {
  const contents = typeof body === 'string' ? body : JSON.stringify(body);
  const s = sig || crypto.createHmac('sha256', secret).update(`${ts}.${contents}`).digest('hex');
  return { parameter: { ts: String(ts), sig: s }, postData: { contents, type: 'application/json' } };
}

module.exports = { load, event };
