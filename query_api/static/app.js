// The search page: plain JS modules, no build step. Talks to the same API that /docs
// describes (http.js). Cards are in cards.js, the words for errors in messages.js.
import { filterText, makeCard, skeletonCards } from "./cards.js";
import { api, authHeaders, hasKey, imagePath, initKeyDialog } from "./http.js";
import { explain } from "./messages.js";
import { drawQueryCrops } from "./preview.js";

const $ = (id) => document.getElementById(id);
const els = {
  dropzone: $("dropzone"), fileInput: $("file-input"), empty: $("dropzone-empty"),
  query: $("query"), queryImage: $("query-image"), queryCaption: $("query-caption"),
  queryFrame: $("query-frame"), optionsBox: $("options-box"), optionsSummary: $("options-summary"),
  options: $("options"), labelFilter: $("label-filter"), labelHint: $("label-hint"),
  filter: $("filter"), suggestions: $("filter-suggestions"), limit: $("limit"),
  threshold: $("threshold"), thresholdOut: $("threshold-out"), crop: $("crop"),
  cropOption: $("crop-option"), timing: $("timing"), title: $("results-title"),
  sub: $("results-sub"), error: $("error"), emptyNotice: $("empty"), results: $("results"),
  more: $("more"), stats: $("stats"), template: $("card-template"),
  keyDialog: $("key-dialog"), keyInput: $("key-input"), keyForm: $("key-form"), keyCancel: $("key-cancel"),
};
const PHONE = window.matchMedia("(max-width: 640px)");
initKeyDialog({ dialog: els.keyDialog, input: els.keyInput, form: els.keyForm, cancel: els.keyCancel });

const state = {
  query: null,        // {kind: "upload", file, name} or {kind: "similar", id}
  nextOffset: null,
  objectUrls: [],
  seq: 0,             // ignores answers to searches that were superseded
  stored: null,       // images in the index, from /count
  seen: new Map(),    // filter suggestions from the metadata of shown results
};

// ---- options ----------------------------------------------------------------------------

function activeFilters() {
  const filters = [];
  if (els.labelFilter.value) filters.push(els.labelFilter.value);
  for (const part of els.filter.value.split(",")) {
    const f = part.trim();
    if (f) filters.push(f);
  }
  return filters;
}

function searchParams(offset) {
  const params = new URLSearchParams({ limit: els.limit.value, offset: String(offset) });
  for (const f of activeFilters()) params.append("filter", f);
  const threshold = Number(els.threshold.value);
  if (threshold > 0) params.set("score_threshold", String(threshold));
  if (state.query && state.query.kind === "upload" && els.crop.value) params.set("crop", els.crop.value);
  return params;
}

function updateOptionsSummary() {
  const parts = activeFilters();
  if (Number(els.threshold.value) > 0) parts.push(`score ≥ ${Number(els.threshold.value).toFixed(2)}`);
  els.optionsSummary.textContent = parts.length ? ` · ${parts.join(", ")}` : "";
}

async function loadLabels() {
  try {
    const facets = await api("facets?key=label&limit=200");
    const keep = els.labelFilter.value;
    const options = [new Option("Any label", "")];
    for (const v of facets.values) {
      options.push(new Option(`${v.value} (${v.count.toLocaleString()})`, v.filter));
    }
    els.labelFilter.replaceChildren(...options);
    els.labelFilter.value = keep;
    els.labelHint.textContent = facets.values.length ? `${facets.values.length} stored` : "none stored";
    refreshSuggestions();
  } catch (err) {
    els.labelHint.textContent = "unavailable";
  }
}

// Suggestions for "More filters": key=value pairs from the metadata of the results shown,
// written the way the API reads them back exactly.
function rememberMetadata(hits) {
  for (const hit of hits) {
    for (const [key, value] of Object.entries(hit.metadata || {})) {
      if (key === "label") continue;
      const text = filterText(key, value);
      if (text.length <= 80) state.seen.set(text, (state.seen.get(text) || 0) + 1);
    }
  }
  refreshSuggestions();
}

function refreshSuggestions() {
  const top = [...state.seen.entries()].sort((a, b) => b[1] - a[1]).slice(0, 50).map(([t]) => t);
  els.suggestions.replaceChildren(...top.map((t) => new Option(t)));
}

// ---- search -----------------------------------------------------------------------------

function setBusy(busy) {
  els.results.setAttribute("aria-busy", busy ? "true" : "false");
  els.results.classList.toggle("loading", busy);
}

async function runSearch(append = false) {
  if (!state.query) return;
  const seq = ++state.seq;
  const offset = append ? state.nextOffset : 0;
  showError(null);
  showEmpty(false);
  updateOptionsSummary();
  setBusy(true);
  els.results.dataset.state = "loading";
  if (!append) {
    els.more.hidden = true;
    els.timing.textContent = "Searching…";
    els.results.replaceChildren(...skeletonCards(els.template, Math.min(Number(els.limit.value), 12)));
    // A new search starts at the top of its results, wherever the last one was scrolled.
    if (window.scrollY > 0) window.scrollTo({ top: 0 });
  } else {
    els.more.disabled = true;
  }
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
    failed(err, append);
  } finally {
    if (seq === state.seq) {
      setBusy(false);
      els.more.disabled = false;
    }
  }
}

function failed(err, append) {
  const why = explain(err);
  const name = state.query && state.query.kind === "upload" ? state.query.name : "this photo";
  if (!append) els.results.replaceChildren();
  els.results.dataset.state = "error";
  els.timing.textContent = "";
  els.more.hidden = true;
  state.nextOffset = null;
  if (why.kind === "file") {
    // The photo itself is the problem: nothing may send it again (options, Load more).
    state.query = null;
    els.title.textContent = `Can’t search with ${name}`;
    els.sub.textContent = "";
  }
  const actions = [];
  if (why.kind === "file") actions.push(["Choose another photo", () => els.fileInput.click()]);
  if (why.kind === "retry" && state.query) actions.push(["Try again", () => runSearch(append)]);
  if (why.kind === "filter") actions.push(["Clear the filters", clearFilters]);
  showError(why, actions);
}

function clearFilters() {
  els.labelFilter.value = "";
  els.filter.value = "";
  els.threshold.value = "0";
  els.thresholdOut.textContent = "off";
  runSearch();
}

function render(result, append) {
  if (!append) {
    for (const url of state.objectUrls) URL.revokeObjectURL(url);
    state.objectUrls = [];
    els.results.replaceChildren();
  }
  const start = result.offset;
  const cards = result.hits.map((hit, i) => makeCard(els.template, hit, start + i + 1,
    { onOpen: searchSimilar, loadThumbnail }));
  els.results.append(...cards);
  rememberMetadata(result.hits);
  state.nextOffset = result.next_offset;
  els.more.hidden = result.next_offset === null;
  if (!append) drawQueryCrops(els.queryFrame, els.queryImage, result.query_crops);
  const shown = els.results.children.length;
  if (!append && result.hits.length === 0) {
    els.results.dataset.state = "empty";
    els.timing.textContent = "No results";
    showEmpty(true);
    return;
  }
  els.results.dataset.state = "done";
  els.timing.textContent = timingText(result, shown);
}

function timingText(result, shown) {
  const t = result.timing;
  const parts = [`${shown} result${shown === 1 ? "" : "s"} in ${t.total_ms.toFixed(0)} ms`];
  if (t.detect_ms !== null && t.detect_ms !== undefined) parts.push(`detect ${t.detect_ms.toFixed(1)} ms (${result.crop})`);
  if (t.embed_ms !== null && t.embed_ms !== undefined) parts.push(`embed ${t.embed_ms.toFixed(1)} ms`);
  if (t.lookup_ms !== null && t.lookup_ms !== undefined) parts.push("stored vector");
  parts.push(`search ${t.search_ms.toFixed(1)} ms`);
  return parts.join(" · ");
}

function loadThumbnail(img, id, size = 256) {
  const url = `${imagePath(id)}/thumbnail?size=${size}`;
  const fail = () => img.parentElement.classList.add("placeholder");
  img.addEventListener("error", fail, { once: true });
  if (!hasKey()) {
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

// ---- notices ------------------------------------------------------------------------------

function notice(el, { title, text, code }, actions = []) {
  const strong = document.createElement("strong");
  strong.textContent = title;
  const p = document.createElement("p");
  p.textContent = text;
  const children = [strong, p];
  if (actions.length) {
    const row = document.createElement("div");
    row.className = "notice-actions";
    for (const [label, onClick] of actions) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = label;
      button.addEventListener("click", onClick);
      row.append(button);
    }
    children.push(row);
  }
  if (code) {
    const small = document.createElement("small");
    small.className = "code";
    small.textContent = `error code: ${code}`;
    children.push(small);
  }
  el.replaceChildren(...children);
  el.hidden = false;
}

function showError(why, actions = []) {
  if (!why) {
    els.error.hidden = true;
    els.error.replaceChildren();
    delete els.error.dataset.code;
    return;
  }
  els.error.dataset.code = why.code || "";
  notice(els.error, why, actions);
}

function showEmpty(on) {
  if (!on) {
    els.emptyNotice.hidden = true;
    return;
  }
  const filters = activeFilters();
  const threshold = Number(els.threshold.value);
  let text;
  const actions = [];
  if (state.stored === 0) {
    text = "The index is empty. Add photos with imgsearch up PATH (or upload through the API), then search again.";
  } else if (filters.length || threshold > 0) {
    const what = [filters.length ? `the filter ${filters.join(", ")}` : null,
      threshold > 0 ? `a minimum score of ${threshold.toFixed(2)}` : null].filter(Boolean).join(" and ");
    text = `Nothing stored matches ${what}.`;
    actions.push(["Clear the filters", clearFilters]);
  } else {
    text = "Nothing else is stored yet. Add more photos, then search again.";
  }
  notice(els.emptyNotice, { title: "No matching images", text }, actions);
}

// ---- the query ------------------------------------------------------------------------------

function setQueryImage(src, caption) {
  document.body.classList.add("has-query");
  els.empty.hidden = true;
  els.query.hidden = false;
  els.dropzone.classList.add("has-query");
  els.queryFrame.classList.remove("unreadable");
  drawQueryCrops(els.queryFrame, els.queryImage, []);
  // A file the browser cannot show gets a "No preview" tile, never a broken-image icon.
  els.queryFrame.classList.remove("placeholder");
  if (src) {
    els.queryImage.addEventListener("error", () => els.queryFrame.classList.add("unreadable"), { once: true });
    els.queryImage.src = src;
  } else {
    els.queryImage.removeAttribute("src");
  }
  const b = document.createElement("b");
  b.textContent = caption.title;
  const change = document.createElement("span");
  change.className = "change";
  change.textContent = "Drop or tap to search another";
  els.queryCaption.replaceChildren(b, document.createTextNode(caption.note ? ` · ${caption.note}` : ""), change);
}

function searchFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    state.query = null;
    els.results.replaceChildren();
    els.results.dataset.state = "error";
    els.more.hidden = true;
    els.timing.textContent = "";
    showEmpty(false);
    showError({ code: "not_an_image", title: `${file.name} isn’t an image`,
      text: "Choose a JPEG, PNG, WebP, GIF, BMP or TIFF photo." },
    [["Choose another photo", () => els.fileInput.click()]]);
    return;
  }
  const url = URL.createObjectURL(file);
  state.query = { kind: "upload", file, name: file.name || "pasted image" };
  const size = file.size < 1024 ? "under 1 KB" : `${Math.round(file.size / 1024).toLocaleString()} KB`;
  setQueryImage(url, { title: state.query.name, note: size });
  els.title.textContent = `Results for ${state.query.name}`;
  els.sub.textContent = "Most similar first. Select a result to search by it.";
  runSearch();
}

function searchSimilar(id) {
  state.query = { kind: "similar", id };
  setQueryImage(hasKey() ? null : `${imagePath(id)}/thumbnail?size=512`, { title: id, note: "stored image" });
  if (hasKey()) loadThumbnail(els.queryImage, id, 512);
  els.title.textContent = `Similar to ${id}`;
  els.sub.textContent = "Searched with the stored vector of this image, which is left out of the results.";
  runSearch();
}

// ---- page wiring ------------------------------------------------------------------------

els.fileInput.addEventListener("change", () => {
  searchFile(els.fileInput.files[0]);
  els.fileInput.value = "";  // choosing the same file again is a new search
});
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
els.labelFilter.addEventListener("change", () => runSearch());
// Typed filters apply on Enter or "Apply" only. Searching on "change" (which fires when
// the field loses focus) re-ran the search under the pointer and swallowed the click on
// a result.
els.options.addEventListener("submit", (e) => { e.preventDefault(); runSearch(); });
els.filter.addEventListener("input", updateOptionsSummary);
els.threshold.addEventListener("input", () => {
  const v = Number(els.threshold.value);
  els.thresholdOut.textContent = v > 0 ? v.toFixed(2) : "off";
  updateOptionsSummary();
});
els.threshold.addEventListener("change", () => runSearch());
els.crop.addEventListener("change", () => runSearch());
// On a phone the options fold away until asked for, so results fit on the first screen.
if (PHONE.matches) els.optionsBox.open = false;

async function loadStats() {
  try {
    const [count, ready] = await Promise.all([api("count"), fetch("readyz").then((r) => r.json())]);
    state.stored = count.count;
    const n = document.createElement("b");
    n.textContent = count.count.toLocaleString();
    const model = document.createElement("span");
    model.className = "model";
    model.textContent = ready.model ? ` · ${ready.model} · ${ready.dim}-d · ${ready.device}` : "";
    // The crop choice only means something with a detector (queries default to its mode).
    els.cropOption.hidden = !ready.crop || ready.crop === "none";
    els.stats.replaceChildren(n, document.createTextNode(" images"), model);
  } catch (err) {
    els.stats.textContent = { network: "service unreachable", unauthorized: "API key needed" }[err.code]
      || "service starting…";
  }
}
loadStats().then(loadLabels);
