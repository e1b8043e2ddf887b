'use strict';
// A real SockJS server (the `sockjs` npm package) for tests/test_sockjs_e2e.py.
//
//   node server.js --port PORT --name NAME [--port-file FILE]
//
// --port 0 (the default) binds a port the OS picks; --port-file then tells it: the file
// gets "127.0.0.1:PORT\n" once the server listens (written whole, through a rename), as
// `cluster serve --port-file` and the Python test apps write it.
//
// Prefix /sockjs. Every message is echoed back as "NAME|message", so the client can tell
// which server holds its session. GET /name answers NAME as plain text (how the test
// learns a server's name without a session). Every request is logged on stdout.

const fs = require('fs');
const http = require('http');
const sockjs = require('sockjs');

function arg(name, fallback) {
  const at = process.argv.indexOf('--' + name);
  return at >= 0 && at + 1 < process.argv.length ? process.argv[at + 1] : fallback;
}

const port = Number(arg('port', '0'));
const name = arg('name', 'sockjs');
const portFile = arg('port-file', null);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error('usage: node server.js --port PORT --name NAME [--port-file FILE]');
  process.exit(2);
}

const echo = sockjs.createServer({
  prefix: '/sockjs',
  // sockjs-client's own URL is irrelevant here: the node client never loads the iframe.
  sockjs_url: 'http://127.0.0.1/unused-sockjs-client.js',
  log: (severity, line) => console.log(`[${name}] ${severity} ${line}`),
});

echo.on('connection', (conn) => {
  console.log(`[${name}] open ${conn.id} via ${conn.protocol}`);
  conn.on('data', (message) => conn.write(`${name}|${message}`));
  conn.on('close', () => console.log(`[${name}] close ${conn.id}`));
});

const server = http.createServer((req, res) => {
  // Only requests outside /sockjs get here: installHandlers answers the others.
  if (req.url === '/name') {
    res.writeHead(200, { 'Content-Type': 'text/plain' });
    res.end(name);
    return;
  }
  res.writeHead(404, { 'Content-Type': 'text/plain' });
  res.end('not found\n');
});
echo.installHandlers(server);

server.listen(port, '127.0.0.1', () => {
  const bound = server.address().port;
  if (portFile) {
    const tmp = `${portFile}.${process.pid}.tmp`;
    fs.writeFileSync(tmp, `127.0.0.1:${bound}\n`);
    fs.renameSync(tmp, portFile);
  }
  console.log(`[${name}] listening on 127.0.0.1:${bound}`);
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    console.log(`[${name}] ${sig}: stopping`);
    server.close();
    process.exit(0);
  });
}
