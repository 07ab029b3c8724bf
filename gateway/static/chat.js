// The tokenspool chat page: streams a chat completion with fetch() and reads the SSE body itself, because
// EventSource can neither POST nor set Last-Event-ID on its first connection. When the connection drops
// before [DONE], it resumes from the last event id it saw (GET /v1/requests/{id}/events), with backoff,
// and keeps only events it has not shown: event ids are "<request id>:<seq>" and seq only grows.
//
// For tests and tools: #reply is the reply being written; #status carries data-state (idle, sending,
// queued, streaming, reconnecting, resumed, stopping, done, cancelled, error) and data-resumes;
// #ttft and #tps carry data-ms and data-value; #request-id and #reply carry data-request-id, and
// #reply data-last-event-id and data-duplicates (replayed events that were skipped).
//
// API key: when the gateway requires one, the user pastes it into #api-key. It lives only in this tab
// (sessionStorage, gone when the tab closes; never localStorage, a cookie or a URL) and is sent as
// "Authorization: Bearer ..." on every API call.

const RESUMABLE_ERROR_CODES = new Set(['inter_token_timeout', 'redis_unavailable']);
const RETRYABLE_STATUS = new Set([502, 503, 504]);
const MAX_ATTEMPTS = 15;
const BACKOFF_FIRST_MS = 200;
const BACKOFF_MAX_MS = 4000;
const MAX_EVENT_CHARS = 4 * 1024 * 1024; // one unfinished SSE event larger than this is not ours: give up
const KEY_STORAGE = 'tokenspool.apiKey';
// The first word of a worker handover's SSE comment, `: handover {"seq": N, "message": "..."}`: the
// same literal as shared.handover.HANDOVER_COMMENT_KEYWORD (a test checks that they match).
const HANDOVER_COMMENT_KEYWORD = 'handover';

const ui = {
  form: document.getElementById('composer'),
  apiKey: document.getElementById('api-key'),
  model: document.getElementById('model'),
  modelList: document.getElementById('model-list'),
  maxTokens: document.getElementById('max-tokens'),
  prompt: document.getElementById('prompt'),
  send: document.getElementById('send'),
  stop: document.getElementById('stop'),
  transcript: document.getElementById('transcript'),
  status: document.getElementById('status'),
  ttft: document.getElementById('ttft'),
  tps: document.getElementById('tps'),
  requestId: document.getElementById('request-id'),
  error: document.getElementById('error'),
};

const history = []; // completed {role, content} messages, sent with the next prompt
let current = null; // the Turn being streamed

function setStatus(state, text) {
  ui.status.dataset.state = state;
  ui.status.textContent = text;
}

function showError(error) {
  const code = error.code || error.type;
  ui.error.textContent = code ? `${code}: ${error.message}` : error.message;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.textContent = '';
  ui.error.hidden = true;
}

function authHeaders() {
  const key = ui.apiKey.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function randomKey() {
  // crypto.randomUUID needs a secure context; getRandomValues works on plain http too.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

function backoffMs(attempt) {
  const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** (attempt - 1));
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

async function errorOf(response) {
  const text = await response.text().catch(() => '');
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return body.error;
  } catch { /* not JSON: fall through */ }
  return { message: `HTTP ${response.status} ${response.statusText} ${text}`.trim(), code: null };
}

// A Server-Sent Events parser (the WHATWG rules): lines end with CRLF, LF or CR; a blank line ends an event.
class SSEParser {
  constructor(onEvent, onComment) {
    this.onEvent = onEvent;
    this.onComment = onComment;
    this.buffer = '';
    this.data = [];
    this.id = null;
  }

  push(text) {
    this.buffer += text;
    for (;;) {
      const match = /\r\n|\r|\n/.exec(this.buffer);
      if (match === null) return;
      if (match[0] === '\r' && match.index === this.buffer.length - 1) return; // maybe half of a CRLF
      const line = this.buffer.slice(0, match.index);
      this.buffer = this.buffer.slice(match.index + match[0].length);
      this.line(line);
    }
  }

  // The body ended: a CR held back as maybe half of a CRLF was a line end after all.
  end() {
    if (this.buffer.endsWith('\r')) {
      const line = this.buffer.slice(0, -1);
      this.buffer = '';
      this.line(line);
    }
  }

  pendingChars() {
    return this.buffer.length + this.data.reduce((sum, part) => sum + part.length, 0);
  }

  line(line) {
    if (line === '') {
      if (this.data.length > 0) this.onEvent({ id: this.id, data: this.data.join('\n') });
      this.data = [];
      this.id = null;
      return;
    }
    if (line.startsWith(':')) {
      this.onComment(line.slice(1).trim());
      return;
    }
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'data') this.data.push(value);
    else if (field === 'id' && !value.includes('\0')) this.id = value;
  }
}

class Turn {
  constructor(body, replyEl) {
    this.body = body;
    this.replyEl = replyEl;
    this.idempotencyKey = randomKey(); // a POST retried after a network error maps onto the same request
    this.controller = new AbortController();
    this.requestId = null;
    this.lastEventId = null;
    this.lastSeq = 0;
    this.text = '';
    this.deltas = 0;
    this.completionTokens = null;
    this.sentAt = performance.now();
    this.firstAt = 0;
    this.lastAt = 0;
    this.resumes = 0;
    this.duplicates = 0;
    this.ended = null; // 'done' | 'error' | 'cancelled'
  }

  setRequestId(requestId) {
    this.requestId = requestId;
    this.replyEl.dataset.requestId = requestId;
    ui.requestId.dataset.requestId = requestId;
    ui.requestId.textContent = requestId;
  }
}

function showTiming(turn) {
  if (turn.firstAt) {
    const ttft = turn.firstAt - turn.sentAt;
    ui.ttft.dataset.ms = ttft.toFixed(0);
    ui.ttft.textContent = `${ttft.toFixed(0)} ms`;
  }
  const tokens = turn.completionTokens ?? turn.deltas;
  const span = (turn.lastAt - turn.firstAt) / 1000;
  if (tokens >= 2 && span > 0) {
    // Decode rate: the tokens after the first, over the time since the first.
    const rate = (tokens - 1) / span;
    ui.tps.dataset.value = rate.toFixed(2);
    ui.tps.textContent = rate.toFixed(1);
  }
}

// One event of the stream. Returns 'done' when nothing more will come, 'resume' when the server closed the
// stream but the request goes on, or null to keep reading.
function handleEvent(turn, event) {
  if (event.data === '[DONE]') return 'done';
  if (event.id !== null) {
    const sep = event.id.lastIndexOf(':');
    const requestId = event.id.slice(0, sep);
    const seq = Number(event.id.slice(sep + 1));
    if (turn.requestId === null && sep > 0) turn.setRequestId(requestId);
    if (sep <= 0 || requestId !== turn.requestId || !Number.isInteger(seq)) {
      return endWithError(turn, { message: `unexpected event id ${event.id}`, code: 'bad_event_id' });
    }
    if (seq <= turn.lastSeq) {
      // Already shown (a resume from an older position replays it): skip. Handovers use sequence
      // numbers without an event, so a gap upwards is normal.
      turn.duplicates += 1;
      turn.replyEl.dataset.duplicates = String(turn.duplicates);
      return null;
    }
    turn.lastSeq = seq;
    turn.lastEventId = event.id;
    turn.replyEl.dataset.lastEventId = event.id;
  }
  let payload;
  try {
    payload = JSON.parse(event.data);
  } catch {
    return endWithError(turn, { message: `unreadable event: ${event.data.slice(0, 200)}`, code: 'bad_event' });
  }
  if (payload.error) {
    if (event.id === null && RESUMABLE_ERROR_CODES.has(payload.error.code)) return 'resume';
    if (payload.error.code === 'cancelled' || payload.error.type === 'cancelled') {
      turn.ended = 'cancelled';
      setStatus('cancelled', `cancelled: ${payload.error.message}`);
      return 'done';
    }
    return endWithError(turn, payload.error);
  }
  if (payload.usage && payload.usage.completion_tokens != null) {
    turn.completionTokens = payload.usage.completion_tokens;
  }
  for (const choice of payload.choices || []) {
    const text = (choice.delta && choice.delta.content) || choice.text || '';
    if (!text) continue;
    const now = performance.now();
    if (!turn.firstAt) turn.firstAt = now;
    turn.lastAt = now;
    turn.deltas += 1;
    turn.text += text;
    turn.replyEl.append(text);
    const state = ui.status.dataset.state;
    if (state === 'sending' || state === 'queued') setStatus('streaming', 'streaming');
  }
  showTiming(turn);
  return null;
}

function endWithError(turn, error) {
  turn.ended = 'error';
  showError(error);
  setStatus('error', 'error');
  return 'done';
}

function handleComment(turn, comment) {
  if (comment.startsWith('queued:')) {
    setStatus('queued', comment);
  } else if (comment === HANDOVER_COMMENT_KEYWORD || comment.startsWith(`${HANDOVER_COMMENT_KEYWORD} `)) {
    ui.status.title = handoverMessage(comment); // a worker handed over: the reply goes on seamlessly
  }
}

// What a handover comment says to people: its JSON's message, or the comment itself.
function handoverMessage(comment) {
  try {
    const body = JSON.parse(comment.slice(HANDOVER_COMMENT_KEYWORD.length + 1));
    if (body && typeof body.message === 'string' && body.message) return body.message;
  } catch {
    // not JSON: show it as it is
  }
  return comment;
}

// Read one response body. 'done': the stream ended ([DONE] or a terminal error); 'dropped': the body
// ended or failed before that; 'resume': the server closed it but the request goes on.
async function consume(turn, response) {
  let outcome = null;
  const parser = new SSEParser(
    (event) => { if (outcome === null) outcome = handleEvent(turn, event); },
    (comment) => { if (outcome === null) handleComment(turn, comment); },
  );
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    while (outcome === null) {
      const { value, done } = await reader.read();
      if (done) {
        parser.end();
        break;
      }
      parser.push(value);
      if (outcome === null && parser.pendingChars() > MAX_EVENT_CHARS) {
        outcome = endWithError(turn, { message: 'an event of the stream is too large', code: 'bad_event' });
      }
    }
  } catch (err) {
    if (turn.controller.signal.aborted) throw err;
    return 'dropped';
  }
  if (outcome !== null) reader.cancel().catch(() => {});
  return outcome ?? 'dropped';
}

function open(turn) {
  const signal = turn.controller.signal;
  if (turn.requestId === null) {
    return fetch('/v1/chat/completions', {
      method: 'POST',
      headers: {
        ...authHeaders(),
        Accept: 'text/event-stream', // with event ids, which a resume needs (a plain POST gets vLLM's frames)
        'Content-Type': 'application/json',
        'Idempotency-Key': turn.idempotencyKey,
      },
      body: JSON.stringify(turn.body),
      signal,
    });
  }
  const headers = { ...authHeaders(), Accept: 'text/event-stream' };
  if (turn.lastEventId !== null) headers['Last-Event-ID'] = turn.lastEventId;
  return fetch(`/v1/requests/${encodeURIComponent(turn.requestId)}/events`, { headers, signal, cache: 'no-store' });
}

async function run(turn) {
  let attempt = 0;
  for (;;) {
    let reason;
    let response = null;
    try {
      response = await open(turn);
    } catch (err) {
      if (turn.controller.signal.aborted) return;
      reason = `network error: ${err.message}`;
    }
    // 204: the request had ended at the last event this page showed (its connection dropped before [DONE]).
    if (response !== null && response.status === 204) return;
    if (response !== null && !response.ok) {
      const error = await errorOf(response);
      if (!(turn.requestId !== null && RETRYABLE_STATUS.has(response.status))) {
        endWithError(turn, error);
        return;
      }
      reason = error.message;
      response = null;
    }
    if (response !== null) {
      if (turn.requestId === null) {
        const requestId = response.headers.get('X-Request-Id');
        if (requestId) turn.setRequestId(requestId);
        ui.stop.disabled = false;
      } else if (attempt > 0) {
        turn.resumes += 1;
        ui.status.dataset.resumes = String(turn.resumes);
        setStatus('resumed', `resumed after event ${turn.lastSeq}`);
      }
      const seenBefore = turn.lastSeq;
      let outcome;
      try {
        outcome = await consume(turn, response);
      } catch {
        return; // aborted
      }
      if (outcome === 'done') return;
      if (turn.lastSeq > seenBefore) attempt = 0; // progress: the next drop starts the backoff afresh
      reason = outcome === 'resume' ? 'the server closed the stream' : 'the connection dropped';
    }
    attempt += 1;
    if (attempt > MAX_ATTEMPTS) {
      endWithError(turn, { message: `gave up reconnecting after ${MAX_ATTEMPTS} attempts (${reason})`, code: 'disconnected' });
      return;
    }
    setStatus('reconnecting', `reconnecting… (attempt ${attempt}: ${reason})`);
    await sleep(backoffMs(attempt), turn.controller.signal);
    if (turn.controller.signal.aborted) return;
  }
}

function newTurnElements(prompt) {
  const previous = document.getElementById('reply');
  if (previous) previous.removeAttribute('id');
  const item = document.createElement('li');
  item.className = 'turn';
  const asked = document.createElement('p');
  asked.className = 'user';
  asked.textContent = prompt;
  const reply = document.createElement('p');
  reply.className = 'assistant';
  reply.id = 'reply';
  item.append(asked, reply);
  ui.transcript.append(item);
  return reply;
}

function resetMetrics() {
  for (const el of [ui.ttft, ui.tps, ui.requestId]) {
    el.textContent = '–';
    delete el.dataset.ms;
    delete el.dataset.value;
    delete el.dataset.requestId;
  }
  ui.status.dataset.resumes = '0';
  ui.status.removeAttribute('title');
}

async function send(event) {
  event.preventDefault();
  if (current !== null) return;
  const prompt = ui.prompt.value;
  const model = ui.model.value.trim();
  const body = {
    model,
    messages: [...history, { role: 'user', content: prompt }],
    stream: true,
    stream_options: { include_usage: true },
  };
  if (ui.maxTokens.value !== '') body.max_tokens = Number(ui.maxTokens.value);
  clearError();
  resetMetrics();
  const turn = new Turn(body, newTurnElements(prompt));
  current = turn;
  ui.send.disabled = true;
  setStatus('sending', 'sending');
  try {
    await run(turn);
  } finally {
    if (turn.ended === null && !turn.controller.signal.aborted) turn.ended = 'done';
    if (turn.ended === 'done') {
      history.push({ role: 'user', content: prompt }, { role: 'assistant', content: turn.text });
      ui.prompt.value = '';
      const resumed = turn.resumes ? ` (resumed ${turn.resumes}×)` : '';
      setStatus('done', `done${resumed}`);
    }
    showTiming(turn);
    current = null;
    ui.send.disabled = false;
    ui.stop.disabled = true;
  }
}

async function stop() {
  const turn = current;
  if (turn === null) return;
  ui.stop.disabled = true;
  if (turn.requestId === null) {
    turn.ended = 'cancelled';
    turn.controller.abort();
    setStatus('cancelled', 'cancelled before the request was accepted');
    return;
  }
  setStatus('stopping', 'stopping…');
  // The stream itself then ends with the request's "cancelled" event.
  try {
    const response = await fetch(`/v1/requests/${encodeURIComponent(turn.requestId)}`, { method: 'DELETE', headers: authHeaders() });
    if (!response.ok && response.status !== 409) showError(await errorOf(response));
  } catch (err) {
    showError({ message: `could not cancel: ${err.message}`, code: 'network_error' });
  }
}

async function loadModels() {
  try {
    const response = await fetch('/v1/models', { cache: 'no-store', headers: authHeaders() });
    if (response.status === 401) {
      ui.model.placeholder = 'paste an API key first';
      ui.apiKey.focus();
      showError(await errorOf(response));
      return;
    }
    if (!response.ok) {
      showError(await errorOf(response));
      return;
    }
    const { data } = await response.json();
    ui.modelList.replaceChildren(...data.map((m) => Object.assign(document.createElement('option'), { value: m.id })));
    if (!ui.model.value && data.length > 0) ui.model.value = data[0].id;
    ui.model.placeholder = data.length > 0 ? 'model' : 'no model is served';
    ui.model.dataset.loaded = 'true';
  } catch (err) {
    showError({ message: `could not list models: ${err.message}`, code: 'network_error' });
  }
}

ui.apiKey.value = sessionStorage.getItem(KEY_STORAGE) ?? '';
ui.apiKey.addEventListener('change', () => {
  const key = ui.apiKey.value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  clearError();
  loadModels();
});
ui.form.addEventListener('submit', send);
ui.stop.addEventListener('click', stop);
ui.prompt.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) ui.form.requestSubmit();
});
loadModels();
