// The chat page's script: one WebSocket to /ws on the page's own host, one
// text message per line each way. Every line from the server is shown with
// textContent, never parsed as HTML. No framework, nothing fetched from
// elsewhere (the Content-Security-Policy would refuse it anyway).
"use strict";

(() => {
  const NAME_PROMPT = "Enter your name:";
  const GREETING = "You are ";
  const ARRIVED = " has arrived";
  const LEFT = " has left";
  const PRESENT = /^present \((\d+)\): (.*)$/;
  const KEEP_LINES = 2000;
  const RETRY_FIRST_MS = 500;
  const RETRY_MAX_MS = 15000;

  const byId = (id) => document.getElementById(id);
  const room = byId("room");
  const lines = byId("lines");
  const form = byId("send");
  const input = byId("input");
  const submit = byId("submit");
  const prompt = byId("prompt");
  const status = byId("status");
  const notice = byId("notice");
  const who = byId("who");
  const people = byId("people");

  let settings = { password: false, names: false, present: false, max_line: 4096 };
  let socket = null;
  let retries = 0;
  let retryTimer = null;
  let password = null;
  let name = null;
  let me = null;
  // The server's last `error: ...` line on this connection, kept for the
  // notice shown when the connection then ends (a wrong password).
  let lastError = null;
  // "password" (asking for it), "name" (the server asked for one), "chat".
  let mode = "chat";
  const present = new Set();

  function show(text, kind) {
    const atBottom = room.scrollHeight - room.scrollTop - room.clientHeight < 40;
    const item = document.createElement("li");
    item.textContent = text;
    if (kind) item.className = kind;
    lines.append(item);
    while (lines.childElementCount > KEEP_LINES) lines.firstElementChild.remove();
    if (atBottom) room.scrollTop = room.scrollHeight;
  }

  function say(text) {
    notice.textContent = text || "";
    notice.hidden = !text;
  }

  function setStatus(text, up) {
    status.textContent = text;
    status.classList.toggle("up", !!up);
  }

  function setMode(next) {
    mode = next;
    input.type = next === "password" ? "password" : "text";
    prompt.textContent = next === "password" ? "Password" : next === "name" ? "Your name" : "Message";
    input.placeholder = next === "password" ? "the room's password"
      : next === "name" ? "1-32 characters, no spaces" : "";
    submit.textContent = next === "chat" ? "Send" : "Enter";
    const usable = next === "password" || (socket && socket.readyState === WebSocket.OPEN);
    input.disabled = !usable;
    submit.disabled = !usable;
    if (usable) input.focus();
  }

  function renderPresent() {
    who.hidden = !settings.present;
    const names = [...present].sort();
    people.replaceChildren(...names.map((person) => {
      const item = document.createElement("li");
      item.textContent = person === me ? person + " (you)" : person;
      return item;
    }));
  }

  // Who-is-here, from the present line and the arrivals and departures.
  // Names and addresses hold no space, a chat line always holds ": ".
  function track(line) {
    const listed = PRESENT.exec(line);
    if (listed) {
      present.clear();
      if (listed[1] !== "0") listed[2].split(", ").forEach((person) => present.add(person));
      if (me) present.add(me);
      renderPresent();
      return;
    }
    for (const [suffix, arrived] of [[ARRIVED, true], [LEFT, false]]) {
      if (line.endsWith(suffix)) {
        const person = line.slice(0, -suffix.length);
        if (person && !person.includes(" ")) {
          if (arrived) present.add(person); else present.delete(person);
          renderPresent();
        }
      }
    }
  }

  function received(line) {
    if (line === NAME_PROMPT) {
      show(line, "system");
      if (name) {
        socket.send(name);
      } else {
        setMode("name");
      }
      return;
    }
    if (line.startsWith("error: ")) {
      show(line, "error");
      say(line);
      lastError = line;
      if (line === "error: wrong password") {
        password = null;
      } else if (mode === "name") {
        name = null;
        setMode("name");
      }
      return;
    }
    if (line.startsWith(GREETING) && me === null) {
      me = line.slice(GREETING.length);
      say("");
      setMode("chat");
      if (settings.present) {
        present.clear();
        present.add(me);
        renderPresent();
      }
      show(line, "system");
      return;
    }
    if (settings.present) track(line);
    const mine = me !== null && line.startsWith(me + ": ");
    const system = !line.includes(": ") || PRESENT.test(line);
    show(line, mine ? "mine" : system ? "system" : "");
  }

  // The server may have restarted with other settings (a password now,
  // names off): read them again before each connection.
  async function loadSettings() {
    try {
      const response = await fetch("/settings.json", { cache: "no-store" });
      if (response.ok) settings = await response.json();
    } catch (_) {
      // Unreachable: keep what we had; the connection will fail and retry.
    }
    renderPresent();
  }

  async function reconnect() {
    await loadSettings();
    if (settings.password && password === null) {
      setStatus("not connected");
      setMode("password");
      return;
    }
    connect();
  }

  function connect() {
    clearTimeout(retryTimer);
    me = null;
    lastError = null;
    setStatus("connecting…");
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const ws = new WebSocket(scheme + location.host + "/ws");
    socket = ws;
    ws.onopen = () => {
      retries = 0;
      setStatus("connected", true);
      if (password !== null) ws.send(password);
      setMode(settings.names && !name ? "name" : "chat");
      if (settings.names && !name) input.disabled = submit.disabled = true;
    };
    ws.onmessage = (event) => {
      if (typeof event.data === "string") received(event.data);
    };
    ws.onclose = (event) => {
      if (socket !== ws) return;
      socket = null;
      me = null;
      input.disabled = submit.disabled = true;
      const delay = Math.min(RETRY_MAX_MS, RETRY_FIRST_MS * 2 ** retries) * (0.75 + Math.random() / 2);
      retries += 1;
      const why = event.reason ? ` (${event.reason})` : "";
      if (settings.password && password === null) {
        setStatus("disconnected");
        // The server's own words first: "error: wrong password".
        say(lastError ? `${lastError}. Enter the password again.`
          : `Disconnected${why}. Enter the password to join again.`);
        setMode("password");
        return;
      }
      setStatus("disconnected");
      const told = lastError ? `${lastError}. ` : "";
      say(`${told}Disconnected from the server${why}; reconnecting in ${Math.ceil(delay / 1000)} s…`);
      retryTimer = setTimeout(reconnect, delay);
    };
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value;
    if (mode === "password") {
      if (!text) return;
      password = text;
      input.value = "";
      say("");
      setMode("chat");
      connect();
      return;
    }
    if (!socket || socket.readyState !== WebSocket.OPEN) return;
    if (mode === "name") {
      if (!text) return;
      name = text;
    }
    socket.send(text);
    input.value = "";
  });

  function start() {
    reconnect();
  }

  start();
})();
