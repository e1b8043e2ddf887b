// temporary experiment (not committed): N clients, reconnecting, log events
"use strict";
const { io } = require("socket.io-client");
const [url, mode, countText, seconds] = process.argv.slice(2);
const sockets = [];
const stats = [];
for (let n = 0; n < Number(countText); n++) {
  const options = { withCredentials: true, reconnectionDelay: 200, reconnectionDelayMax: 500 };
  if (mode === "websocket") options.transports = ["websocket"];
  const s = io(url, options);
  const st = { n, connects: 0, disconnects: [], homes: [] };
  stats.push(st);
  s.on("connect", async () => {
    st.connects++;
    try { const a = await s.timeout(5000).emitWithAck("echo", "x"); st.homes.push(a.name + "/" + a.transport); } catch (e) { st.homes.push("err " + e); }
  });
  s.on("disconnect", (r) => st.disconnects.push(r));
  sockets.push(s);
}
setInterval(async () => {
  for (let i = 0; i < sockets.length; i++) {
    const s = sockets[i];
    if (s.connected) { try { const a = await s.timeout(3000).emitWithAck("echo", "y"); const h = a.name + "/" + a.transport; if (stats[i].homes[stats[i].homes.length-1] !== h) stats[i].homes.push(h);} catch (e) {} }
  }
}, 1000);
setTimeout(() => { process.stdout.write(JSON.stringify(stats) + "\n"); process.exit(0); }, Number(seconds) * 1000);
