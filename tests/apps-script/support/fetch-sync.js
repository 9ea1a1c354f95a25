// Child process behind the UrlFetchApp stand-in: Apps Script's fetch is synchronous, Node's is
// not, so the stand-in runs this with execFileSync. Reads {url, method, headers, body,
// timeoutMs} on stdin, writes {status, headers, body} or {error} on stdout.
'use strict';
let input = '';
process.stdin.on('data', (c) => (input += c));
process.stdin.on('end', async () => {
  const req = JSON.parse(input);
  try {
    const resp = await fetch(req.url, {
      method: req.method,
      headers: req.headers,
      body: req.body === undefined ? undefined : req.body,
      redirect: 'manual',
      signal: AbortSignal.timeout(req.timeoutMs),
    });
    const body = await resp.text();
    process.stdout.write(JSON.stringify({ status: resp.status, headers: Object.fromEntries(resp.headers), body }));
  } catch (err) {
    const timeout = err && (err.name === 'TimeoutError' || err.name === 'AbortError');
    process.stdout.write(JSON.stringify({ error: timeout ? 'Timeout: ' + req.url : 'Address unavailable: ' + req.url }));
  }
});
