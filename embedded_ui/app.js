// KoboldLite's browser page: chat and story modes over the server's own APIs. This file holds the state, the
// server calls, story mode, settings and the wiring; chat.js the chat's messages and replies, render.js the
// rendering of replies (sanitized markdown), tree.js takes and branches. Everything else the page shows of a
// model's output or a user's text goes in as text (textContent), never as HTML.
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
                   seed: -1, stop: "", ban_eos: false, markdown: true, show_thinking: true };
const state = {
  settings: { ...DEFAULTS, ...store.get("settings", {}) },
  password: store.get("password", ""),
  conversations: store.get("conversations", []).map(importedConversation),   // older lists become trees
  currentId: store.get("current", null),
  model: store.get("model", ""),   // the model this browser asks for ("": the server's default)
  nCtx: 0,
  running: null,   // {genkey, controller} of the generation in flight
  modelStates: {},                       // picker value -> "loaded", "unloaded"... as /v1/models last said
  modalities: { vision: false, audio: false },   // what the picked model reads besides text (/props)
  pending: [],     // attachments in the composer, not yet sent: {kind, name, url, format}
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

function showStats(usage, tokensPerSecond) {
  if (usage && state.nCtx) {
    const used = usage.prompt_tokens + usage.completion_tokens;
    $("context-used").textContent = `Context ${used} / ${state.nCtx}`;
  }
  if (tokensPerSecond > 0) $("speed").textContent = `${tokensPerSecond.toFixed(1)} tokens/s`;
}

// -- conversations ---------------------------------------------------------------------------

function current() {
  let conv = state.conversations.find((c) => c.id === state.currentId);
  if (!conv) {
    conv = Tree.blank(Date.now().toString(36), "New chat");
    state.conversations.unshift(conv);
    state.currentId = conv.id;
  }
  return conv;
}

function save() {
  const stored = state.conversations.map(storedConversation);
  try { store.set("conversations", stored); }
  catch {
    // A browser keeps a few MiB for a page: past that, the conversations are kept without their attachments'
    // data (their names stay) rather than not at all. This session still has the data and sends it.
    try { store.set("conversations", stored.map(withoutMediaData)); } catch { /* nothing kept */ }
    notice("notice", "The attachments are too large to keep in this browser: after a reload only their names "
           + "remain.", false);
  }
  store.set("current", state.currentId);
}

function withoutMediaData(conv) {
  const strip = (list) => list.map((m) => m.attachments
    ? { ...m, attachments: m.attachments.map((a) => ({ ...a, url: "" })) } : m);
  return { ...conv, messages: strip(conv.messages), others: strip(conv.others) };
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

function renderAll() { renderConversationList(); renderMessages(); }

function setRunning(running, view) {
  state.running = running;
  const chat = view === "chat";
  $(chat ? "send" : "continue").hidden = !!running;
  $(chat ? "stop" : "story-stop").hidden = !running;
}

// -- attachments: images and audio in chat ---------------------------------------------------

// The server's request body is at most 32 MiB, and base64 makes a file a third larger.
const MAX_ATTACHMENT_BYTES = 24 << 20;
const IMAGE_TYPES = ["image/jpeg", "image/png", "image/gif", "image/bmp", ".jpg", ".jpeg", ".png", ".gif", ".bmp"];
const AUDIO_TYPES = ["audio/wav", "audio/x-wav", "audio/mpeg", "audio/flac", "audio/x-flac", ".wav", ".mp3", ".flac"];
const READABLE = "images: JPEG, PNG, GIF, BMP; audio: WAV, MP3, FLAC";

// A file is known by its first bytes, as the server knows it (koboldlite/media.py): a name or a browser's guess at
// the type can be wrong, and a file the server would refuse is better refused before it is sent.
function sniffMedia(b) {
  const bytes = (at, ...xs) => xs.every((x, i) => b[at + i] === x);
  const ascii = (at, s) => bytes(at, ...[...s].map((c) => c.charCodeAt(0)));
  if (bytes(0, 0xff, 0xd8, 0xff)) return { kind: "image", mime: "image/jpeg" };
  if (bytes(0, 0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a)) return { kind: "image", mime: "image/png" };
  if (ascii(0, "GIF87a") || ascii(0, "GIF89a")) return { kind: "image", mime: "image/gif" };
  if (ascii(0, "BM") && b.length >= 26) return { kind: "image", mime: "image/bmp" };
  if (ascii(0, "RIFF") && ascii(8, "WAVE")) return { kind: "audio", mime: "audio/wav", format: "wav" };
  if (ascii(0, "fLaC")) return { kind: "audio", mime: "audio/flac", format: "flac" };
  if (ascii(0, "ID3") || (b[0] === 0xff && (b[1] & 0xe0) === 0xe0)) {
    return { kind: "audio", mime: "audio/mpeg", format: "mp3" };
  }
  return null;
}

function acceptedKinds() {
  return [state.modalities.vision && "image", state.modalities.audio && "audio"].filter(Boolean);
}

function readDataURL(file, mime) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    // The type in the address is the one the bytes say, not the browser's guess from the name.
    reader.onload = () => resolve(`data:${mime};base64,` + reader.result.slice(reader.result.indexOf(",") + 1));
    reader.onerror = () => reject(new Error(`${file.name}: the browser could not read it`));
    reader.readAsDataURL(file);
  });
}

// An attachment for the composer, or an Error that says why this file is refused.
async function readAttachment(file) {
  const kinds = acceptedKinds();
  if (file.size > MAX_ATTACHMENT_BYTES) throw new Error(`${file.name}: larger than 24 MiB`);
  const found = sniffMedia(new Uint8Array(await file.slice(0, 16).arrayBuffer()));
  if (!found) throw new Error(`${file.name}: not a file this server reads (${READABLE})`);
  if (!kinds.includes(found.kind)) {
    throw new Error(`${file.name}: this model reads ${kinds.map((k) => (k === "image" ? "images" : k)).join(" and ")} `
                    + `only, not ${found.kind === "image" ? "images" : found.kind}`);
  }
  const attachment = { kind: found.kind, name: file.name || found.kind, url: await readDataURL(file, found.mime) };
  if (found.format) attachment.format = found.format;
  return attachment;
}

async function attachFiles(files) {
  if (!acceptedKinds().length) { notice("notice", "This model reads text only: no images or audio.", true); return; }
  const refused = [];
  for (const file of files) {
    try { state.pending.push(await readAttachment(file)); } catch (e) { refused.push(e.message); }
  }
  notice("notice", refused.join("\n"), refused.length > 0);
  renderPending();
}

function renderPending() {
  const box = $("attachments");
  box.replaceChildren(...state.pending.map((a, i) => attachmentElement(a, () => {
    state.pending.splice(i, 1);
    renderPending();
  })));
  box.hidden = !state.pending.length;
}

// A thumbnail or an audio chip; with `remove`, an × that takes it out of the composer. Names are text, never HTML.
function attachmentElement(a, remove) {
  const el = document.createElement("div");
  el.className = "attachment " + a.kind;
  el.title = a.name;
  if (a.kind === "image" && a.url) {
    const img = document.createElement("img");
    img.src = a.url;
    img.alt = a.name;
    el.append(img);
  } else {
    if (a.kind === "audio" && a.url) el.append(playButton(a));
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = a.url ? a.name : a.name + " (not kept)";
    el.append(name);
  }
  if (remove) {
    const x = document.createElement("button");
    x.type = "button"; x.className = "remove"; x.textContent = "×";
    x.title = "Remove"; x.setAttribute("aria-label", "Remove " + a.name);
    x.onclick = remove;
    el.append(x);
  }
  return el;
}

// The page's security policy keeps <audio> from data: addresses, so a clip plays through Web Audio instead.
let playing = null;        // {source, button} of the clip that plays
let audioContext = null;   // made on the first click of a play button (browsers want a click first)

function stopPlaying() {
  if (!playing) return;
  const { source, button } = playing;
  playing = null;
  button.textContent = "▶";
  try { source.stop(); } catch { /* it had ended */ }
}

function playButton(a) {
  const button = document.createElement("button");
  button.type = "button"; button.className = "play"; button.textContent = "▶";
  button.title = "Play"; button.setAttribute("aria-label", "Play " + a.name);
  button.onclick = async () => {
    const wasThis = playing && playing.button === button;
    stopPlaying();
    if (wasThis) return;
    try {
      audioContext = audioContext || new AudioContext();
      const bytes = Uint8Array.from(atob(a.url.slice(a.url.indexOf(",") + 1)), (c) => c.charCodeAt(0));
      const source = audioContext.createBufferSource();
      source.buffer = await audioContext.decodeAudioData(bytes.buffer);
      source.connect(audioContext.destination);
      source.onended = () => { if (playing && playing.source === source) stopPlaying(); };
      playing = { source, button };
      button.textContent = "■";
      source.start();
    } catch { notice("notice", `${a.name}: this browser cannot play it`, true); }
  };
  return button;
}

// The attach button shows only where the model reads images or audio; what the model no longer reads (another
// model picked) leaves the composer.
function showAttachControl() {
  const kinds = acceptedKinds();
  $("attach").hidden = !kinds.length;
  $("attach").title = "Attach " + kinds.map((k) => (k === "image" ? "an image" : "an audio clip")).join(" or ")
    + " (or paste or drop one here)";
  $("attach-file").accept = [...(state.modalities.vision ? IMAGE_TYPES : []),
                             ...(state.modalities.audio ? AUDIO_TYPES : [])].join(",");
  state.pending = state.pending.filter((a) => kinds.includes(a.kind));
  renderPending();
}

// An imported message: a role, its text, and only images and audio as data: addresses (or ones whose data was not
// kept) for attachments.
function importedMessage(m) {
  const out = { role: m.role === "assistant" ? "assistant" : "user", content: m.content };
  const attachments = Array.isArray(m.attachments) ? m.attachments.filter((a) => a
    && (a.kind === "image" || a.kind === "audio") && typeof a.url === "string"
    && (a.url === "" || a.url.startsWith(`data:${a.kind}/`))) : [];
  if (attachments.length) {
    out.attachments = attachments.map((a) => ({ kind: a.kind, name: String(a.name || a.kind), url: a.url,
      ...(a.kind === "audio" ? { format: ["wav", "mp3", "flac"].includes(a.format) ? a.format : "wav" } : {}) }));
  }
  return out;
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
    showStats(null, tokens > 1 && last > first ? (tokens - 1) / ((last - first) / 1000) : 0);
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
    await loadModalities();
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
  state.modelStates = Object.fromEntries(list.map((m, i) => [i === 0 ? "" : m.id,
                                                             m.status ? m.status.value : "loaded"]));
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
  loadModalities();
}

function modelState() { return state.modelStates[state.model]; }

// What the picked model reads besides text, from /props. Asking about a model loads it, so a model that is not
// loaded is not asked about (no attach button until its first reply has loaded it).
async function loadModalities() {
  let modalities = { vision: false, audio: false };
  const known = modelState();
  if (known === undefined || known === "loaded") {
    try {
      const props = await getJSON("/props" + (state.model ? "?model=" + encodeURIComponent(state.model) : ""));
      modalities = props.modalities || modalities;
    } catch { /* an older server, or no password yet: text only */ }
  }
  state.modalities = { vision: !!modalities.vision, audio: !!modalities.audio };
  showAttachControl();
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
    if ((!text && !state.pending.length) || state.running) return;
    $("input").value = "";
    $("input").style.height = "";
    const attachments = state.pending;
    state.pending = [];
    renderPending();
    sendChat(text, attachments);
  });
  $("attach").onclick = () => $("attach-file").click();
  $("attach-file").onchange = async (e) => {
    await attachFiles([...e.target.files]);
    e.target.value = "";     // the same file may be attached again after its removal
  };
  $("input").addEventListener("paste", (e) => {
    const files = [...((e.clipboardData && e.clipboardData.files) || [])];
    if (!files.length) return;      // text pastes as text
    e.preventDefault();
    attachFiles(files);
  });
  // A file dropped anywhere on the chat is attached (the browser would otherwise open it in place of the page).
  $("chat-view").addEventListener("dragover", (e) => {
    if (!e.dataTransfer.types.includes("Files")) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = "copy";    // even for a text-only model: the drop then says why it is not attached
  });
  $("chat-view").addEventListener("drop", (e) => {
    if (!e.dataTransfer.files.length) return;
    e.preventDefault();
    attachFiles([...e.dataTransfer.files]);
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
  $("settings").addEventListener("close", () => { readSettingsForm(); renderMessages(); });
  $("reset-settings").onclick = () => { state.settings = { ...DEFAULTS }; loadSettingsForm(); };
  $("forget-password").onclick = () => { state.password = ""; store.remove("password"); };
  $("password-form").addEventListener("submit", () => {
    state.password = $("password").value;
    store.set("password", state.password);
    connect();
  });
  $("export-chats").onclick = () => {
    const blob = new Blob([JSON.stringify(state.conversations.map(storedConversation), null, 2)],
                          { type: "application/json" });
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
          state.conversations.push({ ...importedConversation(c), updated: Date.now() });
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
