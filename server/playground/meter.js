// Live timings of one streamed answer: time to first token, tokens per second and token counts. Counts are the
// text chunks received while the answer streams (one per token, about), then the server's own from the usage
// chunk that ends the stream.

const TICK_MS = 100; // how often the line is redrawn while waiting between tokens

function milliseconds(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

export class Meter {
  constructor(output) {
    this.output = output;
    this.sent = performance.now();
    this.first = null; // when the first text arrived
    this.last = null; // when the latest text arrived
    this.chunks = 0;
    this.usage = null; // {prompt_tokens, completion_tokens, total_tokens}, from the last chunk
    this.finish = null; // the finish_reason
    this.ending = null; // "done", "stopped" or "failed" once over
    this.timer = setInterval(() => this.show(), TICK_MS);
    this.show();
  }

  token() {
    const now = performance.now();
    this.first ??= now;
    this.last = now;
    this.chunks += 1;
    this.show();
  }

  end(how) {
    clearInterval(this.timer);
    this.ending = how;
    this.show();
  }

  show() {
    const now = performance.now();
    const parts = [];
    if (this.first === null) {
      parts.push(this.ending ? "no text" : `waiting ${milliseconds(now - this.sent)}`);
    } else {
      parts.push(`first token ${milliseconds(this.first - this.sent)}`);
    }
    const tokens = this.usage ? this.usage.completion_tokens : this.chunks;
    const until = this.ending ? this.last : now;
    if (this.first !== null && tokens > 1 && until > this.first) {
      parts.push(`${((tokens - 1) / ((until - this.first) / 1000)).toFixed(1)} tokens/s`);
    }
    parts.push(this.usage ? `${tokens} tokens` : `≈${tokens} tokens`);
    if (this.usage) parts.push(`prompt ${this.usage.prompt_tokens} tokens`);
    if (this.finish) parts.push(`finish: ${this.finish}`);
    if (this.ending === "stopped") parts.push("stopped");
    this.output.textContent = parts.join(" · ");
  }
}
