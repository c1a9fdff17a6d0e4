// fewshot playground: plain JS over the public REST API, same-origin relative URLs only.
"use strict";

const API = "../v1/"; // the page lives at /ui/: the API is one level up, whatever the prefix
const KEY_STORE = "fewshot.apiKey"; // sessionStorage: the key is forgotten with the tab
const NS_STORE = "fewshot.namespace";
const THUMB_PREFIX = "fewshot.thumb:"; // localStorage: namespace \0 label \0 example id -> data URL
const THUMB_PX = 96;

const $ = (id) => document.getElementById(id);
const state = {
  namespace: localStorage.getItem(NS_STORE) || "",
  apiKey: sessionStorage.getItem(KEY_STORE) || "",
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

function banner(text, kind = "info") {
  const element = $("banner");
  element.textContent = text;
  element.className = `banner ${kind}`;
  element.hidden = !text;
}

// --- thumbnails (client-side only) -------------------------------------------------------------

const thumbKey = (label, id) => `${THUMB_PREFIX}${state.namespace}\u0000${label}\u0000${id}`;

async function thumbnail(file) {
  const bitmap = await createImageBitmap(file);
  const scale = THUMB_PX / Math.max(bitmap.width, bitmap.height);
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/jpeg", 0.8);
}

async function rememberThumbnails(label, ids, files) {
  for (let i = 0; i < ids.length && i < files.length; i++) {
    try {
      localStorage.setItem(thumbKey(label, ids[i]), await thumbnail(files[i]));
    } catch (_) {
      // Not decodable here, or storage full: that example shows its id instead.
    }
  }
}

// --- classes -----------------------------------------------------------------------------------

async function addExamples(label, files) {
  if (!label || !files.length) return;
  const added = await api("POST", `${classPath(label)}/examples`, { files });
  await rememberThumbnails(label, added.added_example_ids, files);
  banner(`Added ${added.added_example_ids.length} example(s) to "${label}".`);
  await refreshClasses();
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
  const thumbs = document.createElement("div");
  thumbs.className = "thumbs";
  for (const id of info.example_ids) thumbs.append(exampleTile(info.label, id));
  card.append(head, thumbs);
  return card;
}

function exampleTile(label, id) {
  const tile = document.createElement("div");
  tile.className = "thumb";
  tile.title = `example ${id}`;
  const cached = localStorage.getItem(thumbKey(label, id));
  if (cached) {
    const img = document.createElement("img");
    img.src = cached;
    img.alt = `example ${id}`;
    tile.append(img);
  } else {
    // Added elsewhere (another browser, the API): the server keeps no image to show.
    tile.classList.add("no-image");
    tile.textContent = id.slice(0, 8);
  }
  const remove = document.createElement("button");
  remove.className = "remove";
  remove.title = "Delete this example";
  remove.textContent = "×";
  remove.addEventListener("click", () =>
    run(async () => {
      // Asked, like deleting a class: one stray click must not lose a shot.
      if (!confirm(`Delete example ${id.slice(0, 8)} of class "${label}"?`)) return;
      const result = await api("DELETE", `${classPath(label)}/examples/${encodeURIComponent(id)}`);
      localStorage.removeItem(thumbKey(label, id));
      banner(result.class_deleted ? `Deleted the last example: class "${label}" is gone.` : "Example deleted.");
      await refreshClasses();
    })
  );
  tile.append(remove);
  return tile;
}

// --- classify ----------------------------------------------------------------------------------

async function classify(file) {
  const answer = await api("POST", "classify", { files: [file], params: { top_k: 5 } });
  // `unknown` and `unknown_probability` run parallel to `results`: one per image.
  const pUnknown = answer.unknown_probability ? answer.unknown_probability[0] : null;
  renderResults(file, answer.results[0], Boolean(answer.unknown && answer.unknown[0]), pUnknown);
}

function renderResults(file, predictions, unknown, pUnknown = null) {
  const container = $("results");
  container.replaceChildren();
  const preview = document.createElement("img");
  preview.className = "preview";
  preview.src = URL.createObjectURL(file);
  container.append(preview);
  const list = document.createElement("div");
  list.className = "predictions";
  // The confidences and P(unknown) are one distribution: together they sum to at most 100%.
  const unknownText = pUnknown === null ? "" : ` (${(pUnknown * 100).toFixed(0)}%)`;
  if (unknown) {
    const unknown = document.createElement("div");
    unknown.className = "unknown";
    unknown.textContent = `unknown: none of the classes${unknownText}`;
    list.append(unknown);
  }
  for (const prediction of predictions) list.append(scoreBar(prediction));
  if (!unknown && pUnknown !== null) {
    const none = document.createElement("div");
    none.className = "muted none-of-these";
    none.textContent = `none of these${unknownText}`;
    list.append(none);
  }
  container.append(list);
}

function scoreBar(prediction) {
  const row = document.createElement("div");
  row.className = "prediction";
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = prediction.label;
  const bar = document.createElement("div");
  bar.className = "bar";
  const fill = document.createElement("div");
  fill.className = "fill";
  fill.style.width = `${Math.max(0, Math.min(1, prediction.score)) * 100}%`;
  bar.append(fill);
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = prediction.score.toFixed(3);
  score.title = "score: cosine similarity to the class";
  if (typeof prediction.confidence === "number") {
    const confidence = document.createElement("span");
    confidence.className = "confidence";
    confidence.textContent = `${(prediction.confidence * 100).toFixed(0)}%`;
    confidence.title = "confidence: the chance this label is right";
    score.append(" · ", confidence);
  }
  row.append(label, bar, score);
  return row;
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
    $("results").replaceChildren();
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
      $("add-count").textContent = "Drop images or click to choose";
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
  $("webcam-button").addEventListener("click", () => run(startWebcam));
  $("snap-button").addEventListener("click", snapFrame);

  watchClassList();
  loadInfo();
  run(refreshClasses);
}

init();
