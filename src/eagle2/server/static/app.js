// eagle2 web chat: streams /v1/chat/completions and colours each round's accepted drafts.
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const els = {
    messages: $("messages"), empty: $("empty"), input: $("input"), form: $("composer"), send: $("send"),
    stop: $("stop"), settings: $("settings"), system: $("system"), temperature: $("temperature"),
    tempVal: $("temp-val"), maxTokens: $("max-tokens"), apiKey: $("api-key"), modelName: $("model-name"),
    dot: $("status-dot"), tps: $("stat-tps"), tau: $("stat-tau"), rounds: $("stat-rounds"), tokens: $("stat-tokens"),
  };
  const store = window.localStorage;
  let method = store.getItem("eagle2.method") || "eagle2";
  let history = [];  // [{role, content}]
  let controller = null;
  let maxContext = null;

  // ---- settings ----
  els.apiKey.value = store.getItem("eagle2.apiKey") || "";
  els.system.value = store.getItem("eagle2.system") || "";
  els.maxTokens.value = store.getItem("eagle2.maxTokens") || "256";
  els.temperature.value = store.getItem("eagle2.temperature") || "0";
  els.tempVal.textContent = els.temperature.value;
  els.apiKey.addEventListener("change", () => store.setItem("eagle2.apiKey", els.apiKey.value.trim()));
  els.system.addEventListener("change", () => store.setItem("eagle2.system", els.system.value));
  els.maxTokens.addEventListener("change", () => store.setItem("eagle2.maxTokens", els.maxTokens.value));
  els.temperature.addEventListener("input", () => {
    els.tempVal.textContent = els.temperature.value;
    store.setItem("eagle2.temperature", els.temperature.value);
  });
  $("settings-btn").addEventListener("click", () => { els.settings.hidden = !els.settings.hidden; });
  $("clear-btn").addEventListener("click", () => {
    if (controller) controller.abort();
    history = [];
    els.messages.querySelectorAll(".msg").forEach((m) => m.remove());
    els.empty.hidden = false;
    setStats(null);
    els.input.focus();
  });

  function setMethod(m) {
    method = m;
    store.setItem("eagle2.method", m);
    document.querySelectorAll("#method-switch button").forEach((b) => {
      const on = b.dataset.method === m;
      b.classList.toggle("active", on);
      b.setAttribute("aria-checked", on ? "true" : "false");
    });
  }
  document.querySelectorAll("#method-switch button").forEach((b) => b.addEventListener("click", () => setMethod(b.dataset.method)));
  setMethod(method);

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = els.apiKey.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  // ---- server info ----
  fetch("/health").then((r) => r.json()).then((h) => {
    els.modelName.textContent = `${h.model} · ${h.device}${h.dtype ? " · " + h.dtype : ""}`;
    els.dot.className = "dot ok";
    maxContext = h.max_context;
    if (h.auth && !els.apiKey.value) els.settings.hidden = false;
  }).catch(() => { els.modelName.textContent = "server unreachable"; els.dot.className = "dot err"; });

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

  async function send(text) {
    history.push({ role: "user", content: text });
    addMessage("user", text);
    const { wrap, bubble, meta } = addMessage("assistant", "");
    bubble.classList.add("cursor");
    const messages = [];
    if (els.system.value.trim()) messages.push({ role: "system", content: els.system.value.trim() });
    messages.push(...history);
    const body = {
      model: "eagle2", messages, stream: true, method,
      temperature: parseFloat(els.temperature.value) || 0,
      stream_options: { include_usage: true },
    };
    const mt = parseInt(els.maxTokens.value, 10);
    if (mt > 0) body.max_tokens = mt;
    controller = new AbortController();
    busy(true);
    let answer = "";
    let last = null;
    const usedMethod = method;
    try {
      const r = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!r.ok) {
        let msg = `HTTP ${r.status}`;
        try { const j = await r.json(); if (j.error) msg = j.error.message; } catch (e) { /* not JSON */ }
        if (r.status === 401) { els.settings.hidden = false; els.apiKey.focus(); }
        throw new Error(msg);
      }
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      let done = false;
      while (!done) {
        const { value, done: end } = await reader.read();
        if (end) break;
        buf += decoder.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const event = buf.slice(0, i);
          buf = buf.slice(i + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") { done = true; break; }
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message);
            const ch = chunk.choices && chunk.choices[0];
            const content = ch && ch.delta ? ch.delta.content : null;
            if (content) {
              appendRound(bubble, content, chunk.eagle2);
              answer += content;
              scroll();
            }
            if (chunk.eagle2 && typeof chunk.eagle2.tokens_per_s === "number") {
              last = chunk.eagle2;
              setStats(last);
              setMeta(meta, last, usedMethod);
            }
          }
        }
      }
      history.push({ role: "assistant", content: answer });
      wrap.dataset.done = "1";
    } catch (e) {
      if (e.name === "AbortError") {
        history.push({ role: "assistant", content: answer });
        meta.append(document.createTextNode(" · stopped"));
        wrap.dataset.done = "1";
      } else {
        history.pop();
        wrap.classList.add("error");
        bubble.textContent = "Error: " + e.message;
        wrap.dataset.done = "error";
      }
    } finally {
      bubble.classList.remove("cursor");
      controller = null;
      busy(false);
      els.input.focus();
    }
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
    const text = els.input.value.trim();
    if (!text || controller) return;
    els.input.value = "";
    autosize();
    send(text);
  });
  els.stop.addEventListener("click", () => { if (controller) controller.abort(); });
})();
