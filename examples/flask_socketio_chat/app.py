"""A Flask-SocketIO chat: every message said is broadcast to everyone connected.

Run: ``cluster serve --service chat --app app:app --bind 127.0.0.1:8000``, then open
http://127.0.0.1:8000/ in two browser tabs.
"""

from __future__ import annotations

from flask import Flask
from flask_socketio import SocketIO, emit

app = Flask(__name__)
# gevent mode: the mode of a gevent server; the WebSocket upgrade is served by
# cluster's front door (environ['wsgi.websocket'], from gevent-websocket).
# For several processes, add message_queue="redis://..." so broadcasts reach the
# clients other processes hold (cluster keeps each *session* in one process; it
# does not carry messages between processes).
socketio = SocketIO(app, async_mode="gevent")

PAGE = """<!doctype html>
<title>cluster chat</title>
<ul id="log"></ul>
<form id="say"><input id="text" autocomplete="off"><button>say</button></form>
<script src="https://cdn.socket.io/4.8.1/socket.io.min.js"></script>
<script>
  const socket = io({ withCredentials: true });
  socket.on("said", (m) => {
    const li = document.createElement("li");
    li.textContent = m.text;
    document.getElementById("log").appendChild(li);
  });
  document.getElementById("say").onsubmit = (e) => {
    e.preventDefault();
    socket.emit("say", document.getElementById("text").value);
    document.getElementById("text").value = "";
  };
</script>
"""


@app.route("/")
def index() -> str:
    return PAGE


@socketio.on("say")
def say(text: object) -> str:
    emit("said", {"text": str(text)[:500]}, broadcast=True)
    return "ok"
