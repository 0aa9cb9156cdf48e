// The search page: plain JS, no build step. Talks to the same API that /docs describes.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  dropzone: $("dropzone"), fileInput: $("file-input"), empty: $("dropzone-empty"),
  query: $("query"), queryImage: $("query-image"), queryCaption: $("query-caption"),
  limit: $("limit"), filter: $("filter"), threshold: $("threshold"), thresholdOut: $("threshold-out"),
  crop: $("crop"), cropOption: $("crop-option"), queryFrame: $("query-frame"),
  timing: $("timing"), title: $("results-title"), sub: $("results-sub"), error: $("error"),
  results: $("results"), more: $("more"), stats: $("stats"), template: $("card-template"),
  keyDialog: $("key-dialog"), keyInput: $("key-input"), keyForm: $("key-form"), keyCancel: $("key-cancel"),
};

const state = {
  query: null,        // {kind: "upload", file, name} or {kind: "similar", id}
  offset: 0,
  nextOffset: null,
  apiKey: sessionStorage.getItem("imgsearch-api-key") || "",
  objectUrls: [],
  seq: 0,             // ignores answers to searches that were superseded
};

// ---- HTTP -------------------------------------------------------------------------------

function authHeaders() {
  return state.apiKey ? { "X-API-Key": state.apiKey } : {};
}

function askForKey() {
  return new Promise((resolve) => {
    els.keyInput.value = "";
    els.keyDialog.showModal();
    const done = (ok) => {
      els.keyDialog.close();
      els.keyForm.removeEventListener("submit", onSubmit);
      els.keyCancel.removeEventListener("click", onCancel);
      resolve(ok);
    };
    const onSubmit = (e) => {
      e.preventDefault();
      state.apiKey = els.keyInput.value.trim();
      sessionStorage.setItem("imgsearch-api-key", state.apiKey);
      done(true);
    };
    const onCancel = () => done(false);
    els.keyForm.addEventListener("submit", onSubmit);
    els.keyCancel.addEventListener("click", onCancel);
  });
}

async function api(path, options = {}, retried = false) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (response.status === 401 && !retried) {
    if (await askForKey()) return api(path, options, true);
  }
  const type = response.headers.get("content-type") || "";
  const body = type.includes("application/json") ? await response.json() : null;
  if (!response.ok) {
    const err = (body && body.error) || { code: `http_${response.status}`, message: response.statusText };
    throw Object.assign(new Error(err.message), { code: err.code, status: response.status });
  }
  return body;
}

function imagePath(id) {
  // Ids may contain "/" (the route takes the rest of the path); encode everything else.
  return "images/" + id.split("/").map(encodeURIComponent).join("/");
}

// ---- search -----------------------------------------------------------------------------

function searchParams(offset) {
  const params = new URLSearchParams({ limit: els.limit.value, offset: String(offset) });
  for (const part of els.filter.value.split(",")) {
    const f = part.trim();
    if (f) params.append("filter", f);
  }
  const threshold = Number(els.threshold.value);
  if (threshold > 0) params.set("score_threshold", String(threshold));
  if (state.query && state.query.kind === "upload" && els.crop.value) params.set("crop", els.crop.value);
  return params;
}

// Outline the detected objects the query was searched with, over the (square, cover-fit)
// preview. Boxes are in the original's pixels, which the browser shows EXIF-rotated too.
function drawQueryCrops(crops) {
  for (const old of els.queryFrame.querySelectorAll(".crop-box")) old.remove();
  const img = els.queryImage;
  const boxes = (crops || []).filter((c) => c.cropped);
  if (!boxes.length) return;
  const place = () => {
    const w = img.naturalWidth, h = img.naturalHeight, side = img.clientWidth;
    if (!w || !h || !side) return;
    const scale = Math.max(side / w, side / h);
    const dx = (side - w * scale) / 2, dy = (side - h * scale) / 2;
    for (const c of boxes) {
      const [x0, y0, x1, y1] = c.box;
      const div = document.createElement("div");
      div.className = "crop-box";
      Object.assign(div.style, {
        left: `${dx + x0 * scale}px`, top: `${dy + y0 * scale}px`,
        width: `${(x1 - x0) * scale}px`, height: `${(y1 - y0) * scale}px`,
      });
      const label = document.createElement("span");
      label.textContent = `${c.class} ${Math.round(c.confidence * 100)}%`;
      div.appendChild(label);
      els.queryFrame.appendChild(div);
    }
  };
  if (img.complete && img.naturalWidth) place(); else img.addEventListener("load", place, { once: true });
}

async function runSearch(append = false) {
  if (!state.query) return;
  const seq = ++state.seq;
  const offset = append ? state.nextOffset : 0;
  setError(null);
  els.results.classList.add("loading");
  els.results.dataset.state = "loading";
  if (!append) showSkeleton();
  try {
    let result;
    const params = searchParams(offset);
    if (state.query.kind === "upload") {
      const form = new FormData();
      form.append("file", state.query.file, state.query.name);
      result = await api(`search?${params}`, { method: "POST", body: form });
    } else {
      result = await api(`${imagePath(state.query.id)}/similar?${params}`);
    }
    if (seq !== state.seq) return;
    render(result, append);
  } catch (err) {
    if (seq !== state.seq) return;
    if (!append) els.results.replaceChildren();
    setError(err);
    els.results.dataset.state = "error";
  } finally {
    if (seq === state.seq) els.results.classList.remove("loading");
  }
}

function showSkeleton() {
  const n = Math.min(Number(els.limit.value), 12);
  const cards = [];
  for (let i = 0; i < n; i++) {
    const li = els.template.content.firstElementChild.cloneNode(true);
    li.classList.add("skeleton");
    li.querySelector("img").remove();
    cards.push(li);
  }
  els.results.replaceChildren(...cards);
}

function scoreColor(score) {
  if (score >= 0.8) return "var(--good)";
  if (score >= 0.6) return "var(--accent)";
  return "var(--warn)";
}

function render(result, append) {
  if (!append) {
    for (const url of state.objectUrls) URL.revokeObjectURL(url);
    state.objectUrls = [];
    els.results.replaceChildren();
  }
  const start = result.offset;
  result.hits.forEach((hit, i) => els.results.appendChild(card(hit, start + i + 1)));
  state.nextOffset = result.next_offset;
  els.more.hidden = result.next_offset === null;
  els.results.dataset.state = "done";
  if (!append) drawQueryCrops(result.query_crops);
  const t = result.timing;
  const parts = [`${result.hits.length} result${result.hits.length === 1 ? "" : "s"} in ${t.total_ms.toFixed(1)} ms`];
  if (t.detect_ms !== null && t.detect_ms !== undefined) parts.push(`detect ${t.detect_ms.toFixed(1)} ms (${result.crop})`);
  if (t.embed_ms !== null) parts.push(`decode ${t.decode_ms.toFixed(1)} ms · embed ${t.embed_ms.toFixed(1)} ms (batch of ${t.batch_size})`);
  if (t.lookup_ms !== null) parts.push(`stored vector, no re-embedding`);
  parts.push(`search ${t.search_ms.toFixed(1)} ms`);
  els.timing.textContent = parts.join(" · ");
  if (!append && result.hits.length === 0) {
    setError({ message: "No stored image matches these options. Loosen the filter or the minimum score." });
  }
}

function card(hit, rank) {
  const li = els.template.content.firstElementChild.cloneNode(true);
  li.dataset.imageId = hit.image_id;
  li.dataset.score = String(hit.score);
  li.querySelector(".rank").textContent = `#${rank}`;
  li.querySelector(".id").textContent = hit.image_id;
  li.querySelector(".id").title = hit.image_id;
  const meta = hit.metadata || {};
  li.querySelector(".label").textContent = meta.label !== undefined ? String(meta.label).replaceAll("_", " ") : "";
  const value = li.querySelector(".value");
  value.textContent = hit.score.toFixed(3);
  const bar = li.querySelector(".bar");
  bar.style.setProperty("--w", `${Math.max(0, Math.min(1, hit.score)) * 100}%`);
  bar.style.setProperty("--c", scoreColor(hit.score));
  const img = li.querySelector("img");
  img.alt = hit.image_id;
  loadThumbnail(img, hit.image_id);
  li.querySelector("button").addEventListener("click", () => searchSimilar(hit.image_id));
  return li;
}

function loadThumbnail(img, id) {
  const url = `${imagePath(id)}/thumbnail?size=256`;
  const fail = () => img.parentElement.classList.add("placeholder");
  img.addEventListener("error", fail, { once: true });
  if (!state.apiKey) {
    img.src = url;
    return;
  }
  // <img src> cannot send a header: fetch with the key, show the bytes as a blob URL.
  fetch(url, { headers: authHeaders() })
    .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(String(r.status)))))
    .then((blob) => {
      const objectUrl = URL.createObjectURL(blob);
      state.objectUrls.push(objectUrl);
      img.src = objectUrl;
    })
    .catch(fail);
}

function setQueryImage(src, caption) {
  els.empty.hidden = true;
  els.query.hidden = false;
  els.dropzone.classList.add("has-query");
  drawQueryCrops([]);
  els.queryImage.src = src;
  els.queryCaption.innerHTML = "";
  const b = document.createElement("b");
  b.textContent = caption.title;
  const change = document.createElement("span");
  change.className = "change";
  change.textContent = "Drop or click to search another image";
  els.queryCaption.append(b, document.createTextNode(caption.note ? ` · ${caption.note}` : ""), change);
}

function searchFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    setError({ message: `${file.name} is not an image (${file.type}).` });
    return;
  }
  const url = URL.createObjectURL(file);
  state.query = { kind: "upload", file, name: file.name || "pasted image" };
  setQueryImage(url, { title: state.query.name, note: `${Math.round(file.size / 1024)} KB` });
  els.title.textContent = `Results for ${state.query.name}`;
  els.sub.textContent = "Most similar first. Click a result to search by it.";
  runSearch();
}

function searchSimilar(id) {
  state.query = { kind: "similar", id };
  setQueryImage(`${imagePath(id)}/thumbnail?size=512`, { title: id, note: "stored image" });
  if (state.apiKey) loadThumbnail(els.queryImage, id);
  els.title.textContent = `Similar to ${id}`;
  els.sub.textContent = "Searched with the stored vector of this image, which is left out of the results.";
  window.scrollTo({ top: 0, behavior: "smooth" });
  runSearch();
}

function setError(err) {
  if (!err) {
    els.error.hidden = true;
    els.error.textContent = "";
    return;
  }
  els.error.hidden = false;
  els.error.textContent = err.message || String(err);
  if (err.code) {
    const code = document.createElement("code");
    code.textContent = err.code;
    els.error.prepend(code, document.createTextNode(" "));
  }
}

// ---- page wiring ------------------------------------------------------------------------

els.fileInput.addEventListener("change", () => searchFile(els.fileInput.files[0]));
els.dropzone.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") { e.preventDefault(); els.fileInput.click(); }
});
for (const type of ["dragenter", "dragover"]) {
  els.dropzone.addEventListener(type, (e) => { e.preventDefault(); els.dropzone.classList.add("dragging"); });
}
for (const type of ["dragleave", "drop"]) {
  els.dropzone.addEventListener(type, (e) => { e.preventDefault(); els.dropzone.classList.remove("dragging"); });
}
els.dropzone.addEventListener("drop", (e) => searchFile(e.dataTransfer.files[0]));
document.addEventListener("paste", (e) => {
  const item = [...(e.clipboardData?.items || [])].find((it) => it.type.startsWith("image/"));
  if (item) searchFile(item.getAsFile());
});
els.more.addEventListener("click", () => runSearch(true));
els.limit.addEventListener("change", () => runSearch());
els.filter.addEventListener("change", () => runSearch());
els.options = $("options");
els.options.addEventListener("submit", (e) => { e.preventDefault(); runSearch(); });
els.threshold.addEventListener("input", () => {
  const v = Number(els.threshold.value);
  els.thresholdOut.textContent = v > 0 ? v.toFixed(2) : "off";
});
els.threshold.addEventListener("change", () => runSearch());
els.crop.addEventListener("change", () => runSearch());

async function loadStats() {
  try {
    const [count, ready] = await Promise.all([api("count"), fetch("readyz").then((r) => r.json())]);
    const n = document.createElement("b");
    n.textContent = count.count.toLocaleString();
    const model = ready.model ? `  ·  ${ready.model} · ${ready.dim}-d · ${ready.device}` : "";
    // The crop choice only means something with a detector (queries default to its mode).
    els.cropOption.hidden = !ready.crop || ready.crop === "none";
    els.stats.replaceChildren(n, document.createTextNode(` images${model}`));
  } catch (err) {
    els.stats.textContent = `service not ready: ${err.message}`;
  }
}
loadStats();
