// The receptive-field bands: which bytes at the end of a text can still change the next token.
//
// The tokenizer is bytes, so a text of n bytes is n positions. In a stack of `depth` local-attention layers,
// each query sees the keys of its window (window_size * look_backward positions back, its own included), so
// the next token depends on the last receptive_field = depth * window_size * look_backward + 1 bytes and on
// nothing before them; of those, the last layer's attention reads the last attention_span bytes. Both numbers
// come from the server's /v1/models.

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const CONTEXT_BYTES = 200; // plain text shown before the receptive field, to see where it starts
const SHOWN_BYTES = 4000; // at most this many bytes of the end of the text are shown

/** Bytes the last layer's attention reads for the next token after a text of n bytes. */
export function windowBytes(n, card) {
  const { window_size: w, look_backward: back, attention_span: span } = card;
  if (span === w * back + 1) return Math.min(n, span); // exact windows: always the last `span` positions
  return Math.min(n, ((n - 1) % w) + w * back + 1); // bucketed: back from the start of the last position's bucket
}

/** Bytes of a text of n bytes that the next token can depend on. */
export function fieldBytes(n, card) {
  return card.receptive_field === null ? n : Math.min(n, card.receptive_field);
}

/** What the two bands mean for this model, in words with its numbers. */
export function describeBands(card) {
  const w = card.window_size;
  const back = card.look_backward;
  const field =
    card.receptive_field === null
      ? "unbounded for this model (a global layer, or layers of different windows): every byte can matter."
      : `the last ${card.receptive_field} bytes (${card.depth} layers × window ${w} × look-back ${back} + 1) ` +
        "can still change the next token; nothing before them can.";
  const span = `the last layer's attention reads at most ${card.attention_span} bytes for the next token.`;
  return { field, window: span };
}

/** The first byte of the character that holds byte `at` (UTF-8 continuation bytes look like 0b10xxxxxx). */
function charStart(bytes, at) {
  while (at > 0 && at < bytes.length && (bytes[at] & 0xc0) === 0x80) at -= 1;
  return at;
}

function mark(className, text, title) {
  const element = document.createElement("mark");
  element.className = className;
  element.title = title;
  element.append(text);
  return element;
}

/**
 * Show the end of `text` in `target` with the receptive field shaded and the last layer's window, inside it,
 * shaded darker. A band edge inside a multi-byte character moves to the character's start. The band sizes in
 * bytes are left in data-field-bytes and data-window-bytes.
 */
export function renderBands(target, text, card) {
  const bytes = encoder.encode(text);
  const n = bytes.length;
  const windowStart = charStart(bytes, n - windowBytes(n, card));
  const fieldStart = charStart(bytes, n - fieldBytes(n, card));
  const shownStart = charStart(bytes, Math.max(0, fieldStart - CONTEXT_BYTES, n - SHOWN_BYTES));
  const fieldShown = Math.max(fieldStart, shownStart); // a band may begin before the part shown
  const windowShown = Math.max(windowStart, shownStart);
  const slice = (from, to) => decoder.decode(bytes.subarray(from, to));
  const { field, window } = describeBands(card);

  const parts = [];
  if (shownStart > 0) {
    const elided = document.createElement("span");
    elided.className = "elided";
    elided.textContent = `[${shownStart} bytes before]\n`;
    parts.push(elided);
  }
  parts.push(slice(shownStart, fieldShown));
  const fieldMark = mark("band-field", slice(fieldShown, windowShown), `Receptive field: ${field}`);
  fieldMark.append(mark("band-window", slice(windowShown, n), `Last layer's window: ${window}`));
  parts.push(fieldMark);
  target.replaceChildren(...parts);
  target.dataset.fieldBytes = String(n - fieldStart);
  target.dataset.windowBytes = String(n - windowStart);
  target.scrollTop = target.scrollHeight;
}
