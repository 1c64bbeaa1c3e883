// The web chat page: talks to this server's /v1/chat/completions with SSE streaming
// (fetch + ReadableStream), keeps the conversation in localStorage, and shows each
// answer's time to first token and tokens/s. Model text is only ever rendered through
// MiaotuiMarkdown (text nodes); nothing here assigns HTML.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const ui = {
    messages: $("messages"), input: $("input"), send: $("send"), stop: $("stop"),
    clear: $("clear"), system: $("system"), temperature: $("temperature"),
    maxTokens: $("max-tokens"), keyBox: $("key-box"), apiKey: $("api-key"),
    status: $("status"), model: $("model"), composer: $("composer"),
  };
  const STORE = "miaotui.chat";
  let history = [];            // [{role, content, stats?, error?}]
  let controller = null;       // the running request's AbortController

  // ---- persistence -----------------------------------------------------------------------
  function load() {
    try {
      const saved = JSON.parse(localStorage.getItem(STORE) || "{}");
      history = Array.isArray(saved.history) ? saved.history : [];
      if (typeof saved.system === "string") ui.system.value = saved.system;
      if (saved.temperature !== undefined) ui.temperature.value = saved.temperature;
      if (saved.maxTokens !== undefined) ui.maxTokens.value = saved.maxTokens;
    } catch (e) {
      history = [];
    }
    ui.apiKey.value = sessionStorage.getItem(STORE + ".key") || "";
    if (ui.apiKey.value) ui.keyBox.classList.remove("hidden");
  }

  function save() {
    localStorage.setItem(STORE, JSON.stringify({
      history, system: ui.system.value, temperature: ui.temperature.value,
      maxTokens: ui.maxTokens.value,
    }));
    sessionStorage.setItem(STORE + ".key", ui.apiKey.value);
  }

  // ---- rendering ---------------------------------------------------------------------------
  function statsText(s) {
    if (!s) return "";
    const parts = [];
    if (s.stopped) parts.push("stopped");
    if (s.ttft !== undefined) parts.push(`TTFT ${Math.round(s.ttft)} ms`);
    if (s.tokens !== undefined) parts.push(`${s.approx ? "~" : ""}${s.tokens} tokens`);
    if (s.tps !== undefined) parts.push(`${s.tps.toFixed(1)} tok/s`);
    if (s.total !== undefined) parts.push(`${(s.total / 1000).toFixed(2)} s`);
    return parts.join(" · ");
  }

  function messageNode(msg) {
    const node = document.createElement("div");
    node.className = "msg " + msg.role;
    const role = document.createElement("div");
    role.className = "role";
    role.textContent = msg.role === "user" ? "You" : "Assistant";
    const body = document.createElement("div");
    body.className = "body";
    const stats = document.createElement("div");
    stats.className = "stats";
    node.append(role, body, stats);
    fill(node, msg);
    return node;
  }

  function fill(node, msg) {
    const body = node.querySelector(".body");
    if (msg.role === "assistant") window.MiaotuiMarkdown.renderInto(body, msg.content);
    else body.textContent = msg.content;
    if (msg.error) {
      const err = document.createElement("p");
      err.className = "error";
      err.textContent = msg.error;
      body.appendChild(err);
    }
    node.querySelector(".stats").textContent = statsText(msg.stats);
  }

  function renderAll() {
    ui.messages.replaceChildren(...history.map(messageNode));
    scroll();
  }

  function scroll() {
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  function setBusy(busy) {
    document.body.dataset.busy = busy ? "1" : "0";
    ui.send.classList.toggle("hidden", busy);
    ui.stop.classList.toggle("hidden", !busy);
    ui.clear.disabled = busy;
  }

  function setStatus(s) {
    ui.status.textContent = s || "";
  }

  // ---- talking to the server ---------------------------------------------------------------
  function headers() {
    const h = {"Content-Type": "application/json"};
    if (ui.apiKey.value) h.Authorization = "Bearer " + ui.apiKey.value;
    return h;
  }

  async function errorOf(resp) {
    let message = `HTTP ${resp.status}`;
    try {
      const body = await resp.json();
      if (body && body.error && body.error.message) message += ": " + body.error.message;
    } catch (e) { /* not JSON */ }
    if (resp.status === 401) {
      ui.keyBox.classList.remove("hidden");
      ui.apiKey.focus();
      message += " (enter the server's API key in the settings)";
    }
    return new Error(message);
  }

  async function fetchModel() {
    try {
      const resp = await fetch("/v1/models", {headers: headers()});
      if (!resp.ok) throw await errorOf(resp);
      const body = await resp.json();
      ui.model.textContent = body.data.map((m) => m.id).join(", ");
      setStatus("");
    } catch (e) {
      ui.model.textContent = "?";
      setStatus(e.message);
    }
  }

  // Yield the parsed JSON of each "data:" event of an SSE response body until [DONE].
  async function* events(resp) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  }

  function number(input, fallback) {
    const v = parseFloat(input.value);
    return Number.isFinite(v) ? v : fallback;
  }

  async function send(text) {
    const user = {role: "user", content: text};
    const answer = {role: "assistant", content: "", stats: {}};
    const context = history.filter((m) => !m.error && m.content);
    history.push(user, answer);
    save();
    ui.messages.append(messageNode(user));
    const node = messageNode(answer);
    node.classList.add("streaming");
    ui.messages.append(node);
    scroll();

    const messages = [];
    if (ui.system.value.trim()) messages.push({role: "system", content: ui.system.value});
    for (const m of context.concat([user])) messages.push({role: m.role, content: m.content});
    const request = {
      messages, stream: true, stream_options: {include_usage: true},
      temperature: number(ui.temperature, 0.7),
      max_tokens: Math.max(1, Math.round(number(ui.maxTokens, 512))),
    };

    controller = new AbortController();
    setBusy(true);
    setStatus("");
    const t0 = performance.now();
    let tFirst, usage, chunks = 0, pending = false;
    const redraw = () => {
      if (pending) return;
      pending = true;
      requestAnimationFrame(() => {
        pending = false;
        fill(node, answer);
        scroll();
      });
    };
    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(request),
        signal: controller.signal,
      });
      if (!resp.ok) throw await errorOf(resp);
      for await (const chunk of events(resp)) {
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          if (tFirst === undefined) {
            tFirst = performance.now();
            answer.stats.ttft = tFirst - t0;
          }
          chunks++;
          answer.content += delta.content;
          redraw();
        }
      }
    } catch (e) {
      if (e.name === "AbortError") answer.stats.stopped = true;
      else answer.error = e.message;
    } finally {
      const tEnd = performance.now();
      const tokens = usage ? usage.completion_tokens : chunks;
      if (tokens) {
        answer.stats.tokens = tokens;
        answer.stats.approx = !usage;
        answer.stats.total = tEnd - t0;
        if (tokens > 1 && tFirst !== undefined && tEnd > tFirst) {
          answer.stats.tps = (tokens - 1) / ((tEnd - tFirst) / 1000);
        }
      }
      controller = null;
      node.classList.remove("streaming");
      fill(node, answer);
      scroll();
      setBusy(false);
      save();
      ui.input.focus();
    }
  }

  // ---- events --------------------------------------------------------------------------------
  ui.composer.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = ui.input.value.trim();
    if (!text || controller) return;
    ui.input.value = "";
    send(text);
  });
  ui.input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      ui.composer.requestSubmit();
    }
  });
  ui.stop.addEventListener("click", () => {
    if (controller) controller.abort();
  });
  ui.clear.addEventListener("click", () => {
    if (controller) return;
    history = [];
    save();
    renderAll();
    setStatus("");
  });
  for (const input of [ui.system, ui.temperature, ui.maxTokens]) input.addEventListener("change", save);
  ui.apiKey.addEventListener("change", () => {
    save();
    fetchModel();
  });

  load();
  renderAll();
  setBusy(false);
  fetchModel();
})();
