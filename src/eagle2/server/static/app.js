// eagle2 web chat: streams /v1/chat/completions and colours each round's accepted drafts.
// Every text the page shows goes through textContent (never innerHTML): model output is data.
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const els = {
    messages: $("messages"), empty: $("empty"), input: $("input"), form: $("composer"), send: $("send"),
    stop: $("stop"), settings: $("settings"), settingsBtn: $("settings-btn"), system: $("system"),
    temperature: $("temperature"), tempVal: $("temp-val"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
    modelName: $("model-name"), dot: $("status-dot"), announce: $("announce"),
    tps: $("stat-tps"), tau: $("stat-tau"), rounds: $("stat-rounds"), tokens: $("stat-tokens"),
  };
  const store = window.localStorage;
  const SSE_EVENT_END = /\r\n\r\n|\n\n|\r\r/;  // the SSE spec allows all three line endings
  let method = store.getItem("eagle2.method") || "eagle2";
  let history = [];  // [{role, content}] of the chat on screen; "New chat" starts a new array
  let chat = 0;  // which chat is on screen: a reply that ends after "New chat" leaves the new one alone
  let controller = null;
  let maxContext = null;

  // ---- settings ----
  els.apiKey.value = store.getItem("eagle2.apiKey") || "";
  els.system.value = store.getItem("eagle2.system") || "";
  els.maxTokens.value = store.getItem("eagle2.maxTokens") ?? "256";
  els.temperature.value = store.getItem("eagle2.temperature") || "0";
  els.tempVal.textContent = els.temperature.value;
  els.apiKey.addEventListener("change", () => store.setItem("eagle2.apiKey", els.apiKey.value.trim()));
  els.system.addEventListener("change", () => store.setItem("eagle2.system", els.system.value));
  els.maxTokens.addEventListener("change", () => store.setItem("eagle2.maxTokens", els.maxTokens.value));
  els.maxTokens.addEventListener("input", () => els.maxTokens.setCustomValidity(""));
  els.temperature.addEventListener("input", () => {
    els.tempVal.textContent = els.temperature.value;
    store.setItem("eagle2.temperature", els.temperature.value);
  });
  function showSettings(on) {
    els.settings.hidden = !on;
    els.settingsBtn.setAttribute("aria-expanded", on ? "true" : "false");
  }
  els.settingsBtn.addEventListener("click", () => showSettings(els.settings.hidden));
  $("clear-btn").addEventListener("click", () => {
    chat += 1;
    if (controller) controller.abort();
    history = [];
    els.messages.querySelectorAll(".msg").forEach((m) => m.remove());
    els.empty.hidden = false;
    setStats(null);
    els.input.focus();
  });

  // ---- method switch (a radio group: arrow keys move the choice) ----
  const methodButtons = [...document.querySelectorAll("#method-switch button")];
  function setMethod(m) {
    method = m;
    store.setItem("eagle2.method", m);
    methodButtons.forEach((b) => {
      const on = b.dataset.method === m;
      b.classList.toggle("active", on);
      b.setAttribute("aria-checked", on ? "true" : "false");
      b.tabIndex = on ? 0 : -1;
    });
  }
  methodButtons.forEach((b, i) => {
    b.addEventListener("click", () => setMethod(b.dataset.method));
    b.addEventListener("keydown", (e) => {
      const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[e.key];
      if (!step) return;
      e.preventDefault();
      const next = methodButtons[(i + step + methodButtons.length) % methodButtons.length];
      setMethod(next.dataset.method);
      next.focus();
    });
  });
  setMethod(method);

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = els.apiKey.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  // ---- server info ----
  function checkHealth() {
    fetch("/health").then((r) => r.json()).then((h) => {
      els.modelName.textContent = `${h.model} · ${h.device}${h.dtype ? " · " + h.dtype : ""}`;
      els.dot.className = "dot ok";
      maxContext = h.max_context;
      if (h.auth && !els.apiKey.value) showSettings(true);
    }).catch(() => { els.modelName.textContent = "server unreachable"; els.dot.className = "dot err"; });
  }
  checkHealth();

  // ---- stats ----
  function setStats(s) {
    els.tps.textContent = s ? s.tokens_per_s.toFixed(1) : "–";
    els.tau.textContent = s ? s.mean_accept_len.toFixed(2) : "–";
    els.rounds.textContent = s ? String(s.rounds) : "–";
    els.tokens.textContent = s ? String(s.new_tokens) : "–";
  }

  // ---- messages ----
  function addMessage(role, text) {
    els.empty.hidden = true;
    const wrap = document.createElement("div");
    wrap.className = `msg ${role}`;
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    if (text) bubble.textContent = text;
    const meta = document.createElement("div");
    meta.className = "meta";
    wrap.append(bubble, meta);
    els.messages.append(wrap);
    scroll();
    return { wrap, bubble, meta };
  }
  function scroll() { els.messages.scrollTop = els.messages.scrollHeight; }
  function atBottom() {  // the reader is following the reply (not scrolled up to read something)
    const m = els.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 48;
  }
  function note(meta, text) {
    meta.append(document.createTextNode((meta.textContent ? " · " : "") + text));
  }

  function appendRound(bubble, content, ext) {
    const draft = ext && ext.draft_text ? ext.draft_text : "";
    const n = content.startsWith(draft) ? draft.length : 0;
    if (n > 0) {
      const d = document.createElement("span");
      d.className = "draft";
      d.textContent = content.slice(0, n);
      d.title = `${ext.drafted} drafted token${ext.drafted === 1 ? "" : "s"} accepted in round ${ext.rounds}`;
      bubble.append(d);
    }
    if (content.length > n) {
      const b = document.createElement("span");
      b.className = "bonus";
      b.textContent = content.slice(n);
      bubble.append(b);
    }
  }

  function setMeta(meta, s, m) {
    meta.replaceChildren();
    const tag = document.createElement("span");
    tag.className = "tag" + (m === "vanilla" ? " vanilla" : "");
    tag.textContent = m === "vanilla" ? "vanilla" : "EAGLE-2";
    meta.append(tag, document.createTextNode(
      `${s.new_tokens} tokens · ${s.tokens_per_s.toFixed(1)} tok/s · τ ${s.mean_accept_len.toFixed(2)} · ${s.rounds} forwards` +
      (s.cached_prompt_tokens ? ` · ${s.cached_prompt_tokens} prompt tokens cached` : "")));
  }

  function busy(on) {
    els.send.hidden = on;
    els.stop.hidden = !on;
  }

  // ---- one request ----
  function maxTokens() {
    // null: the server's default (512 tokens, or the room left in the context if less); undefined: invalid, nothing is sent
    const raw = els.maxTokens.value.trim();
    if (raw === "") return null;
    const n = Number(raw);
    if (!Number.isInteger(n) || n < 1) {
      showSettings(true);
      els.maxTokens.setCustomValidity("a whole number of tokens, at least 1 (empty: the server's default, 512)");
      els.maxTokens.reportValidity();
      return undefined;
    }
    return maxContext ? Math.min(n, maxContext - 1) : n;
  }

  async function httpError(r) {
    const err = new Error(`HTTP ${r.status}`);
    try {
      const j = await r.json();
      if (j.error) { err.message = j.error.message; err.code = j.error.code; }
    } catch (e) { /* not JSON */ }
    if (err.code === "context_length_exceeded") err.message += " (start a new chat with +, or lower Max tokens)";
    return err;
  }

  async function readStream(r, reply, state) {
    // Streams the reply into reply.bubble; true once the server's [DONE] arrived (the answer is whole).
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buf += decoder.decode(value, { stream: true });
      let m;
      while ((m = SSE_EVENT_END.exec(buf))) {
        const event = buf.slice(0, m.index);
        buf = buf.slice(m.index + m[0].length);
        for (const line of event.split(/\r\n|\n|\r/)) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return true;
          onChunk(JSON.parse(data), reply, state);
        }
      }
    }
  }

  function onChunk(chunk, reply, state) {
    if (chunk.error) throw new Error(chunk.error.message);
    const ch = chunk.choices && chunk.choices[0];
    const content = ch && ch.delta ? ch.delta.content : null;
    if (ch && ch.finish_reason) state.finish = ch.finish_reason;
    if (content) {
      const follow = atBottom();
      appendRound(reply.bubble, content, chunk.eagle2);
      state.answer += content;
      if (follow) scroll();
    }
    if (chunk.eagle2 && typeof chunk.eagle2.tokens_per_s === "number") {
      setStats(chunk.eagle2);
      setMeta(reply.meta, chunk.eagle2, state.method);
    }
  }

  function stopped(convo, user, reply, state, text) {
    if (state.answer) {  // keep what came: the next turn continues from it
      convo.push({ role: "assistant", content: state.answer });
      note(reply.meta, "stopped");
      reply.wrap.dataset.done = "1";
      return;
    }
    convo.pop();  // stopped before a word came back: as if it was never sent
    user.wrap.remove();
    reply.wrap.remove();
    if (!els.input.value) els.input.value = text;
    els.empty.hidden = els.messages.querySelector(".msg") !== null;
  }

  function failed(convo, user, reply, state, text, e) {
    convo.pop();  // the model never answered this message: it is not part of the conversation
    user.wrap.classList.add("unsent");
    const back = !els.input.value;
    if (back) els.input.value = text;
    note(user.meta, back ? "not sent: the text is back in the message box" : "not sent");
    reply.wrap.classList.add("error");
    const line = document.createElement("div");
    line.className = "error-text";
    line.textContent = "Error: " + e.message;
    reply.bubble.append(line);
    reply.meta.replaceChildren();
    if (state.answer) note(reply.meta, "the partial answer above is not kept in the conversation");
    reply.wrap.dataset.done = "error";
    setStats(null);
    els.announce.textContent = "Error: " + e.message;
    checkHealth();  // a network error may mean the server is gone: the dot says so
  }

  async function send(text) {
    const mt = maxTokens();
    if (mt === undefined) return false;
    const convo = history, mine = chat;
    convo.push({ role: "user", content: text });
    const user = addMessage("user", text);
    const reply = addMessage("assistant", "");
    reply.bubble.classList.add("cursor");
    const messages = [];
    if (els.system.value.trim()) messages.push({ role: "system", content: els.system.value.trim() });
    messages.push(...convo);
    const body = {
      model: "eagle2", messages, stream: true, method,
      temperature: parseFloat(els.temperature.value) || 0,
      stream_options: { include_usage: true },
    };
    if (mt) body.max_tokens = mt;
    controller = new AbortController();
    busy(true);
    const state = { answer: "", finish: null, method };
    let focus = els.input;
    try {
      const r = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!r.ok) {
        if (r.status === 401) { showSettings(true); focus = els.apiKey; }
        throw await httpError(r);
      }
      if (!(await readStream(r, reply, state))) throw new Error("the connection closed before the answer was complete");
      convo.push({ role: "assistant", content: state.answer });
      if (state.finish === "length") note(reply.meta, "cut off at Max tokens");
      reply.wrap.dataset.done = "1";
      els.announce.textContent = state.answer;
    } catch (e) {
      if (mine !== chat) return true;  // "New chat" ended it: that chat is gone from the screen
      if (e.name === "AbortError") stopped(convo, user, reply, state, text);
      else failed(convo, user, reply, state, text, e);
    } finally {
      reply.bubble.classList.remove("cursor");
      controller = null;
      busy(false);
      focus.focus();
    }
    return true;
  }

  // ---- composer ----
  function autosize() {
    els.input.style.height = "auto";
    els.input.style.height = Math.min(els.input.scrollHeight, 200) + "px";
  }
  els.input.addEventListener("input", autosize);
  els.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      els.form.requestSubmit();
    }
  });
  els.form.addEventListener("submit", (e) => {
    e.preventDefault();
    const typed = els.input.value;
    if (!typed.trim() || controller) return;
    const text = typed.replace(/^\s*\n/, "").replace(/\s+$/, "");  // blank lines around it go; indentation stays
    els.input.value = "";
    autosize();
    send(text).then((sent) => {
      if (!sent && !els.input.value) { els.input.value = typed; autosize(); }
    });
  });
  els.stop.addEventListener("click", () => { if (controller) controller.abort(); });
})();
