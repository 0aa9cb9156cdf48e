// The query's preview: outlines of the detected objects it was searched with.

// Over the (square, cover-fit) preview. Boxes are in the original's pixels, which the
// browser shows EXIF-rotated too.
export function drawQueryCrops(frame, img, crops) {
  for (const old of frame.querySelectorAll(".crop-box")) old.remove();
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
      frame.appendChild(div);
    }
  };
  if (img.complete && img.naturalWidth) place(); else img.addEventListener("load", place, { once: true });
}
