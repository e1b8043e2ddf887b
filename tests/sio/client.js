// node's socket.io-client against a cluster: node client.js URL [polling|default] [COUNT]
// Prints one JSON line: the pids that answered the echoes, the transport at the end,
// and any error. withCredentials: true makes engine.io-client keep cookies in node
// (without it the sticky cookie is dropped and a session's polls scatter).
"use strict";
const { io } = require("socket.io-client");

const [url, mode = "default", countText = "50"] = process.argv.slice(2);
const count = Number(countText);
const options = { withCredentials: true, reconnection: false, timeout: 10000 };
if (mode === "polling") options.transports = ["polling"];

const result = { pids: [], first: null, upgraded: false, transport: null, error: null };
const socket = io(url, options);
const done = (error) => {
  if (error) result.error = String(error && error.message ? error.message : error);
  result.transport = socket.io.engine ? socket.io.engine.transport.name : null;
  socket.close();
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exit(0);
};
const timer = setTimeout(() => done("timed out"), 30000);

// the Manager opens the engine before the socket connects; the upgrade probe follows
socket.io.on("open", () => {
  result.first = socket.io.engine.transport.name;
  socket.io.engine.on("upgrade", () => { result.upgraded = true; });
});
socket.on("connect_error", (err) => { clearTimeout(timer); done(err); });
socket.on("disconnect", (reason) => {
  if (result.pids.length < count) { clearTimeout(timer); done("disconnected: " + reason); }
});
socket.on("connect", async () => {
  try {
    for (let i = 0; i < count; i++) {
      const answer = await socket.timeout(10000).emitWithAck("echo", "m" + i);
      if (answer.data !== "m" + i) throw new Error("wrong echo " + JSON.stringify(answer));
      result.pids.push(answer.pid);
      // leave time for the transport upgrade to happen mid-session
      if (i === 0 && mode !== "polling") await new Promise((r) => setTimeout(r, 300));
    }
    clearTimeout(timer);
    done(null);
  } catch (err) {
    clearTimeout(timer);
    done(err);
  }
});
