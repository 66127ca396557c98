// The chat room: the room's last messages on join (history), who is there
// (presence, then join/leave), messages the broker checks against a JSON
// Schema, a private inbox only its owner may read (the ACL's {sub}), and a
// JWT from /login that the client refreshes before it expires.
//
//   ?broker=ws://127.0.0.1:8765/ws   the broker (default: that one)
//   ?room=lobby                      the room (default lobby)

const params = new URLSearchParams(location.search);
const brokerUrl = params.get("broker") || "ws://127.0.0.1:8765/ws";
const room = params.get("room") || "lobby";
const topic = `chat.room.${room}`;

const script = new URL("/client.js", brokerUrl.replace(/^ws/, "http"));
const { connect } = await import(script.href);

const $ = (id) => document.getElementById(id);
// What the page shows, kept for the tests too.
const state = (window.chat = { me: null, messages: [], members: new Map(), inbox: [], errors: [], ready: false });

async function login(name) {
  const response = await fetch("/login", { method: "POST", body: JSON.stringify({ name }) });
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
  return answer.token;
}

function item(list, cls, parts) {
  const li = document.createElement("li");
  if (cls) li.className = cls;
  for (const [kind, text] of parts) {
    const span = document.createElement("span");
    if (kind) span.className = kind;
    span.textContent = text;
    li.append(span);
  }
  list.append(li);
  list.scrollTop = list.scrollHeight;
}

function showMessage(m) {
  state.messages.push(m.data);
  const time = m.data.at ? new Date(m.data.at).toLocaleTimeString() : "";
  item($("messages"), "", [["from", m.data.from], ["", m.data.text], ["time", time]]);
}

function notice(text) {
  item($("messages"), "notice", [["", text]]);
}

function showMembers() {
  const names = [...state.members.keys()].sort();
  $("members").replaceChildren(
    ...names.map((n) => {
      const li = document.createElement("li");
      li.textContent = n === state.me ? `${n} (you)` : n;
      return li;
    }),
  );
  $("count").textContent = `(${names.length})`;
}

async function start(name) {
  state.me = name;
  sessionStorage.setItem("chat-name", name);
  // Called before every connection and before the token expires.
  const client = await connect(brokerUrl, { getToken: () => login(name) });
  window.client = client;
  $("login").hidden = true;
  $("chat").hidden = false;
  $("me").textContent = name;
  $("room-name").textContent = `#${room}`;
  const status = $("status");
  const live = () => {
    status.textContent = "live";
    status.className = "pill live";
  };
  live();
  client.on("connected", live);
  client.on("disconnected", ({ code, reason, reconnecting }) => {
    status.textContent = reconnecting ? "reconnecting…" : `closed (${code} ${reason})`;
    status.className = "pill down";
  });
  client.on("error", (error) => state.errors.push(error.message));

  // The room: its last 50 messages, then live ones, and join/leave.
  await client.subscribe(topic, { history: 50, presence: true }, async (m) => {
    if (m.type === "message") showMessage(m);
    else if (m.type === "join") {
      state.members.set(m.member.subject, m.member);
      if (state.ready && m.member.subject !== name) notice(`${m.member.subject} joined`);
      showMembers();
    } else if (m.type === "leave") {
      state.members.delete(m.member.subject);
      notice(`${m.member.subject} left`);
      showMembers();
    } else if (m.type === "resync") {
      notice("some messages may have been missed while reconnecting");
    }
  });
  for (const member of (await client.presence(topic)).members || []) {
    state.members.set(member.subject, member);
  }
  showMembers();

  // My inbox: only I may read it (the ACL allows chat.user.{sub}.inbox).
  await client.subscribe(`chat.user.${name}.inbox`, { history: 20 }, (m) => {
    if (m.type !== "message") return;
    state.inbox.push(m.data);
    item($("inbox"), "", [["from", m.data.from], ["", m.data.text]]);
  });
  state.ready = true;
}

async function send(text) {
  $("send-error").textContent = "";
  const client = window.client;
  const direct = /^\/msg\s+(\S+)\s+(.*)$/s.exec(text);
  try {
    if (direct) {
      await client.publish(`chat.user.${direct[1]}.inbox`, { from: state.me, text: direct[2] });
      notice(`(to ${direct[1]}) ${direct[2]}`);
    } else {
      await client.publish(topic, { from: state.me, text });
    }
    $("text").value = "";
  } catch (error) {
    // e.g. invalid: "$.text: must be longer than or equal to 1 characters"
    const reason = error.serverMessage || error.message;
    state.errors.push(reason);
    $("send-error").textContent = `not sent: ${reason}`;
  }
}

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    await start($("name").value);
  } catch (error) {
    $("login-error").textContent = error.message;
  }
});
$("send").addEventListener("submit", (event) => {
  event.preventDefault();
  send($("text").value);
});
