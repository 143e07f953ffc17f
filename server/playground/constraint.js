// The constraint on the generated text: a kind (none, JSON object, JSON schema, regular expression, choice,
// Lark grammar) and the text that goes with it, turned into the request fields the server takes. Each kind keeps
// its own text, so switching kinds back and forth loses nothing.

/** Per kind: what the text box holds (none: no box), an example of it, and what the constraint does. */
const KINDS = {
  none: { label: "", example: "", note: "The model writes freely." },
  json_object: { label: "", example: "", note: "The answer is a JSON object, written compact." },
  json_schema: {
    label: "JSON schema",
    missing: "a JSON schema",
    example: '{"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}',
    note: "The answer is compact JSON that the schema accepts.",
  },
  regex: {
    label: "regular expression",
    missing: "a regular expression",
    example: "(yes|no)[.!]",
    note: "The whole answer matches it (Rust regex syntax).",
  },
  choice: {
    label: "choices, one per line",
    missing: "at least one choice",
    example: "yes\nno\nmaybe",
    note: "The answer is one of the lines, exactly.",
  },
  grammar: {
    label: "grammar (Lark)",
    missing: "a grammar",
    example: 'start: answer "."\nanswer: "yes" | "no"',
    note: "The answer is a sentence of the grammar, from its start rule.",
  },
};

/** A constraint the page will not send: its words say what to fix. */
export class ConstraintError extends Error {
  constructor(message) {
    super(message);
    this.name = "ConstraintError";
  }
}

function needText(kind, text) {
  if (!text.trim()) {
    const missing = KINDS[kind].missing;
    throw new ConstraintError(`The constraint needs ${missing}: type it in the Constraint box, or choose "none".`);
  }
}

function parseSchema(text) {
  needText("json_schema", text);
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new ConstraintError(`The JSON schema is not valid JSON, so nothing was sent: ${error.message}.`);
  }
}

/**
 * The request fields for a constraint of `kind` with the box's `text`: {} for none; throws ConstraintError when
 * the page can already tell it is wrong (a schema that is not JSON, an empty box). Whether the schema, pattern or
 * grammar is one the server can compile is the server's to say, in a 400.
 */
export function constraintFields(kind, text) {
  switch (kind) {
    case "json_object":
      return { response_format: { type: "json_object" } };
    case "json_schema": {
      const schema = parseSchema(text);
      return { response_format: { type: "json_schema", json_schema: { name: "playground", schema } } };
    }
    case "regex":
      needText(kind, text);
      return { structured_outputs: { regex: text.replace(/[\r\n]+$/, "") } }; // a newline typed at the end
    case "choice": {
      const choices = text.split("\n").map((line) => line.replace(/\r$/, "")).filter((line) => line.trim());
      if (!choices.length) needText(kind, "");
      return { structured_outputs: { choice: choices } };
    }
    case "grammar":
      needText(kind, text);
      return { structured_outputs: { grammar: text } };
    default:
      return {};
  }
}

/** The Constraint box: its kind selector, its text and the line that says what the text is. */
export class ConstraintBox {
  constructor({ select, textarea, label, note }) {
    this.select = select;
    this.textarea = textarea;
    this.label = label;
    this.note = note;
    this.texts = {}; // the text typed for each kind
    select.addEventListener("change", () => this.show());
    textarea.addEventListener("input", () => {
      this.texts[select.value] = textarea.value;
      this.markInvalid(null);
    });
  }

  /** Put back what was stored: {kind, texts}; anything else is ignored. */
  restore(stored) {
    if (stored && typeof stored.texts === "object" && stored.texts) {
      for (const [kind, text] of Object.entries(stored.texts)) {
        if (kind in KINDS && typeof text === "string") this.texts[kind] = text;
      }
    }
    if (stored && stored.kind in KINDS) this.select.value = stored.kind;
    this.show();
  }

  /** What to store: the kind chosen and the text of each kind. */
  stored() {
    return { kind: this.select.value, texts: { ...this.texts } };
  }

  /** Show the text box of the chosen kind, or none for the kinds that take no text. */
  show() {
    const kind = this.select.value;
    const { label, example } = KINDS[kind] ?? KINDS.none;
    this.label.hidden = !label;
    this.textarea.hidden = !label;
    this.label.textContent = label;
    this.textarea.placeholder = example && `e.g. ${example}`;
    this.textarea.value = this.texts[kind] ?? "";
    this.markInvalid(null);
  }

  /** The request fields; throws ConstraintError (and marks the box) when the page will not send them. */
  fields() {
    try {
      return constraintFields(this.select.value, this.textarea.value);
    } catch (error) {
      this.markInvalid(error.message);
      throw error;
    }
  }

  /** Mark the text as wrong, with why under it (the page's error line may be scrolled away); null: it is fine. */
  markInvalid(why) {
    const invalid = why !== null && !this.textarea.hidden;
    if (invalid) this.textarea.setAttribute("aria-invalid", "true");
    else this.textarea.removeAttribute("aria-invalid");
    this.note.classList.toggle("invalid", invalid);
    this.note.textContent = invalid ? why : (KINDS[this.select.value] ?? KINDS.none).note;
  }
}
