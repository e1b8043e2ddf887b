// node's ws client sends one binary message of SIZE bytes to URL and prints what
// follows as one JSON line (COOKIE: a Cookie header to send): {"echo": length} and/or {"close": code, "reason": text},
// or {"error": message}. FIRST: a text message sent just before it. For
// tests/test_app_websocket.py and tests/test_ws_conformance_e2e.py.
//   node ws_send.js URL SIZE [COOKIE] [FIRST]
const WebSocket = require('ws');

const [url, size, cookie, first] = process.argv.slice(2);
const seen = {};
const ws = new WebSocket(url, cookie ? { headers: { Cookie: cookie } } : {});
ws.on('open', () => {
  if (first) ws.send(first);
  ws.send(Buffer.alloc(Number(size), 7));
});
ws.on('message', (data) => { seen.echo = data.length; ws.close(1000); });
ws.on('error', (err) => { seen.error = err.message; });
ws.on('close', (code, reason) => {
  seen.close = code;
  seen.reason = reason.toString();
  console.log(JSON.stringify(seen));
  process.exit(0);
});
setTimeout(() => { console.log(JSON.stringify({ ...seen, timeout: true })); process.exit(1); },
  20000);
