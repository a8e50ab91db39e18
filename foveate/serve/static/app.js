// The chat page: pick an image and a strategy, ask, and watch the strategy's steps stream in.
// It calls the server's own OpenAI-compatible API (POST /v1/chat/completions, stream: true) and draws the
// trace from the streamed `foveate_step` events: crops with their boxes, heat-maps over the image, tool calls.
// Follow-up questions send the whole conversation, as any OpenAI client would. No build step, no libraries.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#ff2d55", "#34c759", "#0a84ff", "#ff9f0a", "#bf5af2"];
const state = { image: null, imageSent: false, messages: [], busy: false, models: [] };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function imageUrl(ref) {
  return "/v1/foveate/images/" + encodeURIComponent(ref);
}

function setStatus(text) {
  $("status").textContent = text || "";
}

// ---- image choice -------------------------------------------------------------------------------------------
function chooseFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    setStatus(`${file.name} is not an image`);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;
    state.imageSent = false;
    $("preview").src = reader.result;
    $("preview").hidden = false;
    $("drop-hint").hidden = true;
    setStatus(`${file.name}: ask a question about it`);
    $("question").focus();
  };
  reader.onerror = () => setStatus(`cannot read ${file.name}`);
  reader.readAsDataURL(file);
}

$("file").addEventListener("change", (event) => chooseFile(event.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  chooseFile(event.dataTransfer.files[0]);
});
drop.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("file").click(); }
});

// ---- strategies ---------------------------------------------------------------------------------------------
async function loadModels() {
  try {
    const response = await fetch("/v1/models");
    const body = await response.json();
    state.models = body.data || [];
  } catch (error) {
    setStatus(`cannot list strategies: ${error}`);
    return;
  }
  const select = $("model");
  select.replaceChildren(...state.models.map((m) => el("option", { value: m.id, text: m.foveate ? m.foveate.strategy : m.id })));
  const preferred = state.models.find((m) => m.id === "foveate-direct");
  if (preferred) select.value = preferred.id;
  showSummary();
}

function showSummary() {
  const model = state.models.find((m) => m.id === $("model").value);
  $("model-summary").textContent = model && model.foveate ? `${model.foveate.summary} (model: ${model.foveate.backend})` : "";
}
$("model").addEventListener("change", showSummary);

$("new-chat").addEventListener("click", () => {
  state.messages = [];
  state.imageSent = false;
  $("log").replaceChildren();
  setStatus(state.image ? "new chat about the same image" : "");
});

// ---- trace drawing ------------------------------------------------------------------------------------------
function figure(ref, boxes = [], heat = null) {
  const img = el("img", { src: imageUrl(ref), alt: "trace image" });
  const box = el("div", { class: "figure" }, img);
  img.addEventListener("load", () => {
    const width = img.naturalWidth, height = img.naturalHeight;
    if (heat) box.append(heatCanvas(heat));
    if (boxes.length) {
      const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
      svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
      svg.setAttribute("preserveAspectRatio", "none");
      boxes.forEach((b, i) => {
        const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
        rect.setAttribute("x", b[0]); rect.setAttribute("y", b[1]);
        rect.setAttribute("width", b[2] - b[0]); rect.setAttribute("height", b[3] - b[1]);
        rect.setAttribute("fill", "none"); rect.setAttribute("stroke", COLORS[i % COLORS.length]);
        rect.setAttribute("stroke-width", Math.max(2, Math.round(width / 150)));
        svg.append(rect);
      });
      box.append(svg);
    }
  });
  return box;
}

function heatCanvas(values) {
  // values: rows × columns grid over the image; drawn as semi-transparent red, stretched over the image.
  const rows = values.length, cols = rows ? values[0].length : 0;
  const canvas = el("canvas", { width: cols, height: rows });
  const flat = values.flat();
  const low = Math.min(...flat), span = Math.max(...flat) - low || 1;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(cols, rows);
  flat.forEach((v, i) => {
    const t = (v - low) / span;
    pixels.data.set([255, Math.round(80 * (1 - t)), 0, Math.round(200 * t)], i * 4);
  });
  context.putImageData(pixels, 0, 0);
  return canvas;
}

function promptText(prompt) {
  return (prompt || []).map((message) => {
    const content = typeof message.content === "string" ? [{ type: "text", text: message.content }] : message.content || [];
    const text = content.map((p) => (p.type === "text" ? p.text : "[image]")).join(" ");
    return `${message.role}: ${text}`;
  }).join("\n");
}

function plural(count, noun) {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}

function renderStep(step) {
  const label = !step.node || step.node === step.kind ? step.kind : `${step.kind} · ${step.node}`;
  const node = el("div", { class: `step step-${step.kind}` }, el("div", { class: "kind", text: label }));
  if (step.kind === "model_call") {
    node.append(
      el("details", {}, el("summary", { text: "prompt" }), el("pre", { text: promptText(step.prompt) })),
      el("pre", { text: (step.outputs || []).join("\n---\n") }),
      el("div", { class: "meta", text: `${step.prompt_tokens} prompt tokens · ${step.completion_tokens} generated · ${Number(step.latency_s).toFixed(3)} s · ${step.model || ""}` }),
    );
  } else if (step.kind === "crop") {
    node.append(el("div", { class: "figures" }, figure(step.image, [step.box]), figure(step.crop)));
    node.append(el("div", { class: "meta", text: `box ${JSON.stringify(step.box)} ${step.reason || ""}` }));
  } else if (step.kind === "map") {
    node.append(el("div", { class: "figures" }, figure(step.image, [], step.values)));
    node.append(el("div", { class: "meta", text: `${step.map_kind} map · layer ${JSON.stringify(step.layer)}` }));
  } else if (step.kind === "tool_call") {
    const result = step.error ? `error: ${step.error}` : step.result;
    node.append(el("pre", { text: `${step.name}(${JSON.stringify(step.arguments)})\n→ ${result ?? ""}` }));
    if (typeof step.result === "string" && /^sha256:[0-9a-f]{64}$/.test(step.result)) {
      node.append(el("div", { class: "figures" }, figure(step.result)));
    }
  } else if (step.kind === "program") {
    const outcome = step.outcome;
    node.append(el("pre", { text: step.source }));
    if (!outcome) {
      node.append(el("div", { class: "meta", text: "not run (an earlier program answered)" }));
    } else {
      const status = outcome.ok ? `value ${JSON.stringify(outcome.value)}` : `error: ${outcome.error}`;
      node.append(el("div", { class: "meta", text: `${status} · ${outcome.steps} lines · ${outcome.calls} model calls` }));
      const calls = (outcome.log || []).map((e) => `${e.name}(${JSON.stringify(e.args || {})}) → ${JSON.stringify(e.error || e.result)}`);
      if (calls.length) node.append(el("pre", { text: calls.join("\n") }));
      const boxes = (outcome.log || []).flatMap((e) => (e.boxes || []).slice(1));
      if (boxes.length && step.image) node.append(el("div", { class: "figures" }, figure(step.image, boxes)));
    }
  } else if (step.kind === "role") {
    const { kind, node: _node, role, content, ...extra } = step;
    const text = JSON.stringify(content, null, 1) + (Object.keys(extra).length ? `\n${JSON.stringify(extra, null, 1)}` : "");
    node.append(el("div", { class: "meta", text: role }), el("pre", { text }));
  } else if (step.kind === "answer") {
    node.append(el("div", { class: "step-text", text: step.text }));
  } else {
    node.append(el("pre", { text: JSON.stringify(step, null, 1) }));
  }
  return node;
}

// ---- asking -------------------------------------------------------------------------------------------------
function newTurn(question) {
  const answer = el("div", { class: "answer", "data-state": "pending", text: "thinking…" });
  const steps = el("div", { class: "steps" });
  const overview = el("div", { class: "figures overview" });
  const meta = el("div", { class: "meta" });
  const turn = el("article", { class: "turn" }, el("div", { class: "q", text: question }), answer, meta, overview,
    el("details", { open: "" }, el("summary", { text: "trace" }), steps));
  $("log").append(turn);
  turn.scrollIntoView({ block: "end" });
  return { answer, steps, overview, meta };
}

async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function ask(question) {
  const content = [];
  if (!state.imageSent) content.push({ type: "image_url", image_url: { url: state.image } });
  content.push({ type: "text", text: question });
  const messages = [...state.messages, { role: "user", content }];
  const turn = newTurn(question);
  let text = "", trace = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: $("model").value, messages, stream: true }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || `HTTP ${response.status}`);
    }
    for await (const data of sseEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.foveate_step) turn.steps.append(renderStep(chunk.foveate_step));
      if (chunk.foveate_trace) trace = chunk.foveate_trace;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) text += delta.content;
    }
  } catch (error) {
    turn.answer.textContent = `error: ${error.message}`;
    turn.answer.dataset.state = "error";
    return;
  }
  turn.answer.textContent = text;
  turn.answer.dataset.state = "done";
  if (trace) {
    turn.meta.textContent = `${trace.strategy} · ${trace.model} · ${plural(trace.model_calls, "model call")} · ${plural(trace.completion_tokens, "generated token")}`;
    const boxes = trace.steps.filter((s) => s.kind === "crop").map((s) => s.box);
    if (trace.image && boxes.length) turn.overview.append(figure(trace.image, boxes));
  }
  state.messages = [...messages, { role: "assistant", content: text }];
  state.imageSent = true;
}

$("ask-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  if (state.busy || !question) return;
  if (!state.image) { setStatus("pick an image first"); return; }
  state.busy = true;
  $("ask").disabled = true;
  $("question").value = "";
  try {
    await ask(question);
  } finally {
    state.busy = false;
    $("ask").disabled = false;
    $("question").focus();
  }
});

loadModels();
