// Result cards: thumbnail, rank, id (shortened in the middle), label, score.

const LONG_PRESS_MS = 500;
const NAME_MAX = 20;  // a file name up to this long stays whole
const TAIL = 16;      // else its last characters do (numbers and extension say the most)

// Ids are paths like "photos/2024/summer/IMG_0001.jpg": the end says the most, so a long
// id loses its middle, never its end. CSS ellipsizes the head; the tail stays whole.
export function splitId(id) {
  const name = id.slice(id.lastIndexOf("/") + 1);
  const keep = name.length <= NAME_MAX ? name.length : TAIL;
  const cut = Math.max(0, id.length - keep);
  return [id.slice(0, cut), id.slice(cut)];
}

export function scoreColor(score) {
  if (score >= 0.8) return "var(--good)";
  if (score >= 0.6) return "var(--accent)";
  return "var(--warn)";
}

// A long press on a card shows its whole id (touch screens have no hover); it does not
// also open the card.
function onLongPress(li, button) {
  let timer = null;
  let fired = false;
  const cancel = () => { clearTimeout(timer); timer = null; };
  button.addEventListener("pointerdown", (e) => {
    if (e.pointerType === "mouse") return;
    fired = false;
    timer = setTimeout(() => {
      fired = true;
      li.classList.toggle("show-id");
    }, LONG_PRESS_MS);
  });
  for (const type of ["pointerup", "pointercancel", "pointerleave"]) button.addEventListener(type, cancel);
  button.addEventListener("contextmenu", (e) => { if (fired) e.preventDefault(); });
  return () => {
    const was = fired;
    fired = false;
    return was;
  };
}

export function makeCard(template, hit, rank, { onOpen, loadThumbnail }) {
  const li = template.content.firstElementChild.cloneNode(true);
  li.dataset.imageId = hit.image_id;
  li.dataset.score = String(hit.score);
  li.querySelector(".rank").textContent = `#${rank}`;
  const [head, tail] = splitId(hit.image_id);
  const idEl = li.querySelector(".id");
  idEl.title = hit.image_id;
  idEl.querySelector(".id-head").textContent = head;
  idEl.querySelector(".id-tail").textContent = tail;
  const meta = hit.metadata || {};
  // The label exactly as stored: what is shown is what a filter must say.
  li.querySelector(".label").textContent = meta.label !== undefined ? String(meta.label) : "";
  li.querySelector(".value").textContent = hit.score.toFixed(3);
  const bar = li.querySelector(".bar");
  bar.style.setProperty("--w", `${Math.max(0, Math.min(1, hit.score)) * 100}%`);
  bar.style.setProperty("--c", scoreColor(hit.score));
  const img = li.querySelector("img");
  loadThumbnail(img, hit.image_id);
  const button = li.querySelector("button");
  const label = meta.label !== undefined ? `, label ${meta.label}` : "";
  button.setAttribute("aria-label", `Result ${rank}: ${hit.image_id}${label}, score ${hit.score.toFixed(3)}. Search for images like it.`);
  const longPressed = onLongPress(li, button);
  button.addEventListener("click", () => {
    if (longPressed()) return;
    onOpen(hit.image_id);
  });
  return li;
}

export function skeletonCards(template, n) {
  const cards = [];
  for (let i = 0; i < n; i++) {
    const li = template.content.firstElementChild.cloneNode(true);
    li.classList.add("skeleton");
    li.setAttribute("aria-hidden", "true");
    li.querySelector("img").remove();
    li.querySelector("button").tabIndex = -1;
    cards.push(li);
  }
  return cards;
}

// "key=value" that the API's filter parameter reads back as exactly this value
// (query_api/routes_facets.py filter_text): text that looks like a number or a
// boolean is quoted.
export function filterText(key, value) {
  if (typeof value === "boolean" || typeof value === "number") return `${key}=${value}`;
  const s = String(value);
  const looksTyped = s === "true" || s === "false" || /^-?(\d+\.?\d*|\.\d+)([eE][+-]?\d{1,3})?$/.test(s)
    || (s.length >= 2 && s.startsWith('"') && s.endsWith('"'));
  return looksTyped ? `${key}="${s}"` : `${key}=${s}`;
}
