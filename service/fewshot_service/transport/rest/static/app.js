// fewshot playground: plain JS over the public REST API, same-origin relative URLs only.
"use strict";

const API = "../v1/"; // the page lives at /ui/: the API is one level up, whatever the prefix
const KEY_STORE = "fewshot.apiKey"; // sessionStorage: the key is forgotten with the tab
const NS_STORE = "fewshot.namespace";

const $ = (id) => document.getElementById(id);
const state = {
  namespace: localStorage.getItem(NS_STORE) || "",
  apiKey: sessionStorage.getItem(KEY_STORE) || "",
  query: null, // the last classified image (a File): what correct-and-add uploads
  predicted: [], // its predicted labels, best first
};

// --- API calls ---------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.kind = body && body.error;
  }
}

async function api(method, path, { params = {}, files = null } = {}) {
  const query = new URLSearchParams(params);
  if (state.namespace) query.set("namespace", state.namespace);
  const headers = {};
  if (state.apiKey) headers["Authorization"] = `Bearer ${state.apiKey}`;
  let body = null;
  if (files) {
    body = new FormData();
    for (const file of files) body.append("files", file, file.name || "image.png");
  }
  const qs = query.toString();
  const response = await fetch(API + path + (qs ? `?${qs}` : ""), { method, headers, body });
  const json = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, json);
  return json;
}

const classPath = (label) => `classes/${encodeURIComponent(label)}`;

// --- messages ----------------------------------------------------------------------------------

function showError(error) {
  let text = error.message;
  if (error.status === 401) text = `Not signed in (401): enter a valid API key above. ${text}`;
  else if (error.status === 403) text = `Not allowed (403): this key may not do that here. ${text}`;
  else if (error.status) text = `Error ${error.status}: ${text}`;
  banner(text, "error");
}

// One message at a time; `details` (e.g. shot-quality warnings) as a list under it.
// It stays in view while the page scrolls (sticky): on a phone the form that caused it may be
// a screen away. Dismissed with its x, or replaced by the next message.
function banner(text, kind = "info", details = []) {
  const element = $("banner");
  const message = document.createElement("div");
  message.className = "banner-text";
  message.textContent = text;
  if (details.length) {
    const list = document.createElement("ul");
    for (const line of details) {
      const item = document.createElement("li");
      item.textContent = line;
      list.append(item);
    }
    message.append(list);
  }
  const close = document.createElement("button");
  close.type = "button";
  close.className = "banner-close";
  close.title = "Dismiss";
  close.setAttribute("aria-label", "Dismiss");
  close.textContent = "×";
  close.addEventListener("click", () => banner(""));
  element.replaceChildren(message, close);
  element.className = `banner ${kind}`;
  element.hidden = !text;
}

// --- classes -----------------------------------------------------------------------------------

async function addExamples(label, files) {
  if (!label || !files.length) return null;
  const added = await api("POST", `${classPath(label)}/examples`, { files });
  const n = added.added_example_ids.length;
  const where = added.count === n ? `new class "${label}"` : `"${label}" (now ${added.count} examples)`;
  // The server stores a flagged shot all the same: say why it may hurt, so it can be deleted.
  const warnings = (added.warnings || []).map((w) => w.message);
  banner(`Added ${n} example(s) to ${where}.`, warnings.length ? "warn" : "info", warnings);
  await refreshClasses();
  return added;
}

// Classes come a page at a time (GET /v1/classes?limit&cursor&q): a namespace of thousands
// must not cost a request per class before anything shows.
const CLASS_PAGE = 50;
const listing = { cursor: null, query: "", generation: 0, loading: false };

async function refreshClasses() {
  $("namespace-name").textContent = `in namespace "${state.namespace || "default"}"`;
  listing.generation += 1; // pages still on their way for an older list are dropped
  listing.cursor = null;
  listing.query = $("class-search").value.trim();
  listing.loading = false;
  $("classes").replaceChildren();
  await loadClassPage(true);
}

async function loadClassPage(first = false) {
  if (listing.loading || (!first && !listing.cursor)) return;
  const generation = listing.generation;
  listing.loading = true;
  try {
    const params = { limit: CLASS_PAGE };
    if (listing.cursor) params.cursor = listing.cursor;
    if (listing.query) params.q = listing.query;
    const list = await api("GET", "classes", { params });
    const infos = await Promise.all(list.classes.map((summary) => api("GET", classPath(summary.label))));
    if (generation !== listing.generation) return;
    const container = $("classes");
    if (first && !list.classes.length) {
      container.innerHTML = listing.query
        ? '<p class="muted">No class matches.</p>'
        : '<p class="muted">No classes yet.</p>';
    }
    for (const info of infos) container.append(classCard(info));
    listing.cursor = list.next_cursor || null;
    $("more-classes").hidden = !listing.cursor;
  } finally {
    if (generation === listing.generation) listing.loading = false;
  }
}

function watchClassList() {
  let typing = null;
  $("class-search").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => run(refreshClasses), 250);
  });
  $("more-classes").addEventListener("click", () => run(loadClassPage));
  // Scrolling the button into view loads the next page too.
  if ("IntersectionObserver" in window) {
    new IntersectionObserver((entries) => {
      if (entries.some((e) => e.isIntersecting) && !$("more-classes").hidden) run(loadClassPage);
    }).observe($("more-classes"));
  }
}

function classCard(info) {
  const card = document.createElement("div");
  card.className = "class-card";
  card.dataset.label = info.label;
  const head = document.createElement("div");
  head.className = "class-head";
  const title = document.createElement("strong");
  title.className = "class-label";
  title.textContent = info.label;
  title.title = info.label; // cut with an ellipsis when long: the whole label on hover
  const count = document.createElement("span");
  count.className = "count muted";
  count.textContent = `${info.count} example${info.count === 1 ? "" : "s"}`;
  const more = document.createElement("label");
  more.className = "button small";
  more.textContent = "+ add";
  const moreInput = document.createElement("input");
  moreInput.type = "file";
  moreInput.accept = "image/*";
  moreInput.multiple = true;
  moreInput.hidden = true;
  moreInput.addEventListener("change", () => run(() => addExamples(info.label, [...moreInput.files])));
  more.append(moreInput);
  const remove = document.createElement("button");
  remove.className = "small danger delete-class";
  remove.textContent = "Delete class";
  remove.addEventListener("click", () =>
    run(async () => {
      if (!confirm(`Delete class "${info.label}" and its ${info.count} example(s)?`)) return;
      await api("DELETE", classPath(info.label));
      banner(`Deleted class "${info.label}".`);
      await refreshClasses();
    })
  );
  head.append(title, count, more, remove);
  // The examples themselves: gallery.js (the server's stored copies, lazily loaded, flagged).
  card.append(head, Gallery.render(info, { state, api, run, banner, classPath, onChange: refreshClasses }));
  return card;
}

// --- classify ----------------------------------------------------------------------------------

async function classify(file) {
  banner(""); // an "Added ..." message belongs to the previous step
  $("correct-form").hidden = true; // until this image has its answer
  const answer = await api("POST", "classify", { files: [file], params: { top_k: 5 } });
  // `unknown` runs parallel to `results`: one flag per image (calibrated on the namespace's shots).
  const unknown = Boolean(answer.unknown && answer.unknown[0]);
  const unknownProbability = first(answer.unknown_probability);
  renderResults(file, answer.results[0], unknown, unknownProbability);
  state.query = file;
  state.predicted = answer.results[0].map((p) => p.label);
  offerCorrection();
}

// A field per image (a list parallel to results) or a single number: the first image's value.
const first = (value) => (Array.isArray(value) ? value[0] : value);

const percent = (p) => `${(p * 100).toFixed(p < 0.1 ? 1 : 0)}%`;

function renderResults(file, predictions, unknown, unknownProbability) {
  const container = $("results");
  container.replaceChildren();
  const preview = document.createElement("img");
  preview.className = "preview";
  preview.src = URL.createObjectURL(file);
  container.append(preview);
  const list = document.createElement("div");
  list.className = "predictions";
  if (unknown) {
    const unknown = document.createElement("div");
    unknown.className = "unknown";
    unknown.textContent = "unknown: none of the classes";
    list.append(unknown);
  }
  if (unknown) list.classList.add("is-unknown"); // the top bar turns amber: it is probably wrong
  predictions.forEach((prediction, i) => {
    const row = scoreBar(prediction);
    if (i === 0) row.classList.add("top");
    list.append(row);
  });
  if (typeof unknownProbability === "number") list.append(unknownRow(unknownProbability));
  container.append(list);
}

function unknownRow(probability) {
  const row = scoreBar({ label: "unknown (none of these)", score: probability, confidence: probability });
  row.classList.add("unknown-row");
  row.querySelector(".score").remove(); // a probability, not a cosine: one number
  return row;
}

function scoreBar(prediction) {
  const row = document.createElement("div");
  row.className = "prediction";
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = prediction.label;
  label.title = prediction.label;
  const bar = document.createElement("div");
  bar.className = "bar";
  const fill = document.createElement("div");
  fill.className = "fill";
  fill.style.width = `${Math.max(0, Math.min(1, prediction.score)) * 100}%`;
  bar.append(fill);
  // The bar and the score are the cosine similarity; the confidence (a probability) is shown
  // beside it as a percentage, not only in a tooltip.
  const numbers = document.createElement("span");
  numbers.className = "numbers";
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = prediction.score.toFixed(3);
  score.title = "score: cosine similarity to the class";
  numbers.append(score);
  if (typeof prediction.confidence === "number") {
    const confidence = document.createElement("span");
    confidence.className = "confidence";
    confidence.textContent = percent(prediction.confidence);
    confidence.title = "confidence: estimated probability that this is the right class";
    numbers.append(confidence);
  }
  row.append(label, numbers, bar);
  return row;
}

// --- correct-and-add ---------------------------------------------------------------------------

// The last classified image, offered as an example of the predicted class (prefilled), another
// class (suggested from the predictions and the listed classes) or a new one (typed).
function offerCorrection() {
  const known = new Set(state.predicted);
  for (const card of document.querySelectorAll(".class-card")) known.add(card.dataset.label);
  const options = [...known].map((label) => {
    const option = document.createElement("option");
    option.value = label;
    return option;
  });
  $("known-labels").replaceChildren(...options);
  $("correct-label").value = state.predicted[0] || "";
  describeCorrection();
  $("correct-form").hidden = false;
}

function describeCorrection() {
  const label = $("correct-label").value.trim();
  const known = [...$("known-labels").options].some((o) => o.value === label);
  let hint = "";
  if (label && label === state.predicted[0]) hint = "the predicted class: more shots of it";
  else if (known) hint = "an existing class: a correction";
  else if (label) hint = `a new class "${label}", unless one by that name exists`;
  $("correct-hint").textContent = hint;
}

async function addQueryAsExample() {
  const label = $("correct-label").value.trim();
  if (!label || !state.query) return;
  const added = await addExamples(label, [state.query]);
  if (added) $("correct-form").hidden = true; // added once; classify again to add it elsewhere
}

// --- webcam ------------------------------------------------------------------------------------

async function startWebcam() {
  const video = $("webcam");
  video.srcObject = await navigator.mediaDevices.getUserMedia({ video: true });
  video.hidden = false;
  $("snap-button").hidden = false;
}

function snapFrame() {
  const video = $("webcam");
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  canvas.toBlob((blob) => run(() => classify(new File([blob], "webcam.png", { type: "image/png" }))));
}

// --- wiring ------------------------------------------------------------------------------------

async function run(action) {
  try {
    await action();
  } catch (error) {
    showError(error);
  }
}

function dropZone(zone, input, onFiles) {
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    onFiles([...event.dataTransfer.files]);
  });
  input.addEventListener("change", () => onFiles([...input.files]));
}

async function loadInfo() {
  const response = await fetch("../v1/info");
  if (!response.ok) return;
  const info = await response.json();
  const element = $("model-info");
  element.textContent = `model ${info.model_id} (${info.precision}, ${info.embedding_dim}-d, ` +
    `${info.preprocess.input_size}px) · server ${info.version}`;
  if (info.license) element.title = info.license;
}

function init() {
  $("namespace-input").value = state.namespace;
  $("api-key-input").value = state.apiKey;
  $("settings-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.namespace = $("namespace-input").value.trim();
    state.apiKey = $("api-key-input").value.trim();
    localStorage.setItem(NS_STORE, state.namespace);
    if (state.apiKey) sessionStorage.setItem(KEY_STORE, state.apiKey);
    else sessionStorage.removeItem(KEY_STORE);
    banner("");
    Gallery.forget(); // ids of another namespace (or seen with another key) name other images
    $("results").replaceChildren();
    $("correct-form").hidden = true; // the image was classified against the other namespace
    run(refreshClasses);
  });

  let pending = [];
  dropZone($("add-drop"), $("add-files"), (files) => {
    pending = files;
    $("add-count").textContent = `${files.length} image(s) ready`;
  });
  $("add-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const label = $("label-input").value.trim();
    if (!pending.length) return banner("Choose or drop some images first.", "error");
    run(async () => {
      await addExamples(label, pending);
      pending = [];
      $("add-files").value = "";
      $("add-count").textContent = "Drop images or tap to choose";
    });
  });

  dropZone($("classify-drop"), $("classify-files"), (files) => {
    if (files.length) run(() => classify(files[0]));
    $("classify-files").value = ""; // choosing the same file again must classify it again
  });
  document.addEventListener("paste", (event) => {
    const file = [...event.clipboardData.files].find((f) => f.type.startsWith("image/"));
    if (file) run(() => classify(file));
  });
  $("correct-label").addEventListener("input", describeCorrection);
  $("correct-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run(addQueryAsExample);
  });
  $("webcam-button").addEventListener("click", () => run(startWebcam));
  $("snap-button").addEventListener("click", snapFrame);

  watchClassList();
  loadInfo();
  run(refreshClasses);
}

// What add-on scripts (loaded after this one) build on: the API call with the page's key and
// namespace, messages, and the class list to refresh after a change.
window.fewshot = { api, classPath, banner, showError, run, state, refreshClasses };

init();
