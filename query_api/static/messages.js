// What the page says when something goes wrong: the API's stable error codes
// (docs/query_api.md, "Errors") mapped to words for people, each naming what to do.
// The API's own messages are written for programs and operators (they name settings and
// limits); they are never shown as they are.

function sizeFrom(message) {
  // "... the limit is 10 MiB"
  const match = /limit is ([\d.]+ (?:bytes|KiB|MiB))/.exec(message || "");
  return match ? match[1].replace("MiB", "MB").replace("KiB", "KB") : null;
}

function pixelsFrom(message) {
  const numbers = [...String(message || "").matchAll(/(\d[\d,]{6,})/g)].map((m) => Number(m[1].replaceAll(",", "")));
  const limit = numbers.length ? Math.min(...numbers) : null;
  return limit ? `${Math.round(limit / 1e6)} megapixels` : null;
}

// kind: "file" (the chosen photo is the problem: pick another), "retry" (try again later),
// "filter" (change the options), "gone", "key".
const BY_CODE = {
  undecodable: (e) => ({ kind: "file", title: "This file isn’t a photo the service can read",
    text: "Choose a JPEG, PNG, WebP, GIF, BMP or TIFF image." }),
  source_undecodable: () => ({ kind: "file", title: "This file isn’t a photo the service can read",
    text: "Choose a JPEG, PNG, WebP, GIF, BMP or TIFF image." }),
  too_large: (e) => ({ kind: "file", title: "This photo is too large to search with",
    text: `Choose a smaller file${sizeFrom(e.message) ? ` (up to ${sizeFrom(e.message)})` : ""}, or export it at a lower resolution.` }),
  too_many_pixels: (e) => ({ kind: "file", title: "This photo has too many pixels",
    text: `Resize it${pixelsFrom(e.message) ? ` below ${pixelsFrom(e.message)}` : ""} and try again.` }),
  unsupported_media_type: () => ({ kind: "file", title: "That upload wasn’t an image",
    text: "Choose a photo file and try again." }),
  missing_file: () => ({ kind: "file", title: "No photo arrived with the search",
    text: "Choose the photo again." }),
  invalid_multipart: () => ({ kind: "file", title: "The upload arrived damaged",
    text: "Choose the photo again." }),
  client_disconnected: () => ({ kind: "retry", title: "The upload was cut off", text: "Try again." }),
  body_timeout: () => ({ kind: "retry", title: "The upload took too long",
    text: "Check your connection, or try a smaller photo." }),
  invalid_filter: () => ({ kind: "filter", title: "That filter can’t be used",
    text: "Write filters as key=value (for example label=Blue_Jay), or pick a label from the list." }),
  invalid_request: () => ({ kind: "filter", title: "One of the search options isn’t valid",
    text: "Check the filters: each is key=value, separated by commas." }),
  crop_unavailable: () => ({ kind: "filter", title: "Object cropping isn’t available here",
    text: "Set Object crop to “whole image”." }),
  image_not_found: () => ({ kind: "gone", title: "That image is no longer in the index",
    text: "It may have been removed since the results were shown. Search with another photo." }),
  unauthorized: () => ({ kind: "key", title: "This service needs an API key",
    text: "Reload the page and enter one of its keys." }),
  overloaded: () => ({ kind: "retry", title: "The service is busy right now", text: "Try again in a moment." }),
  thumbnails_busy: () => ({ kind: "retry", title: "The service is busy right now", text: "Try again in a moment." }),
  not_ready: () => ({ kind: "retry", title: "The search service is still starting",
    text: "Try again in a few seconds." }),
  store_unavailable: () => ({ kind: "retry", title: "The image index isn’t answering",
    text: "Try again in a few seconds; if it persists, check the service that runs it." }),
  network: () => ({ kind: "retry", title: "Can’t reach the search service",
    text: "Check that it is still running (imgsearch up), then try again." }),
};

export function explain(err) {
  const make = BY_CODE[err.code];
  if (make) return { code: err.code, ...make(err) };
  if (err.status >= 500) {
    return { code: err.code, kind: "retry", title: "The search failed on the server",
      text: "Try again; if it keeps failing, the service’s log says why." };
  }
  return { code: err.code || "error", kind: "retry", title: "The search didn’t work",
    text: "Try again, or search with another photo." };
}
