// Talking to the API: the key (asked for once, kept for the tab), JSON errors, paths.

let apiKey = sessionStorage.getItem("imgsearch-api-key") || "";
let dialog = null;  // {dialog, input, form, cancel}, from initKeyDialog
let keyPrompt = null;  // one dialog, however many requests were refused at once

export function initKeyDialog(elements) {
  dialog = elements;
}

export function hasKey() {
  return Boolean(apiKey);
}

export function authHeaders() {
  return apiKey ? { "X-API-Key": apiKey } : {};
}

function askForKey() {
  return new Promise((resolve) => {
    dialog.input.value = "";
    dialog.dialog.showModal();
    const done = (ok) => {
      dialog.dialog.close();
      dialog.form.removeEventListener("submit", onSubmit);
      dialog.cancel.removeEventListener("click", onCancel);
      resolve(ok);
    };
    const onSubmit = (e) => {
      e.preventDefault();
      apiKey = dialog.input.value.trim();
      sessionStorage.setItem("imgsearch-api-key", apiKey);
      done(true);
    };
    const onCancel = () => done(false);
    dialog.form.addEventListener("submit", onSubmit);
    dialog.cancel.addEventListener("click", onCancel);
  });
}

// JSON from the API; a failure throws an Error with the API's stable `code` (or
// "network" when the service cannot be reached at all) and the HTTP status.
export async function api(path, options = {}, retried = false) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  } catch (err) {
    throw Object.assign(new Error(String(err)), { code: "network", status: 0 });
  }
  if (response.status === 401 && !retried && dialog) {
    keyPrompt = keyPrompt || askForKey().finally(() => { keyPrompt = null; });
    if (await keyPrompt) return api(path, options, true);
  }
  const type = response.headers.get("content-type") || "";
  const body = type.includes("application/json") ? await response.json() : null;
  if (!response.ok) {
    const err = (body && body.error) || { code: `http_${response.status}`, message: response.statusText };
    throw Object.assign(new Error(err.message), { code: err.code, status: response.status });
  }
  return body;
}

export function imagePath(id) {
  // Ids may contain "/" (the route takes the rest of the path); encode everything else.
  return "images/" + id.split("/").map(encodeURIComponent).join("/");
}
