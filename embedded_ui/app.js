// KoboldLite's browser page: chat and story modes over the server's own APIs.
// Model output is only ever put on the page as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const store = {
  get(key, fallback) {
    try { const v = localStorage.getItem("kl." + key); return v === null ? fallback : JSON.parse(v); }
    catch { return fallback; }
  },
  set(key, value) { localStorage.setItem("kl." + key, JSON.stringify(value)); },
  remove(key) { localStorage.removeItem("kl." + key); },
};

const DEFAULTS = { max_length: 300, temperature: 0.7, top_p: 0.92, top_k: 40, min_p: 0.05, rep_pen: 1.1,
                   seed: -1, stop: "", ban_eos: false };
const state = {
  settings: { ...DEFAULTS, ...store.get("settings", {}) },
  password: store.get("password", ""),
  conversations: store.get("conversations", []),
  currentId: store.get("current", null),
  model: store.get("model", ""),   // the model this browser asks for ("": the server's default)
  nCtx: 0,
  running: null,   // {genkey, controller} of the generation in flight
};

// -- talking to the server ---------------------------------------------------------------

class ServerError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.password) h["Authorization"] = "Bearer " + state.password;
  return h;
}

async function api(path, body, options = {}) {
  let response;
  try {
    response = await fetch(path, { method: body === undefined ? "GET" : "POST", headers: headers(),
                                   body: body === undefined ? undefined : JSON.stringify(body), ...options });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ServerError(0, "The server cannot be reached.");
  }
  if (!response.ok) {
    let message = response.statusText;
    try {
      const data = await response.json();
      message = (data.detail && data.detail.msg) || (data.error && (data.error.message || data.error)) || message;
    } catch { /* keep the status text */ }
    throw new ServerError(response.status, message);
  }
  return response;
}

async function getJSON(path, body) { return (await api(path, body)).json(); }

// Reads a text/event-stream body, calling onData with each `data:` payload.
async function readSSE(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffered.indexOf("\n\n")) >= 0) {
      const event = buffered.slice(0, cut);
      buffered = buffered.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) onData(line.slice(6));
      }
    }
  }
}

function newGenkey() { return "KL" + Math.random().toString(36).slice(2, 10); }

function samplerFields() {
  const s = state.settings;
  const fields = { temperature: +s.temperature, top_p: +s.top_p, top_k: +s.top_k, min_p: +s.min_p,
                   rep_pen: +s.rep_pen, ban_eos_token: !!s.ban_eos };
  if (+s.seed >= 0) fields.seed = +s.seed;
  return fields;
}

function stopStrings() { return state.settings.stop.split("\n").filter((x) => x.length > 0); }

// While a request waits behind others, the check endpoint tells its place in the queue.
function watchQueue(genkey, hasStarted) {
  const timer = setInterval(async () => {
    if (hasStarted()) { clearInterval(timer); return; }
    try {
      const data = await getJSON("/api/extra/generate/check", { genkey });
      const pos = data.results[0].queue_position;
      if (pos && !hasStarted()) setStatus("busy", `Waiting: number ${pos} in the queue`);
    } catch { /* the stream reports errors */ }
  }, 500);
  return () => clearInterval(timer);
}

async function stopGeneration() {
  if (!state.running) return;
  try { await getJSON("/api/extra/abort", { genkey: state.running.genkey }); }
  catch { state.running.controller.abort(); }   // the server is gone: at least stop reading
}

// -- status and notices ----------------------------------------------------------------------

function setStatus(kind, text) {
  $("status-dot").className = "dot " + kind;
  $("status-text").textContent = text;
}

function notice(id, text, isError) {
  const el = $(id);
  el.hidden = !text;
  el.textContent = text || "";
  el.classList.toggle("error", !!isError);
}

function explain(error) {
  if (error.status === 401) { askPassword(true); return "This server needs a password."; }
  if (error.status === 503) return "The server is busy with other users; try again in a moment.";
  if (error.status === 0) return "The server cannot be reached. Is it still running?";
  return error.message;
}

function showStats(usage, tokens, seconds) {
  if (usage && state.nCtx) {
    const used = usage.prompt_tokens + usage.completion_tokens;
    $("context-used").textContent = `Context ${used} / ${state.nCtx}`;
  }
  if (tokens > 1 && seconds > 0) $("speed").textContent = `${(tokens / seconds).toFixed(1)} tokens/s`;
}

// -- conversations ---------------------------------------------------------------------------

function current() {
  let conv = state.conversations.find((c) => c.id === state.currentId);
  if (!conv) {
    conv = { id: Date.now().toString(36), title: "New chat", system: "", messages: [], updated: Date.now() };
    state.conversations.unshift(conv);
    state.currentId = conv.id;
  }
  return conv;
}

function save() {
  store.set("conversations", state.conversations);
  store.set("current", state.currentId);
}

function renderConversationList() {
  const list = $("conversation-list");
  list.replaceChildren();
  for (const conv of state.conversations) {
    const li = document.createElement("li");
    li.className = conv.id === state.currentId ? "active" : "";
    const title = document.createElement("span");
    title.textContent = conv.title;
    const del = document.createElement("button");
    del.textContent = "×";
    del.title = "Delete conversation";
    del.onclick = (e) => {
      e.stopPropagation();
      state.conversations = state.conversations.filter((c) => c.id !== conv.id);
      if (state.currentId === conv.id) state.currentId = state.conversations[0] ? state.conversations[0].id : null;
      save(); renderAll();
    };
    li.append(title, del);
    li.onclick = () => { state.currentId = conv.id; save(); renderAll(); $("sidebar").classList.remove("open"); };
    list.append(li);
  }
}

function messageElement(conv, index) {
  const m = conv.messages[index];
  const el = document.createElement("div");
  el.className = "msg " + m.role;
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = m.content;
  const tools = document.createElement("div");
  tools.className = "tools";
  const button = (label, action) => {
    const b = document.createElement("button");
    b.type = "button"; b.textContent = label; b.onclick = action; tools.append(b);
  };
  button("Edit", () => editMessage(el, conv, index));
  button("Delete", () => { conv.messages.splice(index, 1); save(); renderMessages(); });
  if (m.role === "assistant" && index === conv.messages.length - 1) button("Regenerate", regenerate);
  el.append(text, tools);
  return el;
}

function editMessage(el, conv, index) {
  const box = document.createElement("textarea");
  box.value = conv.messages[index].content;
  const ok = document.createElement("button");
  ok.textContent = "Save"; ok.className = "primary"; ok.type = "button";
  ok.onclick = () => { conv.messages[index].content = box.value; save(); renderMessages(); };
  el.replaceChildren(box, ok);
  box.focus();
}

function renderMessages() {
  const conv = current();
  const box = $("messages");
  box.replaceChildren();
  if (!conv.messages.length) {
    const empty = document.createElement("div");
    empty.className = "empty";
    empty.textContent = "Say something to start.";
    box.append(empty);
  }
  conv.messages.forEach((_, i) => box.append(messageElement(conv, i)));
  box.scrollTop = box.scrollHeight;
  $("system-prompt").value = conv.system || "";
}

function renderAll() { renderConversationList(); renderMessages(); }

function setRunning(running, view) {
  state.running = running;
  const chat = view === "chat";
  $(chat ? "send" : "continue").hidden = !!running;
  $(chat ? "stop" : "story-stop").hidden = !running;
}

// -- chat ----------------------------------------------------------------------------------

async function sendChat(text) {
  const conv = current();
  if (text) {
    conv.messages.push({ role: "user", content: text });
    if (conv.title === "New chat") conv.title = text.slice(0, 40);
  }
  conv.system = $("system-prompt").value;
  conv.updated = Date.now();
  save(); renderAll();
  await streamReply(conv);
}

async function streamReply(conv) {
  const messages = (conv.system ? [{ role: "system", content: conv.system }] : [])
    .concat(conv.messages.map((m) => ({ role: m.role, content: m.content })));
  const reply = { role: "assistant", content: "" };
  conv.messages.push(reply);
  const el = messageElement(conv, conv.messages.length - 1);
  el.classList.add("streaming");
  $("messages").querySelector(".empty")?.remove();
  $("messages").append(el);
  const textEl = el.querySelector(".text");
  const genkey = newGenkey();
  const controller = new AbortController();
  setRunning({ genkey, controller }, "chat");
  notice("notice", "");
  setStatus("busy", "Generating…");
  let first = 0, last = 0, tokens = 0, usage = null;
  const stopWatching = watchQueue(genkey, () => tokens > 0);
  try {
    const response = await api("/v1/chat/completions", {
      ...modelField(), messages, stream: true, stream_options: { include_usage: true }, genkey,
      max_tokens: +state.settings.max_length, stop: stopStrings(), ...samplerFields(),
    }, { signal: controller.signal });
    await readSSE(response, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ServerError(500, chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
      if (piece) {
        last = performance.now();
        if (!tokens) { first = last; setStatus("busy", "Generating…"); }
        tokens += 1;
        reply.content += piece;
        textEl.textContent = reply.content;
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    });
    setStatus("ok", "Ready");
  } catch (e) {
    if (e.name !== "AbortError") { notice("notice", explain(e), true); setStatus("bad", "Error"); }
    if (!reply.content) conv.messages.pop();
  } finally {
    stopWatching();
    setRunning(null, "chat");
    save(); renderMessages();
    showStats(usage, tokens, (last - first) / 1000);
  }
}

async function regenerate() {
  const conv = current();
  if (state.running) return;
  if (conv.messages.length && conv.messages[conv.messages.length - 1].role === "assistant") conv.messages.pop();
  save(); renderMessages();
  await streamReply(conv);
}

// -- story -----------------------------------------------------------------------------------

async function continueStory() {
  const storyEl = $("story");
  const before = storyEl.value;
  store.set("story-undo", before);
  const genkey = newGenkey();
  const controller = new AbortController();
  setRunning({ genkey, controller }, "story");
  notice("story-notice", "");
  setStatus("busy", "Writing…");
  let first = 0, last = 0, tokens = 0;
  const stopWatching = watchQueue(genkey, () => tokens > 0);
  try {
    const s = samplerFields();
    const response = await api("/api/extra/generate/stream", {
      ...modelField(), prompt: before, memory: $("memory").value, max_length: +state.settings.max_length, genkey,
      stop_sequence: stopStrings(), temperature: s.temperature, top_p: s.top_p, top_k: s.top_k, min_p: s.min_p,
      rep_pen: s.rep_pen, sampler_seed: s.seed === undefined ? -1 : s.seed, ban_eos_token: s.ban_eos_token,
    }, { signal: controller.signal });
    await readSSE(response, (data) => {
      const event = JSON.parse(data);
      if (event.token) {
        last = performance.now();
        if (!tokens) { first = last; setStatus("busy", "Writing…"); }
        tokens += 1;
        storyEl.value += event.token;
        storyEl.scrollTop = storyEl.scrollHeight;
      }
    });
    setStatus("ok", "Ready");
  } catch (e) {
    if (e.name !== "AbortError") { notice("story-notice", explain(e), true); setStatus("bad", "Error"); }
  } finally {
    stopWatching();
    setRunning(null, "story");
    store.set("story", storyEl.value);
    showStats(null, tokens, (last - first) / 1000);
  }
}

// -- settings and password -------------------------------------------------------------------

const SETTING_KEYS = Object.keys(DEFAULTS);

function loadSettingsForm() {
  for (const key of SETTING_KEYS) {
    const input = $("s-" + key);
    if (input.type === "checkbox") input.checked = !!state.settings[key];
    else input.value = state.settings[key];
  }
}

function readSettingsForm() {
  for (const key of SETTING_KEYS) {
    const input = $("s-" + key);
    state.settings[key] = input.type === "checkbox" ? input.checked
      : input.tagName === "TEXTAREA" ? input.value : (input.value === "" ? DEFAULTS[key] : +input.value);
  }
  store.set("settings", state.settings);
}

function askPassword(rejected) {
  $("password-error").hidden = !rejected || !state.password;
  if (!$("password-dialog").open) $("password-dialog").showModal();
  $("password").focus();
}

async function connect() {
  setStatus("", "Connecting…");
  try {
    const version = await getJSON("/api/extra/version");
    const [model, ctx] = await Promise.all([getJSON("/api/v1/model"), getJSON("/api/extra/true_max_context_length")]);
    state.nCtx = ctx.value;
    const name = model.result.replace(/^koboldcpp\//, "");
    if (version.protected) {
      // The model name is hidden without the password: try a protected endpoint to know.
      try { await getJSON("/api/extra/tokencount", { prompt: "" }); }
      catch (e) { if (e.status === 401) { setStatus("bad", "Password needed"); askPassword(!!state.password); return; } }
    }
    $("model-name").textContent = name === "protected" ? "Model: (protected)" : "Model: " + name;
    await loadModels();
    setStatus("ok", "Ready");
  } catch (e) {
    setStatus("bad", e.status === 0 ? "Unreachable" : "Error");
    notice("notice", explain(e), true);
  }
}

// -- models --------------------------------------------------------------------------------

function modelField() { return state.model ? { model: state.model } : {}; }

// With several models the footer's name becomes a picker; the pick is this browser's alone and goes with
// each request, so two people on the LAN can use two models.
async function loadModels() {
  const picker = $("model-picker");
  let list;
  try { list = (await getJSON("/v1/models")).data; } catch { return; }
  if (state.model && !list.some((m) => m.id === state.model)) { state.model = ""; store.remove("model"); }
  picker.hidden = list.length < 2;
  $("model-name").hidden = !picker.hidden;
  picker.replaceChildren(...list.map((m, i) => {
    const option = document.createElement("option");
    option.value = i === 0 ? "" : m.id;      // the first listed is the default
    option.textContent = `${m.id} (${m.status ? m.status.value : "loaded"})`;
    return option;
  }));
  picker.value = state.model;
}

function pickModel() {
  state.model = $("model-picker").value;
  if (state.model) store.set("model", state.model); else store.remove("model");
}

// -- wiring ----------------------------------------------------------------------------------

function switchMode(mode) {
  const chat = mode === "chat";
  $("chat-view").hidden = !chat;
  $("story-view").hidden = chat;
  $("mode-chat").classList.toggle("active", chat);
  $("mode-story").classList.toggle("active", !chat);
  $("mode-chat").setAttribute("aria-selected", chat);
  $("mode-story").setAttribute("aria-selected", !chat);
  $("toggle-sidebar").style.visibility = chat ? "" : "hidden";
  store.set("mode", mode);
}

function init() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.running) return;
    $("input").value = "";
    $("input").style.height = "";
    sendChat(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("input").addEventListener("input", () => {
    $("input").style.height = "auto";
    $("input").style.height = $("input").scrollHeight + "px";
  });
  $("stop").onclick = stopGeneration;
  $("story-stop").onclick = stopGeneration;
  $("continue").onclick = () => { if (!state.running) continueStory(); };
  $("story-undo").onclick = () => { $("story").value = store.get("story-undo", $("story").value); };
  $("story").addEventListener("input", () => store.set("story", $("story").value));
  $("memory").addEventListener("input", () => store.set("memory", $("memory").value));
  $("system-prompt").addEventListener("input", () => { current().system = $("system-prompt").value; save(); });
  $("new-chat").onclick = () => { state.currentId = null; current(); save(); renderAll(); };
  $("toggle-sidebar").onclick = () => $("sidebar").classList.toggle("open");
  $("mode-chat").onclick = () => switchMode("chat");
  $("mode-story").onclick = () => switchMode("story");
  $("open-settings").onclick = () => { loadSettingsForm(); $("settings").showModal(); };
  $("model-picker").onchange = pickModel;
  $("model-picker").onfocus = loadModels;     // states change: loaded, unloaded
  $("settings").addEventListener("close", readSettingsForm);
  $("reset-settings").onclick = () => { state.settings = { ...DEFAULTS }; loadSettingsForm(); };
  $("forget-password").onclick = () => { state.password = ""; store.remove("password"); };
  $("password-form").addEventListener("submit", () => {
    state.password = $("password").value;
    store.set("password", state.password);
    connect();
  });
  $("export-chats").onclick = () => {
    const blob = new Blob([JSON.stringify(state.conversations, null, 2)], { type: "application/json" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "koboldlite-conversations.json";
    a.click();
    URL.revokeObjectURL(a.href);
  };
  $("import-chats").onchange = async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    try {
      const imported = JSON.parse(await file.text());
      if (!Array.isArray(imported)) throw new Error("not a list of conversations");
      const known = new Set(state.conversations.map((c) => c.id));
      for (const c of imported) {
        if (c && Array.isArray(c.messages) && !known.has(c.id)) {
          state.conversations.push({ id: String(c.id || Date.now().toString(36) + Math.random()),
                                     title: String(c.title || "Imported chat"), system: String(c.system || ""),
                                     messages: c.messages.filter((m) => m && typeof m.content === "string")
                                       .map((m) => ({ role: m.role === "assistant" ? "assistant" : "user",
                                                      content: m.content })),
                                     updated: Date.now() });
        }
      }
      save(); renderAll();
    } catch (err) { notice("notice", "That file is not a KoboldLite export: " + err.message, true); }
    e.target.value = "";
  };

  $("story").value = store.get("story", "");
  $("memory").value = store.get("memory", "");
  current(); save(); renderAll();
  switchMode(store.get("mode", "chat"));
  connect();
}

init();
