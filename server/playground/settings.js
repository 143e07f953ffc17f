// The sampling parameters of the form, the mode and the API key: read into request fields, and kept in
// localStorage so that they are still there at the next visit.

const STORE = "windowlm.playground";
const KEY_STORE = "windowlm.playground.api-key";

/** What was stored at the last visit: {params: {name: text}, mode, system}; empty when nothing (or junk) is. */
export function loadStored() {
  try {
    const stored = JSON.parse(localStorage.getItem(STORE) || "{}");
    return stored && typeof stored === "object" ? stored : {};
  } catch {
    return {};
  }
}

export function saveStored(stored) {
  localStorage.setItem(STORE, JSON.stringify(stored));
}

export function loadKey() {
  return localStorage.getItem(KEY_STORE) || "";
}

export function saveKey(key) {
  if (key) localStorage.setItem(KEY_STORE, key);
  else localStorage.removeItem(KEY_STORE);
}

function fields(form) {
  return [...form.elements].filter((element) => element.name);
}

/** The form's values as typed, by name. */
export function formValues(form) {
  return Object.fromEntries(fields(form).map((element) => [element.name, element.value]));
}

/** Put stored values back into the form; names it no longer has are ignored. */
export function restoreForm(form, values = {}) {
  for (const element of fields(form)) {
    if (typeof values[element.name] === "string") element.value = values[element.name];
  }
}

/** Every field back to the value the page was written with. */
export function resetForm(form) {
  for (const element of fields(form)) element.value = element.defaultValue;
}

/** A stop line as typed, with \n, \t and \\ turned into a newline, a tab and a backslash. */
function unescape(line) {
  return line.replace(/\\(n|t|\\)/g, (_, code) => ({ n: "\n", t: "\t", "\\": "\\" })[code]);
}

/**
 * The request fields the form asks for. An empty field is left out (the server's default); anything typed is
 * sent as typed, so the server, not the page, says what is out of range. `max_tokens` goes out under the name
 * each API uses. The seed is returned apart, as the digits of a 64-bit integer, since a JavaScript number
 * cannot hold every such integer exactly.
 */
export function requestFields(form, mode) {
  const body = {};
  let seed = null;
  for (const element of fields(form)) {
    const text = element.value.trim();
    if (!text) continue;
    const kind = element.dataset.kind;
    if (kind === "lines") {
      const stops = text.split("\n").filter((line) => line.length > 0).map(unescape);
      if (stops.length) body.stop = stops;
    } else if (kind === "seed") {
      seed = /^-?\d+$/.test(text) ? BigInt(text).toString() : null;
    } else if (Number.isFinite(Number(text))) {
      const name = element.name === "max_tokens" && mode === "chat" ? "max_completion_tokens" : element.name;
      body[name] = Number(text);
    }
  }
  return { body, seed };
}

/** The JSON text of a request body, with the seed's digits written in as they are. */
export function encodeBody(body, seed) {
  const json = JSON.stringify(body);
  if (seed === null) return json;
  return `${json.slice(0, -1)}${json === "{}" ? "" : ","}"seed":${seed}}`;
}
