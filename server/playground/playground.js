// The playground page: two modes (chat, completion) that stream from this server's API, with an optional
// constraint on the text, the model's facts, live timings, and the receptive-field bands over the text once an
// answer is in.

import { describe, readEvents, request } from "./api.js";
import { describeBands, renderBands } from "./bands.js";
import { ConstraintBox, ConstraintError } from "./constraint.js";
import { Conversation, scriptPrompt, transcript } from "./conversation.js";
import * as settings from "./settings.js";
import { Meter } from "./meter.js";

const $ = (id) => document.getElementById(id);
const ui = {
  facts: $("facts"),
  error: $("error"),
  tabs: [$("mode-chat"), $("mode-completion")],
  chat: $("chat"),
  completion: $("completion"),
  system: $("system"),
  input: $("chat-input"),
  editor: $("editor"),
  send: $("send"),
  stop: $("stop"),
  clear: $("clear"),
  stats: $("stats"),
  params: $("params"),
  parameters: $("parameters"),
  key: $("api-key"),
  bandsText: $("bands-text"),
  bandsNote: $("bands-note"),
  fieldLegend: $("field-legend"),
  windowLegend: $("window-legend"),
};
const conversation = new Conversation($("conversation"));
const constraint = new ConstraintBox({
  select: $("constraint-kind"),
  textarea: $("constraint-text"),
  label: $("constraint-label"),
  note: $("constraint-note"),
});
const state = {
  mode: "chat",
  card: null, // the model's entry in /v1/models, once the server has answered
  controller: null, // the AbortController of the answer being streamed
  chatBands: null, // {text, note}: the conversation text the chat bands are drawn over
};
const encoder = new TextEncoder();

function showError(error) {
  const message = error instanceof ConstraintError ? error.message : describe(error);
  ui.error.textContent = message;
  ui.error.dataset.lines = message.trim().includes("\n") ? "many" : "one";
  ui.error.hidden = false;
  if (error.status === 401) ui.key.focus();
  if (/^(response_format|structured_outputs)\b/.test(error.param ?? "")) {
    constraint.markInvalid("The server cannot use this constraint: its message is at the top of the page.");
  }
}

function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

// --- the model's facts ------------------------------------------------------------------------------------

/** [name, value] pairs into the facts list; each pair wraps as one. */
function listFacts(facts) {
  ui.facts.replaceChildren(
    ...facts.map(([name, value]) => {
      const fact = document.createElement("div");
      fact.append(document.createElement("dt"), document.createElement("dd"));
      fact.firstChild.textContent = name;
      fact.lastChild.textContent = String(value);
      return fact;
    }),
  );
}

function showFacts(card) {
  const receptive = card.receptive_field === null ? "unbounded" : `${card.receptive_field} bytes`;
  const facts = [
    ["model", card.id],
    ["window", card.window_size],
    ["look-back", card.look_backward],
    ["layers", card.depth],
    ["receptive field", receptive],
    ["context limit", card.max_model_len ?? "none"],
    ["chat", card.chat_template ? `yes (${card.chat_template} template)` : "not available"],
    ["CPU threads", card.cpu_threads],
  ];
  listFacts(facts);
  ui.tabs[0].disabled = !card.chat_template;
  if (!card.chat_template && state.mode === "chat") setMode("completion");
}

async function loadFacts() {
  try {
    const response = await request("v1/models", { key: ui.key.value.trim() });
    state.card = (await response.json()).data[0];
    showFacts(state.card);
    clearError();
    drawBands();
  } catch (error) {
    state.card = null;
    listFacts([["model", "unknown: the server did not say"]]);
    showError(error);
    if (error.status === 503) setTimeout(loadFacts, 2000); // loading: ask again until the model is in
  }
}

// --- modes, bands, stored settings ------------------------------------------------------------------------

function remember() {
  const params = settings.formValues(ui.params);
  settings.saveStored({ params, mode: state.mode, system: ui.system.value, constraint: constraint.stored() });
}

function setMode(mode) {
  state.mode = mode;
  for (const tab of ui.tabs) tab.setAttribute("aria-selected", String(tab.dataset.mode === mode));
  ui.chat.hidden = mode !== "chat";
  ui.completion.hidden = mode !== "completion";
  ui.send.textContent = mode === "chat" ? "Send" : "Generate";
  remember();
  drawBands();
}

function drawBands() {
  if (!state.card) return;
  const { field, window } = describeBands(state.card);
  ui.fieldLegend.textContent = field;
  ui.windowLegend.textContent = window;
  const shown =
    state.mode === "chat"
      ? state.chatBands
      : { text: ui.editor.value, note: "Over the editor's text: the prompt and its continuation." };
  if (!shown?.text) {
    ui.bandsText.replaceChildren();
    ui.bandsNote.textContent = state.mode === "chat" ? "Send a message to see them over the conversation." : "";
    return;
  }
  ui.bandsNote.textContent = shown.note;
  renderBands(ui.bandsText, shown.text, state.card);
}

/** The text the chat model read and wrote: the default template rendered here when its length in bytes is the
 * server's prompt_tokens, else a plain transcript (a template this page cannot see). */
function chatText(messages, answer, usage) {
  if (state.card?.chat_template === "default") {
    const prompt = scriptPrompt(messages);
    const length = encoder.encode(prompt).length;
    if (!usage) return { text: prompt + answer, note: "Over the conversation as the default template renders it." };
    if (usage.prompt_tokens === length) {
      const note = `Over the conversation as the server's template rendered it (${length} bytes, its prompt_tokens).`;
      return { text: prompt + answer, note };
    }
  }
  const template = state.card?.chat_template;
  const note = `Approximate: over a transcript; the server renders the conversation with its ${template} template.`;
  return { text: transcript(messages) + answer, note };
}

// --- one answer, streamed ---------------------------------------------------------------------------------

function setRunning(running) {
  const focused = document.activeElement;
  ui.send.disabled = running;
  ui.clear.disabled = running;
  ui.stop.disabled = !running;
  // a button that turns disabled drops the keyboard focus: hand it to the one that takes over
  if (running && focused === ui.send) ui.stop.focus();
  if (!running && focused === ui.stop) ui.send.focus();
  ui.editor.readOnly = running;
  for (const tab of ui.tabs) tab.disabled = running || (tab === ui.tabs[0] && !state.card?.chat_template);
}

/** What the request asks and where its text goes, for the current mode; null when there is nothing to send. */
function prepare(mode) {
  if (mode === "completion") {
    const sink = (text) => {
      ui.editor.value += text;
      ui.editor.scrollTop = ui.editor.scrollHeight;
    };
    return { path: "v1/completions", fields: { prompt: ui.editor.value }, sink, undo: () => {} };
  }
  const typed = ui.input.value;
  if (!typed.trim()) return null;
  conversation.add("user", typed);
  ui.input.value = "";
  const messages = conversation.payload(ui.system.value);
  conversation.add("assistant", "");
  const undo = () => {
    // nothing came back: take the message back into the box, to send again
    conversation.removeLast();
    conversation.removeLast();
    if (!ui.input.value) ui.input.value = typed;
  };
  return { path: "v1/chat/completions", fields: { messages }, sink: (text) => conversation.extend(text), undo };
}

/** {fields}: the constraint's request fields; null (with the reason shown) when the page will not send it. */
function constrain() {
  try {
    return { fields: constraint.fields() };
  } catch (error) {
    if (!(error instanceof ConstraintError)) throw error;
    showError(error);
    return null;
  }
}

async function run() {
  if (state.controller) return;
  state.controller = new AbortController(); // taken now: a second press while the facts load starts nothing
  if (!state.card) await loadFacts();
  const mode = state.mode;
  const constrained = state.card && constrain();
  const job = constrained && prepare(mode);
  if (!job) {
    state.controller = null;
    return;
  }
  const { body, seed } = settings.requestFields(ui.params, mode);
  Object.assign(body, constrained.fields, job.fields, { model: state.card.id, stream: true });
  body.stream_options = { include_usage: true };
  const meter = new Meter(ui.stats);
  let answer = "";
  setRunning(true);
  clearError();
  try {
    const key = ui.key.value.trim();
    const options = { key, body: settings.encodeBody(body, seed), signal: state.controller.signal };
    const response = await request(job.path, options);
    await readEvents(response, (event) => {
      if (event.usage) meter.usage = event.usage;
      for (const choice of event.choices ?? []) {
        const text = mode === "chat" ? choice.delta?.content : choice.text;
        if (text) {
          answer += text;
          job.sink(text);
          meter.token();
        }
        if (choice.finish_reason) meter.finish = choice.finish_reason;
      }
    });
    meter.end("done");
  } catch (error) {
    const stopped = error.name === "AbortError";
    meter.end(stopped ? "stopped" : "failed");
    if (!stopped) showError(error);
    if (!answer) job.undo();
    else if (mode === "chat") conversation.markCut(stopped ? "stopped" : "error");
  } finally {
    state.controller?.abort(); // a stream left open by an error would keep generating until it stalls
    state.controller = null;
    setRunning(false);
  }
  if (mode === "chat" && answer) state.chatBands = chatText(body.messages, answer, meter.usage);
  drawBands();
}

function stop() {
  state.controller?.abort();
}

function clearWork() {
  if (state.mode === "chat") {
    conversation.clear();
    state.chatBands = null;
  } else {
    ui.editor.value = "";
  }
  ui.stats.textContent = "";
  drawBands();
}

// --- wiring -----------------------------------------------------------------------------------------------

function debounce(action, ms) {
  let timer = null;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(action, ms);
  };
}

function start() {
  const stored = settings.loadStored();
  settings.restoreForm(ui.params, stored.params);
  constraint.restore(stored.constraint);
  if (typeof stored.system === "string") ui.system.value = stored.system;
  ui.key.value = settings.loadKey();
  if (window.matchMedia("(max-width: 800px)").matches) ui.parameters.open = false;
  setMode(stored.mode === "completion" ? "completion" : "chat");

  for (const tab of ui.tabs) tab.addEventListener("click", () => setMode(tab.dataset.mode));
  ui.send.addEventListener("click", run);
  ui.stop.addEventListener("click", stop);
  ui.clear.addEventListener("click", clearWork);
  ui.params.addEventListener("input", remember);
  ui.system.addEventListener("input", remember);
  $("constraint").addEventListener("input", remember);
  $("constraint").addEventListener("change", remember);
  $("reset").addEventListener("click", () => {
    settings.resetForm(ui.params);
    remember();
  });
  const refetch = debounce(loadFacts, 300);
  ui.key.addEventListener("input", () => {
    settings.saveKey(ui.key.value.trim());
    refetch();
  });
  ui.editor.addEventListener("input", debounce(drawBands, 150));
  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault(); // Enter sends; Shift+Enter is a new line
      run();
    }
  });
  ui.editor.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      run();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") stop();
  });
  loadFacts();
}

start();
