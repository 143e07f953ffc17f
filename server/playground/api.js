// Talking to the server: JSON requests with the API key, its error bodies, and Server-Sent Events streams.
// Paths are relative ("v1/models"), so the page works wherever the server is mounted.

/** An error answer of the server: {"error": {"message", "type", "param", "code"}} with its HTTP status. */
export class ApiError extends Error {
  constructor(status, error, retryAfter = null) {
    super(error?.message || `the server answered ${status}`);
    this.name = "ApiError";
    this.status = status; // 0 for an error event inside a stream
    this.param = error?.param ?? null;
    this.code = error?.code ?? null;
    this.retryAfter = retryAfter;
  }
}

/** fetch() with the API key (when there is one); resolves to the response when it is a 2xx, else throws ApiError. */
export async function request(path, { key = "", body = null, signal = undefined } = {}) {
  const headers = { Accept: body === null ? "application/json" : "text/event-stream, application/json" };
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== null) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method: body === null ? "GET" : "POST", headers, body, signal });
  if (response.ok) return response;
  let error = null;
  try {
    error = (await response.json()).error;
  } catch {
    // not the server's JSON (a proxy's page, say): the status alone tells
  }
  throw new ApiError(response.status, error, response.headers.get("Retry-After"));
}

/** What to tell the person about a failed request, in the server's words where it has some. */
export function describe(error) {
  if (!(error instanceof ApiError)) return `Cannot reach the server: ${error.message}`;
  switch (error.status) {
    case 0:
      return `The answer stopped with an error: ${error.message}`;
    case 400:
      return error.message; // it names the parameter at fault
    case 401:
      return `This server needs an API key: type it in the "API key" field and try again. (${error.message})`;
    case 429: {
      const seconds = error.retryAfter ?? "a few";
      return `The server is busy (every slot and its queue are full): retry in ${seconds} s. (${error.message})`;
    }
    case 503:
      return `The server is loading the model or shutting down: try again shortly. (${error.message})`;
    default:
      return `The server answered ${error.status}: ${error.message}`;
  }
}

/**
 * Read a Server-Sent Events body, calling onData with each `data:` event's JSON until `data: [DONE]` or the end.
 * Lines are split by hand: a chunk of the body may end anywhere, even inside a line. Comment lines (": ping")
 * and fields other than data are skipped. An event carrying an `error` object throws ApiError.
 */
export async function readEvents(response, onData) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = ""; // the start of a line whose end has not arrived yet
  let data = []; // the data lines of the event being read
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    pending += value;
    let end;
    while ((end = pending.indexOf("\n")) >= 0) {
      const line = pending.slice(0, end).replace(/\r$/, "");
      pending = pending.slice(end + 1);
      if (line.startsWith("data:")) {
        data.push(line.slice(5).replace(/^ /, ""));
      } else if (line === "" && data.length > 0) {
        // a blank line ends the event
        const payload = data.join("\n");
        data = [];
        if (payload === "[DONE]") {
          await reader.cancel();
          return;
        }
        const event = JSON.parse(payload);
        if (event.error) throw new ApiError(0, event.error);
        onData(event);
      }
    }
  }
}
