// The chat conversation kept on the page: its messages and their elements, and the text the server's chat
// template makes of them, as far as the page can know it.

export class Conversation {
  constructor(list) {
    this.list = list; // the <ol> that shows the messages
    this.messages = []; // {role, content}, as the API takes them
    this.items = []; // the <li> of each message
  }

  /** Add a message at the end and show it. */
  add(role, content) {
    const item = document.createElement("li");
    item.className = `message ${role}`;
    const who = document.createElement("div");
    who.className = "role";
    who.textContent = role;
    const body = document.createElement("div");
    body.className = "content";
    body.textContent = content;
    item.append(who, body);
    this.list.append(item);
    this.messages.push({ role, content });
    this.items.push(item);
    item.scrollIntoView({ block: "nearest" });
  }

  /** Append streamed text to the last message. */
  extend(text) {
    const last = this.messages.length - 1;
    this.messages[last].content += text;
    this.items[last].querySelector(".content").append(text);
    this.items[last].scrollIntoView({ block: "nearest" });
  }

  last() {
    return this.messages[this.messages.length - 1];
  }

  /** Mark the last message as cut short (stopped, or an error in the middle of the stream). */
  markCut(why) {
    this.items[this.items.length - 1].dataset.cut = why;
  }

  removeLast() {
    this.messages.pop();
    this.items.pop().remove();
  }

  clear() {
    while (this.messages.length) this.removeLast();
  }

  /** The messages to send: the system message (when there is one) and the conversation so far. */
  payload(system) {
    const messages = this.messages.map(({ role, content }) => ({ role, content }));
    return system.trim() ? [{ role: "system", content: system }, ...messages] : messages;
  }
}

/**
 * The prompt the server's default chat template renders (the conversation as a scene of a play: a speaker's
 * line "NAME." then the speech and a blank line; system messages as [stage directions]; then the answering
 * speaker's line). The caller checks its length against the server's prompt_tokens before trusting it.
 */
export function scriptPrompt(messages) {
  const speakers = { user: "USER", assistant: "ASSISTANT", tool: "TOOL" };
  let answerer = "ASSISTANT";
  let text = "";
  for (const message of messages) {
    if (message.role === "system" || message.role === "developer") {
      text += `[${message.content.trim()}]\n\n`;
      continue;
    }
    if (message.role === "assistant" && message.name) answerer = message.name;
    const speaker = message.name || speakers[message.role] || message.role.toUpperCase();
    text += `${speaker}.\n${message.content.trim()}\n\n`;
  }
  return `${text}${answerer}.\n`;
}

/** A plain transcript, for a template the page cannot render. */
export function transcript(messages) {
  return messages.map((message) => `${message.role}: ${message.content}\n\n`).join("");
}
