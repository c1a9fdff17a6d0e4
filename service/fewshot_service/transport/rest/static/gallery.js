// fewshot playground: each class as a gallery of its real examples (the server's stored copies).
//
// An <img src> cannot send the API key, so each image is fetched with the Authorization header
// and shown from a blob: URL. Images load only when their tile scrolls near the viewport
// (IntersectionObserver), a few at a time, and a class first shows its flagged examples and a
// screenful of the rest: a class of 1,000 examples never asks for 1,000 images at once.
"use strict";

const Gallery = (() => {
  const THUMB_SIZE = 160; // px asked of the server (?size=): tiles are 80 CSS px, sharp at 2x
  const FIRST_TILES = 24; // tiles a class shows before "Show all"
  const MAX_IN_FLIGHT = 4; // image requests at once, over every class
  const MAX_CACHED = 600; // blob URLs kept for re-renders (each class list refresh re-renders)
  // "Low consistency": under the class's median by more than LOW_Z robust standard deviations
  // (1.4826 x the median absolute deviation: one odd shot does not widen it, as it would a plain
  // standard deviation) and by at least LOW_MARGIN (a tight class's tiny spread is no finding).
  const LOW_Z = 3;
  const LOW_MARGIN = 0.02;
  const MIN_SCORED = 5; // scored examples a class needs before "low" means anything

  const cache = new Map(); // namespace \0 label \0 id -> blob URL, or "" for "no stored image"
  const queue = []; // tiles waiting for a request slot
  const inView = new WeakSet(); // tiles near the viewport now (one scrolled past is skipped)
  let inFlight = 0;
  let ctx = null; // { state, run, banner, onChange, classPath }

  const observer =
    "IntersectionObserver" in window
      ? new IntersectionObserver(
          (entries) => {
            for (const entry of entries) {
              if (entry.isIntersecting) {
                inView.add(entry.target);
                if (!queue.includes(entry.target)) enqueue(entry.target);
              } else {
                inView.delete(entry.target); // still observed: queued again when back in view
              }
            }
          },
          { rootMargin: "200px" }
        )
      : null;

  function cacheKey(label, id) {
    return `${ctx.state.namespace}\u0000${label}\u0000${id}`;
  }

  function remember(key, url) {
    cache.set(key, url);
    while (cache.size > MAX_CACHED) {
      const [oldest, oldUrl] = cache.entries().next().value;
      cache.delete(oldest);
      if (oldUrl) URL.revokeObjectURL(oldUrl);
    }
  }

  // Forget every image (another namespace or key: ids there name other images).
  function forget() {
    for (const url of cache.values()) if (url) URL.revokeObjectURL(url);
    cache.clear();
    queue.length = 0;
  }

  function enqueue(tile) {
    queue.push(tile);
    pump();
  }

  function pump() {
    while (inFlight < MAX_IN_FLIGHT && queue.length) {
      const tile = queue.shift();
      if (!tile.isConnected) continue; // re-rendered away before its turn
      if (observer) {
        if (!inView.has(tile)) continue; // scrolled past before its turn
        observer.unobserve(tile);
      }
      inFlight += 1;
      load(tile).finally(() => {
        inFlight -= 1;
        pump();
      });
    }
  }

  async function load(tile) {
    const { label, exampleId } = tile.dataset;
    const key = cacheKey(label, exampleId);
    if (cache.has(key)) return show(tile, cache.get(key));
    const query = new URLSearchParams({ size: String(THUMB_SIZE) });
    if (ctx.state.namespace) query.set("namespace", ctx.state.namespace);
    const headers = ctx.state.apiKey ? { Authorization: `Bearer ${ctx.state.apiKey}` } : {};
    const path = `${ctx.classPath(label)}/examples/${encodeURIComponent(exampleId)}/image`;
    try {
      const response = await fetch(`../v1/${path}?${query}`, { headers });
      if (response.status === 429 && observer) {
        // The key's rate limit: ask again after Retry-After, if the tile is still in view then.
        const wait = Math.min(30, Number(response.headers.get("Retry-After")) || 1);
        setTimeout(() => tile.isConnected && observer.observe(tile), wait * 1000);
        return;
      }
      if (response.status === 404) {
        remember(key, ""); // stored without an image (--no-store-images)
        return show(tile, "");
      }
      if (!response.ok) return show(tile, null);
      const url = URL.createObjectURL(await response.blob());
      remember(key, url);
      show(tile, url);
    } catch (_) {
      show(tile, null); // offline or refused: the tile keeps its id
    }
  }

  function show(tile, url) {
    const holder = tile.querySelector(".picture");
    if (url) {
      const img = document.createElement("img");
      img.src = url;
      img.alt = `example ${tile.dataset.exampleId}`;
      holder.replaceChildren(img);
      tile.classList.remove("no-image", "loading");
    } else {
      tile.classList.remove("loading");
      tile.classList.add("no-image");
      holder.textContent = tile.dataset.exampleId.slice(0, 8);
      if (url === "") tile.title = `${tile.title}\nno stored image (added with --no-store-images)`;
    }
  }

  function medianOf(values) {
    const sorted = [...values].sort((a, b) => a - b);
    const middle = sorted.length >> 1;
    return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
  }

  // The flags of each example, from GET /v1/classes/{label}'s `examples`.
  function flagsOf(info) {
    const scores = (info.examples || []).map((q) => q.consistency).filter((c) => typeof c === "number");
    let lowBelow = -Infinity;
    if (scores.length >= MIN_SCORED) {
      const median = medianOf(scores);
      const spread = 1.4826 * medianOf(scores.map((c) => Math.abs(c - median)));
      lowBelow = median - Math.max(LOW_Z * spread, LOW_MARGIN);
    }
    const flags = new Map();
    for (const q of info.examples || []) {
      const list = [];
      if (q.likely_mislabel) list.push({ kind: "mislabel", text: `closer to "${q.nearest_other_label}"` });
      if (q.near_duplicate_of) list.push({ kind: "duplicate", text: `duplicate of #${q.near_duplicate_of}` });
      if (typeof q.consistency === "number" && q.consistency < lowBelow && !q.likely_mislabel) {
        list.push({ kind: "low", text: "low consistency" });
      }
      flags.set(q.example_id, { list, quality: q });
    }
    return flags;
  }

  function tile(label, id, flagged) {
    const element = document.createElement("div");
    element.className = "thumb gallery-tile loading";
    element.dataset.label = label;
    element.dataset.exampleId = id;
    const q = flagged && flagged.quality;
    const details = [`example ${id}`];
    if (q && typeof q.consistency === "number") details.push(`consistency ${q.consistency.toFixed(3)}`);
    if (q && q.nearest_other_label) {
      details.push(`nearest other class "${q.nearest_other_label}" (${q.nearest_other_score.toFixed(3)})`);
    }
    element.title = details.join("\n");
    const picture = document.createElement("div");
    picture.className = "picture";
    element.append(picture);
    if (flagged && flagged.list.length) {
      element.classList.add("flagged");
      const badges = document.createElement("div");
      badges.className = "flags";
      for (const flag of flagged.list) {
        const badge = document.createElement("span");
        badge.className = `flag flag-${flag.kind}`;
        badge.dataset.flag = flag.kind;
        badge.textContent = flag.text;
        badges.append(badge);
      }
      element.append(badges);
    }
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.title = "Delete this example";
    remove.setAttribute("aria-label", `Delete example ${id}`);
    remove.textContent = "×";
    remove.addEventListener("click", () => ctx.run(() => deleteExample(label, id)));
    element.append(remove);
    if (observer) observer.observe(element);
    else enqueue(element);
    return element;
  }

  async function deleteExample(label, id) {
    // Asked: one stray tap must not lose a shot.
    if (!confirm(`Delete example ${id.slice(0, 8)} of class "${label}"?`)) return;
    const result = await ctx.api("DELETE", `${ctx.classPath(label)}/examples/${encodeURIComponent(id)}`);
    const key = cacheKey(label, id);
    if (cache.get(key)) URL.revokeObjectURL(cache.get(key));
    cache.delete(key);
    ctx.banner(result.class_deleted ? `Deleted the last example: class "${label}" is gone.` : "Example deleted.");
    await ctx.onChange();
  }

  // The gallery of one class (`info`: GET /v1/classes/{label}): flagged examples first.
  function render(info, context) {
    ctx = context;
    const flags = flagsOf(info);
    const isFlagged = (id) => (flags.get(id) ? flags.get(id).list.length > 0 : false);
    const ordered = [...info.example_ids.filter(isFlagged), ...info.example_ids.filter((id) => !isFlagged(id))];
    const grid = document.createElement("div");
    grid.className = "thumbs gallery";
    const shown = Math.min(ordered.length, FIRST_TILES);
    for (const id of ordered.slice(0, shown)) grid.append(tile(info.label, id, flags.get(id)));
    const wrapper = document.createElement("div");
    wrapper.className = "gallery-wrap";
    wrapper.append(grid);
    if (ordered.length > shown) {
      const all = document.createElement("button");
      all.type = "button";
      all.className = "small show-all";
      all.textContent = `Show all ${ordered.length} examples`;
      all.addEventListener("click", () => {
        for (const id of ordered.slice(shown)) grid.append(tile(info.label, id, flags.get(id)));
        all.remove();
      });
      wrapper.append(all);
    }
    return wrapper;
  }

  return { render, forget, THUMB_SIZE, FIRST_TILES };
})();
