'use strict';
// A real SockJS client (the `sockjs-client` npm package, run under node with its own
// node XHR driver, lib/transport/driver/xhr.js) for tests/test_sockjs_e2e.py.
//
//   node client.js --front http://127.0.0.1:PORT
//
// Driven by JSON lines on stdin, it reports JSON lines on stdout, one per event, in order:
//   {"cmd": "session", "mode": "library"}  new SockJS(FRONT/sockjs): sockjs-client fetches
//       FRONT/sockjs/info itself and follows its base_url (sockjs-client >= 1.0 does).
//   {"cmd": "session", "mode": "manual"}   GET FRONT/sockjs/info here, report it, then
//       new SockJS(info.base_url) (what a client that ignores base_url would need).
//   {"cmd": "session", "mode": "url", "url": U}   new SockJS(U), e.g. an old base_url.
//     -> {"event": "info", ...} (manual only), then {"event": "open", ...} or
//        {"event": "close", ...} when the session cannot be opened.
//   {"cmd": "echo", "count": N, "tag": "T"}  send "T-0" .. "T-(N-1)" one after the other,
//       each only after the previous echo came back; the server answers "NAME|T-i".
//     -> {"event": "echo", "i": i, "server": NAME, "text": ...} per message, then
//        {"event": "echoed", "count": k} (k < N when the session closed or went silent).
//   {"cmd": "wait_close", "timeout": S}   -> {"event": "close", ...} or {"event": "timeout"}
//   {"cmd": "exit"}
// Every transport is forced to xhr-polling, so each poll and each send is its own HTTP
// request, which a round-robin front spreads over the balancers.

const http = require('http');
const readline = require('readline');
const SockJS = require('sockjs-client');

const at = process.argv.indexOf('--front');
const front = at >= 0 ? process.argv[at + 1].replace(/\/+$/, '') : '';
if (!front) {
  console.error('usage: node client.js --front http://127.0.0.1:PORT');
  process.exit(2);
}

function emit(event) {
  process.stdout.write(JSON.stringify(event) + '\n');
}

let sock = null;
let waiter = null; // resolves with the next {type: 'message'|'close'} of the session

function deliver(item) {
  if (waiter) {
    const resolve = waiter;
    waiter = null;
    resolve(item);
    return true;
  }
  return false;
}

function next(timeoutMs) {
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      waiter = null;
      resolve({ type: 'timeout' });
    }, timeoutMs);
    waiter = (item) => {
      clearTimeout(timer);
      resolve(item);
    };
  });
}

function getJSON(url) {
  return new Promise((resolve) => {
    // agent: false - a fresh connection, as a browser's first request would be.
    const req = http.get(url, { agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk) => { body += chunk; });
      res.on('end', () => {
        let json = null;
        try { json = JSON.parse(body); } catch (e) { json = null; }
        resolve({ status: res.statusCode, body, json });
      });
    });
    req.on('error', (err) => resolve({ status: 0, body: String(err), json: null }));
    req.setTimeout(15000, () => req.destroy(new Error('timeout')));
  });
}

function open(url, timeoutMs) {
  const s = new SockJS(url, null, { transports: ['xhr-polling'] });
  sock = s;
  s.onmessage = (e) => {
    if (!deliver({ type: 'message', data: e.data })) emit({ event: 'message', data: e.data });
  };
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      emit({ event: 'timeout', waiting: 'open' });
      resolve();
    }, timeoutMs);
    s.onopen = () => {
      clearTimeout(timer);
      emit({
        event: 'open',
        url,
        transport: s.transport,
        base_url: s._transUrl, // where the transport goes: base_url when info had one
        session_url: s._transport && s._transport.url,
      });
      resolve();
    };
    s.onclose = (e) => {
      clearTimeout(timer);
      const item = { event: 'close', code: e.code, reason: e.reason, wasClean: e.wasClean };
      emit(item);
      if (s === sock) deliver({ type: 'close', item });
      resolve();
    };
  });
}

async function session(cmd) {
  const timeoutMs = (cmd.timeout || 20) * 1000;
  if (cmd.mode === 'manual') {
    const info = await getJSON(front + '/sockjs/info');
    emit({ event: 'info', status: info.status, info: info.json, body: info.json ? undefined : info.body });
    if (!info.json || !info.json.base_url) return;
    await open(info.json.base_url, timeoutMs);
  } else if (cmd.mode === 'url') {
    await open(cmd.url, timeoutMs);
  } else {
    await open(front + '/sockjs', timeoutMs);
  }
}

async function echo(cmd) {
  const timeoutMs = (cmd.timeout || 20) * 1000;
  const tag = cmd.tag || 'm';
  let done = 0;
  for (let i = 0; i < cmd.count; i++) {
    const text = `${tag}-${i}`;
    try {
      sock.send(text);
    } catch (err) {
      emit({ event: 'send_error', i, error: String(err) });
      break;
    }
    const got = await next(timeoutMs);
    if (got.type !== 'message') {
      if (got.type === 'timeout') emit({ event: 'timeout', waiting: 'echo', i });
      break;
    }
    const bar = got.data.indexOf('|');
    const server = bar >= 0 ? got.data.slice(0, bar) : null;
    const echoed = bar >= 0 ? got.data.slice(bar + 1) : got.data;
    emit({ event: 'echo', i, server, text: echoed, ok: echoed === text });
    done++;
  }
  emit({ event: 'echoed', count: done });
}

async function waitClose(cmd) {
  if (!sock || sock.readyState === SockJS.CLOSED) {
    emit({ event: 'closed_already' });
    return;
  }
  const got = await next((cmd.timeout || 20) * 1000);
  if (got.type === 'timeout') emit({ event: 'timeout', waiting: 'close' });
  else if (got.type === 'message') emit({ event: 'message', data: got.data });
  // a close was emitted by onclose already
}

let chain = Promise.resolve();
const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  if (!line.trim()) return;
  const cmd = JSON.parse(line);
  chain = chain.then(async () => {
    if (cmd.cmd === 'session') await session(cmd);
    else if (cmd.cmd === 'echo') await echo(cmd);
    else if (cmd.cmd === 'wait_close') await waitClose(cmd);
    else if (cmd.cmd === 'exit') process.exit(0);
    else emit({ event: 'error', error: `unknown command ${cmd.cmd}` });
  }).catch((err) => emit({ event: 'error', error: String(err && err.stack || err) }));
});
rl.on('close', () => chain.then(() => process.exit(0)));
