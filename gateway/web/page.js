// The page of cnnserve: draws digits, sends images to this gateway's routes and shows what
// comes back. Plain script, no framework, no build step. The page's Content-Security-Policy
// runs scripts from this gateway only, so nothing is inline in the HTML: every handler is
// attached here.
"use strict";

// The tab's API key lives in sessionStorage only: it goes when the tab closes, and no other
// tab or later visit sees it.
const KEY_STORAGE = "cnnserve.api-key";
// A model's outputs that are its answers (gateway/outputs.py); every other output its metadata
// lists is a layer whose feature maps the gateway draws.
const ANSWER_OUTPUTS = new Set(["logits", "probabilities", "labels", "scores", "mask", "counts"]);
// The features route's pseudo-layer: the input image split into its colour channels.
const RGB_LAYER = "rgb";
const CLASSIFICATION = "classification";
const SEGMENTATION = "segmentation";

const $ = (id) => document.getElementById(id);

const state = {
  models: new Map(), // name → {versions, task, classes, layers}
  panels: { [CLASSIFICATION]: null, [SEGMENTATION]: null }, // the model each panel sends to
  versions: new Map(), // name → the version chosen for it ("" = the one the gateway picks)
  lastImage: new Map(), // name → the last image sent to it, for the feature maps
  tickets: new Map(), // panel → number of its latest request: older answers are dropped
  nextSeed: 1, // demo scenes in a fixed order, so a reload shows the same scenes again
  listings: 0, // number of the latest model listing
};

// --- calling the gateway ---

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// Fetch `path` and read its body (`as`: "json" or "blob"); the latency covers the whole
// answer, body included. A refusal throws the gateway's own {"error"} message.
async function call(path, as, options = {}) {
  const started = performance.now();
  const reply = await fetch(path, {
    ...options,
    headers: { ...authHeaders(), ...(options.headers || {}) },
  });
  if (!reply.ok) throw new Error(await refusal(reply));
  const body = as === "json" ? await reply.json() : await reply.blob();
  return { body, headers: reply.headers, ms: performance.now() - started };
}

async function refusal(reply) {
  let message = `${reply.status} ${reply.statusText}`;
  try {
    const body = await reply.json();
    if (body.error) message = body.error;
  } catch {
    // not the gateway's JSON error body: the status line says what happened
  }
  if (reply.status === 401) message += " — enter the gateway's API key at the top";
  return message;
}

function postImage(image) {
  return {
    method: "POST",
    body: image,
    headers: { "Content-Type": image.type || "application/octet-stream" },
  };
}

function query(params) {
  const kept = Object.entries(params).filter(([, value]) => value !== "" && value != null);
  return new URLSearchParams(kept).toString();
}

const enc = encodeURIComponent;

// Run one request of `panel`: its status line says what failed; only the latest request's
// answer is shown (`show` is skipped for one overtaken by a newer request).
async function latest(panel, request, show) {
  const ticket = (state.tickets.get(panel) || 0) + 1;
  state.tickets.set(panel, ticket);
  const status = $(`${panel}-status`);
  const section = status.closest("section");
  section.setAttribute("aria-busy", "true");
  try {
    const answer = await request();
    if (state.tickets.get(panel) !== ticket) return;
    status.textContent = "";
    await show(answer);
    section.querySelector(".latency").textContent = `${Math.round(answer.ms)} ms`;
  } catch (error) {
    if (state.tickets.get(panel) === ticket) status.textContent = error.message;
  } finally {
    if (state.tickets.get(panel) === ticket) section.setAttribute("aria-busy", "false");
  }
}

// --- models and versions ---

// The ready models (the repository index, every model control mode answers it) and, from each
// one's metadata, its versions, task, classes and layers.
async function loadModels() {
  // Only the latest listing is shown (the key may change while one is under way).
  const ticket = ++state.listings;
  const status = $("settings-status");
  status.textContent = "";
  let index;
  try {
    index = (
      await call("/v2/repository/index", "json", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ ready: true }),
      })
    ).body;
  } catch (error) {
    if (ticket === state.listings) status.textContent = error.message;
    return;
  }
  // A model unloaded since the index was read is left out; its reason is shown.
  const settled = await Promise.allSettled(
    [...new Set(index.map((row) => row.name))].map((name) => describe(name, "")),
  );
  if (ticket !== state.listings) return;
  const failed = settled.filter((s) => s.status === "rejected").map((s) => s.reason.message);
  status.textContent = failed.join("; ");
  const described = settled.filter((s) => s.status === "fulfilled").map((s) => s.value);
  const names = described.map((model) => model.name);
  state.models = new Map(described.map((model) => [model.name, model]));
  for (const task of [CLASSIFICATION, SEGMENTATION]) {
    const kept = state.models.get(state.panels[task]);
    if (!kept) state.panels[task] = described.find((m) => m.task === task)?.name ?? null;
  }
  const select = $("model-select");
  const chosen = select.value;
  select.replaceChildren(...names.map((name) => new Option(name, name)));
  if (names.includes(chosen)) select.value = chosen;
  else if (state.panels[CLASSIFICATION]) select.value = state.panels[CLASSIFICATION];
  modelChosen();
}

async function describe(name, version) {
  const path = version ? `/v2/models/${enc(name)}/versions/${enc(version)}` : `/v2/models/${enc(name)}`;
  const { body } = await call(path, "json");
  const outputs = new Map(body.outputs.map((o) => [o.name, o]));
  let task = null;
  if (outputs.has("probabilities")) task = CLASSIFICATION;
  else if (outputs.has("mask")) task = SEGMENTATION;
  // [-1, C]: the classes a classifier ranks (all of them go into the chart).
  const classes = outputs.get("probabilities")?.shape[1] ?? 10;
  const layers = body.outputs.map((o) => o.name).filter((n) => !ANSWER_OUTPUTS.has(n));
  // Newest first: the one a request without a version gets.
  const versions = [...body.versions].sort((a, b) => Number(b) - Number(a));
  return { name, versions, task, classes, layers };
}

function modelChosen() {
  const name = $("model-select").value;
  const model = state.models.get(name);
  if (!model) return;
  if (model.task) state.panels[model.task] = name;
  const versions = $("version-select");
  versions.replaceChildren(...model.versions.map((v) => new Option(`v${v}`, v)));
  versions.value = state.versions.get(name) || model.versions[0] || "";
  fillLayers(model);
  showPanelModels();
}

async function versionChosen() {
  const name = $("model-select").value;
  const version = $("version-select").value;
  state.versions.set(name, version);
  // Another version may have other layers.
  try {
    const model = await describe(name, version);
    fillLayers({ ...state.models.get(name), layers: model.layers });
  } catch (error) {
    $("features-status").textContent = error.message;
  }
  showPanelModels();
}

function fillLayers(model) {
  const select = $("layer-select");
  const chosen = select.value;
  const names = [RGB_LAYER, ...model.layers];
  select.replaceChildren(new Option("— choose a layer —", ""), ...names.map((n) => new Option(n, n)));
  if (names.includes(chosen)) select.value = chosen;
  showFeatures();
}

function versionOf(name) {
  return state.versions.get(name) || "";
}

function noModel(task) {
  // Without a model list (a missing key, say) no model is known: the top says why.
  if (!state.models.size) return "No models listed yet: see the message at the top.";
  return `No ${task} model is served.`;
}

function showPanelModels() {
  for (const [task, id] of [[CLASSIFICATION, "convnet-model"], [SEGMENTATION, "fcn-model"]]) {
    const name = state.panels[task];
    // Without a choice, the newest version answers.
    const version = name && (versionOf(name) || state.models.get(name).versions[0]);
    $(id).textContent = name ? `— ${name} v${version}` : "— no model serves this";
  }
}

// --- digits ---

function setUpCanvas() {
  const canvas = $("convnet-canvas");
  const ctx = canvas.getContext("2d");
  const clear = () => {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
  };
  clear();
  // Strokes about as thick, relative to the canvas, as the training digits' are.
  ctx.lineWidth = canvas.width / 12;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.strokeStyle = "#fff";
  let last = null;
  const at = (event) => {
    const box = canvas.getBoundingClientRect();
    return [
      ((event.clientX - box.left) * canvas.width) / box.width,
      ((event.clientY - box.top) * canvas.height) / box.height,
    ];
  };
  const line = (to) => {
    ctx.beginPath();
    ctx.moveTo(...last);
    ctx.lineTo(...to);
    ctx.stroke();
    last = to;
  };
  // Pointer events cover mouse, pen and touch alike.
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    last = at(event);
    line(last); // a tap leaves a dot
  });
  canvas.addEventListener("pointermove", (event) => {
    if (last) line(at(event));
  });
  const finish = () => {
    if (!last) return;
    last = null;
    canvas.toBlob((png) => classify(png), "image/png");
  };
  canvas.addEventListener("pointerup", finish);
  canvas.addEventListener("pointercancel", finish);
  $("convnet-clear").addEventListener("click", () => {
    clear();
    $("convnet-label").textContent = "";
    $("convnet-probs").replaceChildren();
  });
  $("convnet-file").addEventListener("change", async (event) => {
    const [file] = event.target.files;
    if (!file) return;
    // Shown on the canvas, where more strokes can be added to it.
    try {
      const bitmap = await createImageBitmap(file);
      clear();
      ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    } catch {
      // not an image the browser reads: the gateway's answer says why
    }
    classify(file);
  });
}

function classify(image) {
  const name = state.panels[CLASSIFICATION];
  if (!name) {
    $("convnet-status").textContent = noModel("classification");
    return;
  }
  state.lastImage.set(name, image);
  const model = state.models.get(name);
  const params = query({ top_k: model.classes, version: versionOf(name) });
  latest(
    "convnet",
    () => call(`/predict/${enc(name)}?${params}`, "json", postImage(image)),
    ({ body }) => {
      const [prediction] = body.predictions;
      $("convnet-label").textContent = prediction.label;
      drawBars(prediction.top_k, prediction.label);
    },
  );
  refreshFeatures(name);
}

// One bar per class in class order (the answer lists them most probable first).
function drawBars(ranked, best) {
  const rows = [...ranked].sort((a, b) => a.index - b.index).map((entry) => {
    const row = document.createElement("li");
    if (entry.label === best) row.className = "best";
    const label = document.createElement("span");
    label.textContent = entry.label;
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = `${(entry.probability * 100).toFixed(1)}%`;
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${(entry.probability * 100).toFixed(1)} %`;
    row.append(label, bar, value);
    return row;
  });
  $("convnet-probs").replaceChildren(...rows);
}

// --- scenes ---

function setUpScenes() {
  $("fcn-generate").addEventListener("click", async () => {
    const seed = state.nextSeed++;
    try {
      segment((await call(`/demo/scene.png?${query({ seed })}`, "blob")).body);
    } catch (error) {
      $("fcn-status").textContent = error.message;
    }
  });
  $("fcn-file").addEventListener("change", (event) => {
    const [file] = event.target.files;
    if (file) segment(file);
  });
  $("fcn-show-mask").addEventListener("change", (event) => {
    $("fcn-overlay").classList.toggle("hidden", !event.target.checked);
  });
}

function segment(image) {
  const name = state.panels[SEGMENTATION];
  if (!name) {
    $("fcn-status").textContent = noModel("segmentation");
    return;
  }
  state.lastImage.set(name, image);
  const params = query({ format: "png", version: versionOf(name) });
  latest(
    "fcn",
    () => call(`/predict/${enc(name)}?${params}`, "blob", postImage(image)),
    async ({ body, headers }) => {
      await drawOnCanvas($("fcn-image"), image);
      const palette = pngPalette(await body.arrayBuffer());
      const counts = orderedCounts(headers.get("X-Pixel-Counts") || "");
      await drawMask(body, palette);
      showClasses(counts, palette);
    },
  );
  refreshFeatures(name);
}

// Decode with the image's bytes as they are: no colour management, so the mask's colours stay
// the palette's own and can be compared with it.
function bitmapOf(blob) {
  return createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
}

async function drawOnCanvas(canvas, blob) {
  const bitmap = await bitmapOf(blob);
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  canvas.getContext("2d").drawImage(bitmap, 0, 0);
  return canvas;
}

// The mask over the scene, background (class 0) see-through so the scene shows around shapes.
async function drawMask(maskPng, palette) {
  const canvas = await drawOnCanvas($("fcn-overlay"), maskPng);
  const ctx = canvas.getContext("2d");
  const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const [r, g, b] = palette[0] || [0, 0, 0];
  const data = pixels.data;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i] === r && data[i + 1] === g && data[i + 2] === b) data[i + 3] = 0;
  }
  ctx.putImageData(pixels, 0, 0);
}

// The colour of each class index: the mask PNG's palette (its PLTE chunk), so the legend
// shows the colours the gateway painted with.
function pngPalette(buffer) {
  const view = new DataView(buffer);
  let offset = 8; // past the PNG signature
  while (offset + 8 <= view.byteLength) {
    const length = view.getUint32(offset);
    const type = String.fromCharCode(...new Uint8Array(buffer, offset + 4, 4));
    if (type === "PLTE") {
      const bytes = new Uint8Array(buffer, offset + 8, length);
      const colours = [];
      for (let i = 0; i + 2 < length; i += 3) colours.push([bytes[i], bytes[i + 1], bytes[i + 2]]);
      return colours;
    }
    if (type === "IDAT") break; // a palette comes before the image data
    offset += 12 + length; // length, type, data, CRC
  }
  return [];
}

// X-Pixel-Counts is a JSON object, label → pixels, in class order: the order the mask's pixel
// values refer to. JSON.parse would move labels that look like integers ("0", "1", …) to the
// front, so the pairs are read in the order they are written.
function orderedCounts(header) {
  return [...header.matchAll(/("(?:[^"\\]|\\.)*")\s*:\s*(\d+)/g)].map((m) => [
    JSON.parse(m[1]),
    Number(m[2]),
  ]);
}

function swatch(colour, clear) {
  const box = document.createElement("span");
  box.className = clear ? "swatch clear" : "swatch";
  if (!clear) box.style.background = `rgb(${colour.join(",")})`;
  return box;
}

function showClasses(counts, palette) {
  const total = counts.reduce((sum, [, n]) => sum + n, 0) || 1;
  $("fcn-legend").replaceChildren(
    ...counts.map(([label], index) => {
      const item = document.createElement("li");
      // Class 0 is left see-through over the scene (drawMask), and shown so.
      item.append(swatch(palette[index] || [0, 0, 0], index === 0), label);
      return item;
    }),
  );
  const header = document.createElement("tr");
  for (const title of ["class", "pixels", "share"]) {
    const cell = document.createElement("th");
    cell.textContent = title;
    header.append(cell);
  }
  const rows = counts.map(([label, pixels]) => {
    const row = document.createElement("tr");
    const name = document.createElement("th");
    name.textContent = label;
    const count = document.createElement("td");
    count.textContent = String(pixels);
    const share = document.createElement("td");
    share.textContent = `${((100 * pixels) / total).toFixed(1)} %`;
    row.append(name, count, share);
    return row;
  });
  $("fcn-counts").replaceChildren(header, ...rows);
}

// --- feature maps ---

// After an image went to `name`: its feature maps follow, when they are the ones on show.
function refreshFeatures(name) {
  if ($("model-select").value === name && $("layer-select").value) showFeatures();
}

function showFeatures() {
  const name = $("model-select").value;
  const layer = $("layer-select").value;
  const image = state.lastImage.get(name);
  const canvas = $("features-image");
  if (!layer || !image) {
    canvas.width = canvas.height = 1;
    $("features-status").textContent =
      layer && !image ? `Give ${name} an image first: draw a digit or make a scene.` : "";
    return;
  }
  const params = query({ layer, version: versionOf(name) });
  latest(
    "features",
    () => call(`/predict/${enc(name)}/features?${params}`, "blob", postImage(image)),
    async ({ body, headers }) => {
      await drawOnCanvas(canvas, body);
      // Small tiles are enlarged (without smoothing, see the CSS) to a readable size.
      const scale = Math.max(1, Math.min(4, Math.floor(900 / canvas.width)));
      canvas.style.width = `${canvas.width * scale}px`;
      const shape = headers.get("X-Layer-Shape");
      canvas.setAttribute("aria-label", `Feature maps of ${layer}${shape ? ` (C,H,W ${shape})` : ""}`);
    },
  );
}

// --- settings ---

function setUpSettings() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  const keyChanged = () => {
    const value = key.value.trim();
    if (value) sessionStorage.setItem(KEY_STORAGE, value);
    else sessionStorage.removeItem(KEY_STORAGE);
    loadModels();
  };
  key.addEventListener("change", keyChanged);
  // Enter in the key field applies the key (its change event) instead of submitting, which
  // would reload the page.
  $("settings").addEventListener("submit", (event) => event.preventDefault());
  $("model-select").addEventListener("change", modelChosen);
  $("version-select").addEventListener("change", versionChosen);
  $("layer-select").addEventListener("change", showFeatures);
}

setUpSettings();
setUpCanvas();
setUpScenes();
loadModels();
