// The demo page: one request per picture (output=json gives the label map, the classes and
// their shares at once); the overlay and the opacity slider are drawn here, on a canvas, so
// moving the slider never costs the server another inference.
"use strict";

const KEY_STORAGE = "fcn.apiKey";
const $ = (id) => document.getElementById(id);

const state = {
  model: null,       // the chosen model, as GET /v1/models describes it
  models: [],        // every served model
  file: null,        // the last picture, segmented again when another model is chosen
  photo: null,       // ImageBitmap of the picture as the browser decoded it (null if it can't)
  labels: null,      // ImageBitmap of the colour label map (palette PNG from the server)
  controller: null,  // AbortController of the request in flight
};

// ---- API key --------------------------------------------------------------------------------

function apiKey() {
  try { return localStorage.getItem(KEY_STORAGE) || ""; } catch { return ""; }
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// ---- messages -------------------------------------------------------------------------------

function setState(name) { document.body.dataset.state = name; }
function status(text) { $("status").textContent = text; }

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = false;
  $("result").hidden = true;  // an older picture's result under a new error would mislead
  setState("error");
  status("");
}

function clearError() { $("error").hidden = true; $("error").textContent = ""; }

// FastAPI answers {"detail": "text"} or, for validation errors, {"detail": [{loc, msg}, ...]}.
function detailText(body) {
  if (!body || body.detail === undefined) return "";
  const d = body.detail;
  if (typeof d === "string") return d;
  if (Array.isArray(d)) {
    return d.map((e) => (e.loc ? `${e.loc.join(".")}: ${e.msg}` : e.msg || JSON.stringify(e))).join("; ");
  }
  return JSON.stringify(d);
}

// What the user should read for each error status: what happened, then the server's words.
function errorMessage(status, detail, retryAfter) {
  const headline = {
    400: "The server could not read this file as an image",
    401: apiKey()
      ? 'The server did not accept the API key; check it under "API key"'
      : 'This server needs an API key: enter it under "API key"',
    413: "The image is too large",
    415: "That file is not an image the server accepts",
    422: "The image could not be used",
    503: `The server is busy; try again ${retryAfter ? `in ${retryAfter} s` : "in a moment"}`,
    504: "The server took too long to answer; try again, or use a smaller image",
  }[status] || `The server answered ${status}`;
  return detail ? `${headline} (${detail}).` : `${headline}.`;
}

// ---- Server-Timing --------------------------------------------------------------------------

// What each Server-Timing entry of the service measures, in the order a request meets them.
const STAGES = {
  read: "upload read",
  decode: "decode",
  queue: "queue (batching)",
  inference: "inference",
  encode: "encode",
  total: "server total",
};

// "queue;dur=1.2, inference;dur=75.3, encode;dur=3" -> [{name, dur, desc}]
function parseServerTiming(header) {
  if (!header) return [];
  return header.split(",").map((entry) => {
    const [name, ...params] = entry.trim().split(";");
    const metric = { name: name.trim(), dur: null, desc: "" };
    for (const p of params) {
      const [k, v = ""] = p.trim().split("=");
      const value = v.replace(/^"|"$/g, "");
      if (k === "dur") metric.dur = Number(value);
      if (k === "desc") metric.desc = value;
    }
    return metric;
  }).filter((m) => m.name);
}

function showTiming(metrics, roundTripMs, requestId) {
  const dl = $("timing");
  dl.replaceChildren();
  const add = (label, value, id) => {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = label;
    dd.textContent = value;
    if (id) dd.dataset.metric = id;
    dl.append(dt, dd);
  };
  for (const m of metrics) {
    if (m.dur !== null && Number.isFinite(m.dur)) add(STAGES[m.name] || m.desc || m.name, `${m.dur.toFixed(1)} ms`, m.name);
  }
  add("round trip", `${roundTripMs.toFixed(0)} ms`, "round-trip");  // as this browser saw it
  $("request-id").textContent = requestId ? `request id ${requestId}` : "";
}

// ---- model description ----------------------------------------------------------------------

async function loadModel() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: authHeaders() });
  } catch (err) {
    $("model-info").textContent = `Could not reach the server (${err.message}).`;
    return;
  }
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    $("model-info").textContent = errorMessage(response.status, detailText(body), response.headers.get("Retry-After"));
    if (response.status === 401) $("key-box").open = true;
    return;
  }
  const listing = await response.json();
  state.models = listing.models;
  const picker = $("model-picker");
  const chosen = (state.model && state.model.name) || listing.default;
  picker.replaceChildren(...state.models.map((m) => {
    const option = document.createElement("option");
    option.value = m.name;
    option.textContent = `${m.name} (${m.num_classes} classes)`;
    return option;
  }));
  picker.value = state.models.some((m) => m.name === chosen) ? chosen : listing.default;
  chooseModel(picker.value);
}

function chooseModel(name) {
  state.model = state.models.find((m) => m.name === name) || null;
  $("model-info").textContent = state.model ? describeModel(state.model) : "";
}

function describeModel(m) {
  const parts = [m.arch, m.backbone].filter(Boolean);
  parts.push(`${m.num_classes} classes${m.dataset ? ` (${m.dataset})` : ""}`);
  const miu = m.metrics && m.metrics.mean_iu;
  if (typeof miu === "number") parts.push(`mean IU ${(100 * miu).toFixed(1)} %${m.metrics_split ? ` on ${m.metrics_split}` : ""}`);
  if (m.device) parts.push(`served on ${m.device}`);
  return parts.join(" · ");
}

function classColour(index) {
  const palette = (state.model && state.model.palette) || [];
  const rgb = palette[index] || [0, 0, 0];
  return `rgb(${rgb[0]}, ${rgb[1]}, ${rgb[2]})`;
}

// ---- segmenting -----------------------------------------------------------------------------

async function segment(file) {
  if (!file) return;
  state.file = file;
  if (state.controller) state.controller.abort();
  const controller = new AbortController();
  state.controller = controller;
  clearError();
  setState("busy");
  status(`Segmenting ${file.name}…`);

  const form = new FormData();
  form.append("image", file, file.name);
  const started = performance.now();
  let response;
  try {
    const model = state.model ? `&model=${encodeURIComponent(state.model.name)}` : "";
    response = await fetch(`/segment?output=json${model}`, {
      method: "POST", body: form, headers: authHeaders(), signal: controller.signal,
    });
  } catch (err) {
    if (err.name === "AbortError") return;
    showError(`Could not reach the server (${err.message}).`);
    return;
  }
  const roundTrip = performance.now() - started;
  const body = await response.json().catch(() => null);
  if (controller !== state.controller) return;  // a newer picture replaced this one
  if (!response.ok) {
    showError(errorMessage(response.status, detailText(body), response.headers.get("Retry-After")));
    return;
  }
  if (!body) {
    showError("The server's answer was not JSON.");
    return;
  }

  try {
    state.labels = await decodeBase64Png(body.labels_png_base64);
  } catch (err) {
    showError(`The label map could not be decoded (${err.message}).`);
    return;
  }
  try {
    state.photo = await createImageBitmap(file, { imageOrientation: "from-image" });
  } catch {
    state.photo = null;  // the server reads formats this browser can't: show the label map alone
  }
  if (controller !== state.controller) return;
  state.controller = null;

  showLegend(body);
  showTiming(parseServerTiming(response.headers.get("Server-Timing")), roundTrip, response.headers.get("X-Request-ID"));
  $("caption").textContent = `${file.name} · ${body.width}×${body.height}` +
    (state.photo ? "" : " · this browser cannot display the picture itself, so only the label map is shown");
  $("result").hidden = false;
  draw();
  status("");
  setState("done");
}

async function decodeBase64Png(b64) {
  if (typeof b64 !== "string") throw new Error("no label map in the answer");
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return createImageBitmap(new Blob([bytes], { type: "image/png" }));
}

// A class that is present never reads "0.0 %".
function shareText(fraction) {
  return fraction > 0 && fraction < 0.0005 ? "< 0.1 %" : `${(100 * fraction).toFixed(1)} %`;
}

function showLegend(body) {
  const tbody = $("legend").querySelector("tbody");
  tbody.replaceChildren();
  for (const c of body.classes) {  // the server lists them most pixels first
    const tr = document.createElement("tr");
    tr.dataset.classIndex = c.index;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.backgroundColor = classColour(c.index);
    const cells = [swatch, c.name, shareText(c.fraction), c.pixels.toLocaleString("en")];
    cells.forEach((content, i) => {
      const td = document.createElement("td");
      if (i >= 2) td.className = "num";
      td.append(content);
      tr.append(td);
    });
    tbody.append(tr);
  }
}

// The overlay is the picture with the colour label map drawn over it at the chosen opacity:
// out = (1 - alpha) * photo + alpha * colour, the same blend the server's output=overlay makes.
function draw() {
  if (!state.labels) return;
  const canvas = $("canvas");
  const { width, height } = state.labels;
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const view = document.querySelector('input[name="view"]:checked').value;
  const alpha = Number($("alpha").value);
  ctx.globalAlpha = 1;
  ctx.imageSmoothingEnabled = false;
  if (view === "overlay" && state.photo) {
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(state.photo, 0, 0, width, height);
    ctx.imageSmoothingEnabled = false;
    ctx.globalAlpha = alpha;
  }
  ctx.drawImage(state.labels, 0, 0);
  ctx.globalAlpha = 1;
  canvas.dataset.view = view === "overlay" && state.photo ? "overlay" : "labels";
  const link = $("download");
  link.href = canvas.toDataURL("image/png");
  link.download = `segmentation-${canvas.dataset.view}.png`;
  link.hidden = false;
}

function syncAlpha() {
  $("alpha-value").textContent = Number($("alpha").value).toFixed(2);
  $("alpha").disabled = document.querySelector('input[name="view"]:checked').value !== "overlay";
}

// ---- wiring ---------------------------------------------------------------------------------

function firstImage(items) {
  for (const f of items || []) if (f) return f;
  return null;
}

function wire() {
  const drop = $("drop");
  const input = $("file");
  input.addEventListener("change", () => {
    segment(firstImage(input.files));
    input.value = "";  // choosing the same file again must segment it again
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  // Dropping anywhere on the page counts (the zone's drop bubbles up to here): a file dropped
  // outside the zone would otherwise make the browser navigate away to it.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => { e.preventDefault(); segment(firstImage(e.dataTransfer.files)); });
  window.addEventListener("paste", (e) => {
    const file = firstImage([...(e.clipboardData ? e.clipboardData.files : [])]);
    if (file) segment(file);
  });

  $("model-picker").addEventListener("change", (e) => {
    chooseModel(e.target.value);
    if (state.file) segment(state.file);  // the same picture, by the model just chosen
  });
  $("alpha").addEventListener("input", () => { syncAlpha(); draw(); });
  for (const radio of document.querySelectorAll('input[name="view"]')) {
    radio.addEventListener("change", () => { syncAlpha(); draw(); });
  }

  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    try { localStorage.setItem(KEY_STORAGE, $("api-key").value.trim()); } catch { /* private mode */ }
    status("API key saved in this browser.");
    loadModel();
  });
  $("key-forget").addEventListener("click", () => {
    try { localStorage.removeItem(KEY_STORAGE); } catch { /* private mode */ }
    $("api-key").value = "";
    status("API key forgotten.");
    loadModel();
  });
  syncAlpha();
}

wire();
loadModel();
