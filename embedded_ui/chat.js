// The chat: messages on the page (replies rendered by render.js, thinking folded above them, takes and branches
// from tree.js), the streamed reply, continue, and the conversations' saved and exported form.
// app.js holds the state, the server calls and the wiring; it calls these.
"use strict";

// -- a message on the page -------------------------------------------------------------------

const openThinking = new Set();     // messages whose thinking the user unfolded (kept across re-renders)

function seconds(ms) { return (ms / 1000).toFixed(ms < 10000 ? 1 : 0) + " s"; }

function thinkingSummary(m, streaming) {
  const size = `${m.reasoning.length.toLocaleString()} characters`;
  if (streaming && !m.content) return `Thinking… (${size})`;
  return m.thinkMs ? `Thought for ${seconds(m.thinkMs)} (${size})` : `Thought (${size})`;
}

// The parts of a message element that change while it streams.
function paintMessage(el, m, streaming) {
  const thinking = el.querySelector(".thinking");
  thinking.hidden = !m.reasoning || !state.settings.show_thinking;
  if (m.reasoning) {
    thinking.querySelector("summary").textContent = thinkingSummary(m, streaming);
    thinking.querySelector(".reasoning").textContent = m.reasoning;
  }
  const text = el.querySelector(".text");
  if (m.role === "assistant") renderReply(text, m.content, state.settings.markdown);
  else text.textContent = m.content;
  const progress = el.querySelector(".progress");
  progress.hidden = !m.progress;
  progress.textContent = m.progress ? `reading the prompt: ${m.progress}%` : "";
}

function statsLine(stats) {
  const parts = [stats.tokens === 1 ? "1 token" : `${stats.tokens} tokens`];
  if (stats.tps) parts.push(`${stats.tps.toFixed(1)} tokens/s`);
  if (stats.ttft) parts.push(`first token ${seconds(stats.ttft)}`);
  return parts.join(" · ");
}

function toolButton(box, label, action, className = "") {
  const b = document.createElement("button");
  b.type = "button"; b.textContent = label; b.onclick = action; b.className = className;
  box.append(b);
  return b;
}

// Arrows between a message's siblings: the takes of a reply, the branches of an edited user turn.
function takesControl(conv, m) {
  const sibs = Tree.siblings(conv, m);
  const box = document.createElement("span");
  box.className = "takes";
  if (sibs.length < 2) return box;
  const at = sibs.indexOf(m);
  const kind = m.role === "assistant" ? "take" : "branch";
  const move = (step) => () => { if (!state.running) { Tree.step(conv, m, step); save(); renderMessages(); } };
  toolButton(box, "‹", move(-1), "prev").setAttribute("aria-label", "Previous " + kind);
  const count = document.createElement("span");
  count.className = "count";
  count.textContent = `${at + 1}/${sibs.length}`;
  count.title = `${kind} ${at + 1} of ${sibs.length}`;
  box.append(count);
  toolButton(box, "›", move(+1), "next").setAttribute("aria-label", "Next " + kind);
  box.querySelector(".prev").disabled = at === 0;
  box.querySelector(".next").disabled = at === sibs.length - 1;
  return box;
}

function metaRow(conv, m, isLast) {
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.append(takesControl(conv, m));
  if (m.stats) {
    const stats = document.createElement("span");
    stats.className = "stats";
    stats.textContent = statsLine(m.stats);
    meta.append(stats);
  }
  if (m.stats && m.stats.finish === "length") {
    const cut = document.createElement("span");
    cut.className = "cut";
    cut.textContent = "cut at the length limit";
    meta.append(cut);
    if (isLast) toolButton(meta, "Continue", () => continueReply(conv, m), "continue");
  }
  return meta;
}

function messageElement(conv, m, isLast) {
  const el = document.createElement("div");
  el.className = "msg " + m.role;
  el.dataset.id = m.id;
  const thinking = document.createElement("details");
  thinking.className = "thinking";
  thinking.open = openThinking.has(m.id);
  thinking.ontoggle = () => { if (thinking.open) openThinking.add(m.id); else openThinking.delete(m.id); };
  const reasoning = document.createElement("div");
  reasoning.className = "reasoning";
  thinking.append(document.createElement("summary"), reasoning);
  const progress = document.createElement("div");
  progress.className = "progress";
  const text = document.createElement("div");
  text.className = "text";
  el.append(thinking, progress);
  if (m.attachments && m.attachments.length) {
    const media = document.createElement("div");
    media.className = "attachments";
    media.append(...m.attachments.map((a) => attachmentElement(a)));
    el.append(media);
  }
  const tools = document.createElement("div");
  tools.className = "tools";
  toolButton(tools, "Edit", () => { if (!state.running) editMessage(el, conv, m); });
  toolButton(tools, "Delete", () => { if (!state.running) { Tree.remove(conv, m); save(); renderMessages(); } });
  if (m.role === "assistant") toolButton(tools, "Copy", () => copyText(m.content));
  if (m.role === "assistant" && isLast) toolButton(tools, "Regenerate", regenerate);
  el.append(text, metaRow(conv, m, isLast), tools);
  paintMessage(el, m, false);
  return el;
}

// A user turn's edit is sent as a branch (the turn as it was, and what followed it, stay one arrow away) or saved
// in place; a reply's edit is saved in place.
function editMessage(el, conv, m) {
  const box = document.createElement("textarea");
  box.value = m.content;
  const actions = document.createElement("div");
  actions.className = "edit-actions";
  if (m.role === "user") {
    toolButton(actions, "Send", () => {
      if (state.running) return;
      Tree.add(conv, m.parent, { role: "user", content: box.value, ...(m.attachments ? { attachments: m.attachments } : {}) });
      save(); renderMessages();
      streamReply(conv);
    }, "primary").title = "Send as a new branch: the turn as it was stays one arrow away";
  }
  toolButton(actions, "Save", () => { m.content = box.value; save(); renderMessages(); },
             m.role === "user" ? "" : "primary").title = "Change this message in place";
  toolButton(actions, "Cancel", renderMessages);
  el.replaceChildren(box, actions);
  box.focus();
}

function atBottom(box) { return box.scrollHeight - box.scrollTop - box.clientHeight < 40; }

function renderMessages() {
  const conv = current();
  const box = $("messages");
  const stick = atBottom(box);
  const keep = box.scrollTop;
  box.replaceChildren();
  const path = Tree.path(conv);
  if (!path.length) {
    const empty = document.createElement("div");
    empty.className = "empty";
    empty.textContent = "Say something to start.";
    box.append(empty);
  }
  path.forEach((m, i) => box.append(messageElement(conv, m, i === path.length - 1)));
  box.scrollTop = stick ? box.scrollHeight : keep;
  $("system-prompt").value = conv.system || "";
}

// -- streaming a reply -----------------------------------------------------------------------

// Paints a streaming message at most once a frame, keeping the view at the bottom only when it was there (a user
// who scrolled up to read stays where they are).
function streamingView(conv, m) {
  const el = messageElement(conv, m, true);
  el.classList.add("streaming");
  $("messages").querySelector(".empty")?.remove();
  const existing = $("messages").querySelector(`.msg[data-id="${CSS.escape(m.id)}"]`);
  if (existing) existing.replaceWith(el); else $("messages").append(el);
  $("messages").scrollTop = $("messages").scrollHeight;
  let frame = 0;
  return () => {
    if (frame) return;
    frame = requestAnimationFrame(() => {
      frame = 0;
      const box = $("messages");
      const stick = atBottom(box);
      paintMessage(el, m, true);
      if (stick) box.scrollTop = box.scrollHeight;
    });
  };
}

// Starts a chat generation: the Stop button and the status line follow it.
function startChatRun(statusText) {
  const run = { genkey: newGenkey(), controller: new AbortController() };
  setRunning(run, "chat");
  notice("notice", "");
  setStatus("busy", statusText);
  return run;
}

// What one streamed reply measured: time to its first token, tokens, speed, why it stopped.
class ReplyClock {
  constructor() { this.sent = performance.now(); this.first = 0; this.last = 0; this.tokens = 0; }
  token() {
    this.last = performance.now();
    if (!this.tokens) this.first = this.last;
    this.tokens += 1;
  }
  stats(usage, timings, finish, before) {
    const tokens = (usage ? usage.completion_tokens : this.tokens) + (before ? before.tokens : 0);
    const measured = this.tokens > 1 ? (this.tokens - 1) / ((this.last - this.first) / 1000) : 0;
    const tps = timings && timings.predicted_per_second ? timings.predicted_per_second : measured;
    return { tokens, tps, ttft: before ? before.ttft : (this.first ? this.first - this.sent : 0), finish };
  }
}

function requestMessages(conv, upTo) {
  return (conv.system ? [{ role: "system", content: conv.system }] : [])
    .concat(Tree.lineage(conv, upTo).map((m) => ({ role: m.role, content: messageContent(m) })));
}

async function sendChat(text, attachments = []) {
  const conv = current();
  if (text || attachments.length) {
    const message = { role: "user", content: text };
    if (attachments.length) message.attachments = attachments;
    Tree.add(conv, conv.leaf, message);
    if (conv.title === "New chat") conv.title = (text || attachments[0].name).slice(0, 40);
  }
  conv.system = $("system-prompt").value;
  conv.updated = Date.now();
  save(); renderAll();
  await streamReply(conv);
}

// Streams a new reply after message `parent` (by default the last shown): a new take when there were others.
async function streamReply(conv, parent = conv.leaf) {
  const messages = requestMessages(conv, parent);
  const reply = Tree.add(conv, parent, { role: "assistant", content: "" });
  const paint = streamingView(conv, reply);
  const { genkey, controller } = startChatRun("Generating…");
  const clock = new ReplyClock();
  let usage = null, timings = null, finish = null, thinkStart = 0;
  const stopWatching = watchQueue(genkey, () => clock.tokens > 0 || reply.progress !== undefined);
  try {
    const response = await api("/v1/chat/completions", {
      ...modelField(), messages, stream: true, stream_options: { include_usage: true }, return_progress: true,
      genkey, max_tokens: +state.settings.max_length, stop: stopStrings(), ...samplerFields(),
    }, { signal: controller.signal });
    await readSSE(response, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ServerError(500, chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      if (chunk.timings) timings = chunk.timings;
      if (chunk.prompt_progress && !clock.tokens) {
        const p = chunk.prompt_progress;
        reply.progress = p.total ? Math.floor((100 * p.processed) / p.total) : 0;
        setStatus("busy", `Reading the prompt: ${reply.progress}%`);
        paint();
      }
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      if (choice.finish_reason) finish = choice.finish_reason;
      const delta = choice.delta || {};
      if (!delta.content && !delta.reasoning_content) return;
      if (!clock.tokens) { delete reply.progress; setStatus("busy", "Generating…"); }
      clock.token();
      if (delta.reasoning_content) {
        if (!thinkStart) thinkStart = performance.now();
        reply.reasoning = (reply.reasoning || "") + delta.reasoning_content;
      }
      if (delta.content) {
        if (thinkStart && !reply.thinkMs) reply.thinkMs = performance.now() - thinkStart;
        reply.content += delta.content;
      }
      paint();
    });
    setStatus("ok", "Ready");
  } catch (e) {
    if (e.name !== "AbortError") { notice("notice", explain(e), true); setStatus("bad", "Error"); }
    if (!reply.content && !reply.reasoning) dropReply(conv, reply);
    if (e.status >= 400 && e.status < 500 && !reply.content) takeBackRefusedMedia(conv);
  } finally {
    delete reply.progress;
    if (thinkStart && !reply.thinkMs) reply.thinkMs = performance.now() - thinkStart;
    const stats = clock.stats(usage, timings, finish);
    if (Tree.node(conv, reply.id)) reply.stats = stats;
    stopWatching();
    setRunning(null, "chat");
    save(); renderMessages();
    showStats(usage, stats.tps);
    // A picked model that was not loaded is now: what it reads can be asked without loading it.
    if (modelState() !== "loaded") loadModels().then(loadModalities);
  }
}

function dropReply(conv, reply) {
  conv.nodes = conv.nodes.filter((n) => n !== reply);
  Tree.show(conv, reply.parent);
}

// A reply cut by the length limit goes on where it stopped: the Kobold API's stream, with the conversation
// written in KoboldCpp's instruct placeholders and the reply's turn left open, so the model continues it rather
// than starting a new one. (Attachments of earlier turns are not sent again here.)
async function continueReply(conv, m) {
  if (state.running) return;
  const turns = Tree.lineage(conv, m.id).map((t) => (t.role === "user" ? "{{[INPUT]}}" : "{{[OUTPUT]}}") + t.content);
  const prompt = (conv.system ? "{{[SYSTEM]}}" + conv.system : "") + turns.join("");
  const paint = streamingView(conv, m);
  const { genkey, controller } = startChatRun("Continuing…");
  const clock = new ReplyClock();
  let finish = null;
  const stopWatching = watchQueue(genkey, () => clock.tokens > 0);
  try {
    const s = samplerFields();
    const response = await api("/api/extra/generate/stream", {
      ...modelField(), prompt, max_length: +state.settings.max_length, genkey, stop_sequence: stopStrings(),
      temperature: s.temperature, top_p: s.top_p, top_k: s.top_k, min_p: s.min_p, rep_pen: s.rep_pen,
      sampler_seed: s.seed === undefined ? -1 : s.seed, ban_eos_token: s.ban_eos_token,
    }, { signal: controller.signal });
    await readSSE(response, (data) => {
      const event = JSON.parse(data);
      if (event.finish_reason) finish = event.finish_reason;
      if (!event.token) return;
      clock.token();
      m.content += event.token;
      paint();
    });
    setStatus("ok", "Ready");
  } catch (e) {
    if (e.name !== "AbortError") { notice("notice", explain(e), true); setStatus("bad", "Error"); }
  } finally {
    m.stats = clock.stats(null, null, finish, m.stats);
    stopWatching();
    setRunning(null, "chat");
    save(); renderMessages();
  }
}

// A last turn whose attachment the server refused (a file cut short, too large...) would be refused again with
// every later turn: it goes back to the composer, its attachments with it, to be fixed and sent again.
function takeBackRefusedMedia(conv) {
  const last = Tree.node(conv, conv.leaf);
  if (!last || last.role !== "user" || !last.attachments || state.pending.length || $("input").value) return;
  Tree.remove(conv, last);
  if (!conv.nodes.length) conv.title = "New chat";
  $("input").value = last.content;
  state.pending = last.attachments.filter((a) => a.url);
  renderPending();
}

// A turn with attachments goes as OpenAI content parts, each time the conversation is sent: the server keeps an
// image's encoding, so the same image with each later turn costs little. A file whose data was not kept (too
// large for the browser's storage) is left out.
function messageContent(m) {
  const media = (m.attachments || []).filter((a) => a.url);
  if (!media.length) return m.content;
  const parts = m.content ? [{ type: "text", text: m.content }] : [];
  for (const a of media) {
    parts.push(a.kind === "image" ? { type: "image_url", image_url: { url: a.url } }
      : { type: "input_audio", input_audio: { data: a.url.slice(a.url.indexOf(",") + 1), format: a.format } });
  }
  return parts;
}

// A new take of the last reply; the earlier ones stay, one arrow away.
async function regenerate() {
  const conv = current();
  const last = Tree.node(conv, conv.leaf);
  if (state.running || !last) return;
  await streamReply(conv, last.role === "assistant" ? last.parent : last.id);
}

// -- saved, exported and imported form -------------------------------------------------------

// Saved and exported alike: `messages`, the shown path from the first turn (the older form's list, so readers of
// it still find the conversation as it shows), and `others`, the messages off that path (other takes, other
// branches); each message has its `id` and `parent`.
function storedConversation(conv) {
  const path = Tree.path(conv);
  const shown = new Set(path);
  const { nodes, leaf, ...rest } = conv;
  return { ...rest, messages: path, others: nodes.filter((n) => !shown.has(n)) };
}

// A conversation from storage or from an imported file, taking only what the page knows from each message; a
// list of messages without ids (the older form) is one path.
function importedConversation(c) {
  const conv = Tree.blank(String(c.id || Date.now().toString(36) + Math.random()), String(c.title || "Imported chat"));
  conv.system = String(c.system || "");
  conv.updated = +c.updated || Date.now();
  const valid = (list) => (Array.isArray(list) ? list : []).filter((m) => m && typeof m.content === "string");
  const shown = valid(c.messages);
  const listed = shown.concat(valid(c.others));
  if (!listed.every((n) => typeof n.id === "string")) return Tree.fromList(conv, shown.map(importedMessage));
  const ids = new Set(listed.map((n) => n.id));
  conv.nodes = listed.map((n) => ({ ...importedMessage(n), ...importedExtras(n), id: n.id,
    parent: ids.has(n.parent) ? n.parent : null, ...(ids.has(n.pick) ? { pick: n.pick } : {}) }));
  // Siblings show in the order they were made (ids count up), not in the saved form's order.
  const made = (n) => +n.id.slice(1) || 0;
  conv.nodes.sort((a, b) => made(a) - made(b));
  conv.nextId = Math.max(0, ...conv.nodes.map(made));
  conv.rootPick = ids.has(c.rootPick) ? c.rootPick : null;
  Tree.breakLoops(conv);
  Tree.show(conv, shown.length ? shown[shown.length - 1].id : null);
  return conv;
}

function importedExtras(n) {
  const out = {};
  if (typeof n.reasoning === "string" && n.reasoning) out.reasoning = n.reasoning;
  if (+n.thinkMs > 0) out.thinkMs = +n.thinkMs;
  if (n.stats && typeof n.stats === "object") {
    out.stats = { tokens: +n.stats.tokens || 0, tps: +n.stats.tps || 0, ttft: +n.stats.ttft || 0,
                  finish: typeof n.stats.finish === "string" ? n.stats.finish : null };
  }
  return out;
}
