// GatewayClient — the browser client of the gateway's protocol (docs/REFERENCE.md §2, §5 and
// §9 in the pushgate repository), over a WebSocket or, where none can be opened, over
// Server-Sent Events (`/sse` plus `POST /sse/{session}`) with the same API.
//
// A plain ES module with no dependencies and no build step; the gateway serves it at
// `/client.js`. It owns one logical connection: it connects to the first URL, follows the
// close-code table of docs/REFERENCE.md §2 (reconnect at once, with backoff, or not at all),
// fails over across the given URLs, re-subscribes every channel on reconnect and resumes with
// `since` from the last offset seen per channel, so a page keeps receiving without writing any
// of that.
//
//   import { GatewayClient } from "/client.js";
//   const client = new GatewayClient("wss://push.example.com/ws", { channels: ["ticks"] });
//   client.on("ticks", (data) => console.log(data.time));
//   client.onState((state, info) => console.log(state, info));
//   client.connect();
//   await client.subscribe("chat:lobby");
//
// `transport: "auto"` (the default) starts with a WebSocket and, when no WebSocket has ever
// opened (a proxy that refuses the upgrade), falls back to SSE for the rest of the client's
// life; `"ws"` or `"sse"` pins one. `client.transport` says which is in use.
//   await client.publish("chat:lobby", { text: "hi" });
//   const members = await client.presence("chat:lobby"); // [{client_id, session, node}, …]
//   client.onJoin(({ channel, client_id }) => …); client.onLeave(…);

/** Close codes after which the client stays closed (docs/REFERENCE.md §2). */
const NO_RECONNECT = new Map([
  [1000, "normal close"],
  [1002, "protocol error"],
  [1003, "binary frame not accepted"],
  [1007, "invalid UTF-8"],
  [1009, "message too big"],
  [4400, "bad request (client_id or query)"],
  [4401, "missing, bad or expired token"],
  [4403, "origin not allowed"],
  [4409, "disconnected by the server"],
]);

/** Close codes after which the client reconnects with backoff; any code not listed anywhere
 * (1005, 1006, 1012, …) is treated the same way. Names only serve the `info.reason` text. */
const BACKOFF = new Map([
  [1006, "connection lost"],
  [1011, "internal error"],
  [1013, "node is full"],
  [4000, "slow consumer"],
  [4001, "heartbeat timeout"],
  [4029, "rate limit exceeded"],
]);

/** 1001: the node is draining; another node takes the session at once. */
const GOING_AWAY = 1001;

const DEFAULTS = {
  channels: [],
  clientId: undefined,
  token: undefined,
  reconnect: { minMs: 500, maxMs: 30000 },
  // A connection that stayed open this long resets the backoff; a node that accepts and then
  // closes at once (1013, 4029) therefore keeps backing off instead of being hammered.
  stableMs: 10000,
  // Requests (subscribe, unsubscribe, publish, ping) unanswered this long reject.
  timeoutMs: 10000,
  // Extra query parameters for every connection URL.
  params: {},
  // "auto" | "ws" | "sse" (see the header).
  transport: "auto",
};

const STATES = ["connecting", "open", "reconnecting", "closed"];

/** Should a close with `code` reconnect, and how? Exported for tests and custom UIs. */
export function closePolicy(code) {
  if (code === GOING_AWAY) return { reconnect: true, immediate: true, reason: "node is draining" };
  if (NO_RECONNECT.has(code)) return { reconnect: false, immediate: false, reason: NO_RECONNECT.get(code) };
  return { reconnect: true, immediate: false, reason: BACKOFF.get(code) || `closed with ${code}` };
}

/** Full-jitter exponential backoff: a uniform delay in [0, min(maxMs, minMs·2^attempt)]. */
export function backoffDelay(attempt, minMs, maxMs, random = Math.random) {
  const cap = Math.min(maxMs, minMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

function splitList(value) {
  if (value == null) return [];
  const items = Array.isArray(value) ? value : String(value).split(",");
  return items.map((s) => String(s).trim()).filter(Boolean);
}

class RequestError extends Error {
  constructor(message, code, frame) {
    super(message);
    this.name = "GatewayError";
    this.code = code;
    this.frame = frame;
  }
}

export class GatewayClient {
  /**
   * @param {string|string[]} urls  one WebSocket URL, a list for failover, or a comma-separated string
   * @param {object} [options]
   * @param {string[]|string} [options.channels]  channels to subscribe to at connect
   * @param {string} [options.clientId]  sent as `client_id` (when auth is off)
   * @param {string|(() => string|Promise<string>)} [options.token]  JWT, or a function returning one (called before every connection)
   * @param {{minMs:number,maxMs:number}} [options.reconnect]  backoff bounds; `false` disables reconnecting
   */
  constructor(urls, options = {}) {
    this.urls = splitList(urls);
    if (this.urls.length === 0) throw new TypeError("GatewayClient: at least one URL is required");
    this.options = { ...DEFAULTS, ...options };
    this.options.reconnect =
      options.reconnect === false ? false : { ...DEFAULTS.reconnect, ...(options.reconnect || {}) };
    this.clientId = options.clientId;
    this.token = options.token;

    /** Channels the session is (or will be, at connect) subscribed to; sent as `channels`. */
    this.channels = new Set(splitList(this.options.channels));
    /** Last offset seen per channel with history; sent as `since` on reconnect. */
    this.offsets = new Map();

    this.state = "closed";
    this.info = {};
    /** "ws" or "sse": the transport of the current (or next) connection. */
    this.transport = this.options.transport === "sse" ? "sse" : "ws";
    this.wsOpened = false; // a WebSocket opened once: this network passes them
    this.welcome = null;
    this.ws = null;
    this.urlIndex = 0;
    this.attempt = 0;
    this.nextId = 1;
    this.pending = new Map(); // request id → {resolve, reject, type, channel, timer}
    this.joining = new Map(); // channel → {promise, resolve, reject}: subscribe() not yet sent or acked
    this.outbox = []; // frames queued while not open (publish), sent on open
    this.timer = null;
    this.openedAt = 0;
    this.goingAwayStreak = 0;
    this.barrierScheduled = false;
    this.publishAcks = false; // the gateway sends `published` frames: no ping barrier needed
    this.wanted = false; // connect() called and close() not: keep the connection up

    this.handlers = new Map(); // channel (or "*") → Set<fn(data, frame)>
    this.listeners = new Map(); // event name → Set<fn>
  }

  // === public API ===

  /** Opens the connection (no-op when already connecting or open). Returns `this`. */
  connect() {
    if (this.wanted && this.state !== "closed") return this;
    this.wanted = true;
    this.attempt = 0;
    this.goingAwayStreak = 0;
    this._open("connecting");
    return this;
  }

  /** Closes the connection for good (code 1000); pending requests reject. */
  close(reason = "client closed") {
    this.wanted = false;
    clearTimeout(this.timer);
    this.timer = null;
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      this._detach(ws);
      try {
        ws.close(1000, reason);
      } catch (_) {
        /* already closed */
      }
    }
    this._failAll(new RequestError(reason, "closed"));
    this._setState("closed", { code: 1000, reason, reconnect: false, byClient: true });
  }

  /** Replaces the token (e.g. after a 4401); used by the next connection. */
  setToken(token) {
    this.token = token;
  }

  /**
   * Hands the open session a fresh token before the current one expires (the gateway closes a
   * session with 4401 at its token's `exp`). Resolves on `refreshed`, rejects on an `error`
   * (`bad_token`, `rate_limited`); the token is also used by later connections.
   */
  async refresh(token) {
    this.token = token;
    const value = typeof token === "function" ? await token() : token;
    return this._request({ type: "refresh", token: String(value) });
  }

  /**
   * Subscribes to `channel`. Resolves with the `subscribed` frame; rejects with the `error`
   * frame's code (`err.code`, `err.frame`). While not connected the request waits and is sent
   * when the connection opens. Once subscribed, the channel is re-subscribed on every reconnect.
   */
  subscribe(channel, { since } = {}) {
    channel = String(channel);
    if (this.channels.has(channel)) {
      // Already subscribed, or part of the next connection's `channels` query.
      return quiet(Promise.resolve({ type: "subscribed", channel }));
    }
    if (since != null) this.offsets.set(channel, String(since));
    let entry = this.joining.get(channel);
    if (!entry) {
      entry = {};
      entry.promise = quiet(
        new Promise((resolve, reject) => {
          entry.resolve = resolve;
          entry.reject = reject;
        }),
      );
      this.joining.set(channel, entry);
      if (this.state === "open") this._sendSubscribe(channel);
    }
    return entry.promise;
  }

  /** Unsubscribes from `channel` and forgets its offset. Resolves on `unsubscribed`. */
  unsubscribe(channel) {
    channel = String(channel);
    const wasSubscribed = this.channels.delete(channel);
    this.offsets.delete(channel);
    const joining = this.joining.get(channel);
    if (joining) {
      this.joining.delete(channel);
      joining.reject(new RequestError(`unsubscribed from ${channel}`, "cancelled"));
    }
    if (this.state !== "open" || (!wasSubscribed && !joining)) {
      return quiet(Promise.resolve({ type: "unsubscribed", channel }));
    }
    return this._request({ type: "unsubscribe", channel });
  }

  /**
   * Publishes `data` on `channel` (allowed by the gateway's `client_publish` patterns, default
   * `chat:*`). While reconnecting the frame waits and is sent on open. Resolves on the
   * gateway's `published` acknowledgement, rejects on an `error` with the publish's id. Until
   * the gateway has shown that it acknowledges publishes, the client follows them with a
   * `ping`: the gateway answers a session's frames in order, so the `pong` settles them too.
   */
  publish(channel, data) {
    return this._request({ type: "publish", channel: String(channel), data }, { queue: true });
  }

  /**
   * Who is in the presence channel `channel` (docs/REFERENCE.md §8): resolves with the list
   * of `{client_id, session, node}`, one per session, on every node; rejects with the `error`
   * frame's code (`forbidden` when not subscribed, `not_presence` for another channel).
   */
  presence(channel) {
    return quiet(this._request({ type: "presence", channel: String(channel) }).then((frame) => frame.clients || []));
  }

  /** Application-level ping (not needed for liveness: the server pings at the WebSocket level). */
  ping() {
    return this._request({ type: "ping" });
  }

  /** Calls `fn(data, frame)` for every message on `channel` ("*" = every channel). Returns an unsubscribe function. */
  on(channel, fn) {
    return addTo(this.handlers, String(channel), fn);
  }

  /** Removes a handler added with `on` (all handlers of the channel when `fn` is omitted). */
  off(channel, fn) {
    const set = this.handlers.get(String(channel));
    if (!set) return;
    if (fn) set.delete(fn);
    else set.clear();
  }

  /** `fn(state, info)` on every state change: connecting | open | reconnecting | closed. */
  onState(fn) {
    return this.addListener("state", fn);
  }
  /** `fn(welcome)` with `{node, session, client_id}` on every (re)connection. */
  onWelcome(fn) {
    return this.addListener("welcome", fn);
  }
  /** `fn(frame)` for every `error` frame (including those that also reject a request). */
  onError(fn) {
    return this.addListener("error", fn);
  }
  /** `fn(frame)` with `{channel, client_id, session}` when a session joins a presence channel this client is in. */
  onJoin(fn) {
    return this.addListener("join", fn);
  }
  /** `fn(frame)` with `{channel, client_id, session}` when a session leaves a presence channel this client is in. */
  onLeave(fn) {
    return this.addListener("leave", fn);
  }
  /** `fn({channel, frame})` when the gateway cannot replay from the stored offset: reload that channel's state. */
  onHistoryGone(fn) {
    return this.addListener("history_gone", fn);
  }

  /** `fn(transport)` when the client falls back from WebSocket to SSE. */
  onTransport(fn) {
    return this.addListener("transport", fn);
  }

  /** Generic events: state, welcome, error, history_gone, join, leave, message, frame, transport. Returns a remover. */
  addListener(event, fn) {
    return addTo(this.listeners, event, fn);
  }
  removeListener(event, fn) {
    this.listeners.get(event)?.delete(fn);
  }

  /** The URL (with query) the next connection will use. */
  buildUrl(base = this.urls[this.urlIndex % this.urls.length], token = typeof this.token === "string" ? this.token : undefined) {
    const params = [];
    const add = (k, v) => params.push(`${encodeURIComponent(k)}=${encodeURIComponent(v)}`);
    const channels = [...this.channels];
    if (channels.length) add("channels", channels.join(","));
    if (this.clientId != null && this.clientId !== "") add("client_id", this.clientId);
    if (token) add("token", token);
    const since = channels.filter((c) => this.offsets.has(c)).map((c) => `${c}@${this.offsets.get(c)}`);
    if (since.length) add("since", since.join(","));
    for (const [k, v] of Object.entries(this.options.params || {})) if (v != null) add(k, v);
    if (!params.length) return base;
    return base + (base.includes("?") ? "&" : "?") + params.join("&");
  }

  // === connection life ===

  async _open(state) {
    this._setState(state, { url: this.urls[this.urlIndex % this.urls.length], attempt: this.attempt });
    let token = this.token;
    if (typeof token === "function") {
      try {
        token = await token();
      } catch (err) {
        this._emit("error", { type: "error", code: "token", message: String(err?.message || err) });
        return this._closed({ code: 4401, reason: "token provider failed" });
      }
      if (!this.wanted || this.state === "closed") return;
    }
    const url = this.buildUrl(undefined, token);
    const transport = this.transport;
    let ws;
    try {
      ws = transport === "sse" ? new SseSocket(sseUrl(url), token) : new WebSocket(url);
    } catch (err) {
      // A malformed URL throws synchronously; nothing will ever open, so stop.
      this.wanted = false;
      this._setState("closed", { code: 0, reason: String(err?.message || err), reconnect: false, url });
      return;
    }
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      if (transport === "ws") this.wsOpened = true;
      this._onOpen(ws);
    };
    ws.onmessage = (ev) => this._onMessage(ws, ev);
    ws.onerror = () => {}; // always followed by close, which carries the code
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (!opened && transport === "ws" && !this.wsOpened && this.options.transport === "auto") {
        // No WebSocket gets through (a proxy refusing the upgrade, a firewall): the same
        // session over SSE, at once.
        this.transport = "sse";
        this._emit("transport", "sse");
        if (this.wanted) this._open(this.state === "connecting" ? "connecting" : "reconnecting");
        return;
      }
      this._closed({ code: ev.code, reason: ev.reason, wasClean: ev.wasClean });
    };
  }

  _detach(ws) {
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
  }

  _onOpen(ws) {
    if (this.ws !== ws) return;
    this.openedAt = Date.now();
    this._setState("open", { url: ws.url });
    // Channels asked for while not connected and not part of this connection's query.
    for (const channel of this.joining.keys()) this._sendSubscribe(channel);
    const outbox = this.outbox;
    this.outbox = [];
    for (const frame of outbox) this._send(frame);
  }

  _closed({ code, reason, wasClean }) {
    const stable = this.openedAt && Date.now() - this.openedAt >= this.options.stableMs;
    this.openedAt = 0;
    if (stable) this.attempt = 0;
    const policy = closePolicy(code);
    const info = { code, reason: reason || policy.reason, wasClean: !!wasClean };

    // Requests sent on the dead connection fail (their outcome is unknown), except subscribes:
    // those stay in `joining` and are sent again on the next connection. Publishes still queued
    // in the outbox wait for the next connection.
    for (const [id, p] of this.pending) {
      if (!p.sent) continue;
      this.pending.delete(id);
      clearTimeout(p.timer);
      if (p.type !== "subscribe") p.reject(new RequestError(`connection closed (${code})`, "disconnected"));
    }

    if (!this.wanted) return;
    if (!policy.reconnect || this.options.reconnect === false) {
      this.wanted = false;
      this._failAll(new RequestError(`connection closed: ${info.reason}`, "closed"));
      this._setState("closed", { ...info, reconnect: false });
      return;
    }

    if (stable || !policy.immediate) this.goingAwayStreak = 0;
    let delay;
    if (policy.immediate && this.goingAwayStreak < Math.max(2, this.urls.length)) {
      // Draining node: go to the next node now. Repeated 1001s without a stable connection in
      // between (every node draining) fall back to backoff so the client never spins.
      this.goingAwayStreak += 1;
      delay = 0;
    } else {
      const { minMs, maxMs } = this.options.reconnect;
      delay = backoffDelay(this.attempt, minMs, maxMs);
      this.attempt += 1;
    }
    this.urlIndex = (this.urlIndex + 1) % this.urls.length;
    this._setState("reconnecting", { ...info, reconnect: true, delay, attempt: this.attempt, url: this.urls[this.urlIndex] });
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = null;
      if (this.wanted) this._open("reconnecting");
    }, delay);
  }

  // === frames ===

  _onMessage(ws, ev) {
    if (this.ws !== ws) return;
    if (typeof ev.data !== "string") return; // the protocol is text frames only
    let frame;
    try {
      frame = JSON.parse(ev.data);
    } catch (_) {
      this._emit("error", { type: "error", code: "bad_frame", message: "server sent a frame that is not JSON" });
      return;
    }
    if (!frame || typeof frame !== "object") return;
    this._emit("frame", frame);
    switch (frame.type) {
      case "message":
        return this._onData(frame);
      case "welcome":
        return this._onWelcome(frame);
      case "subscribed":
        return this._onSubscribed(frame);
      case "unsubscribed":
        this.channels.delete(frame.channel);
        return this._resolve(frame);
      case "pong":
        this._settlePublishes(frame.id);
        return this._resolve(frame);
      case "published":
        this.publishAcks = true;
        return this._resolve(frame);
      case "refreshed":
      case "presence":
        return this._resolve(frame);
      case "join":
      case "leave":
        return this._emit(frame.type, frame);
      case "error":
        return this._onErrorFrame(frame);
      default:
        return undefined;
    }
  }

  _onWelcome(frame) {
    this.welcome = frame;
    // Keep the identity the gateway gave us, so the personal channel survives reconnects.
    if (frame.client_id != null && this.clientId == null && this.token == null) this.clientId = frame.client_id;
    this._emit("welcome", frame);
  }

  _onData(frame) {
    const channel = frame.channel;
    if (frame.offset != null) {
      // Offsets are opaque: only an exact repeat is a known duplicate.
      if (this.offsets.get(channel) === frame.offset) return;
      if (this.channels.has(channel) || this.joining.has(channel)) this.offsets.set(channel, frame.offset);
    }
    this._emit("message", frame);
    for (const key of [channel, "*"]) {
      const set = this.handlers.get(key);
      if (!set) continue;
      for (const fn of [...set]) {
        try {
          fn(frame.data, frame);
        } catch (err) {
          reportError(err);
        }
      }
    }
  }

  _onSubscribed(frame) {
    const channel = frame.channel;
    this.channels.add(channel);
    const joining = this.joining.get(channel);
    if (joining) {
      this.joining.delete(channel);
      joining.resolve(frame);
    }
    this._resolve(frame);
  }

  _onErrorFrame(frame) {
    if (frame.code === "history_gone") {
      const channel = this._errorChannel(frame);
      if (channel != null) this.offsets.delete(channel);
      else this.offsets.clear();
      this._emit("history_gone", { channel, frame });
      this._emit("error", frame);
      // The subscription itself goes on live: a pending subscribe keeps waiting for `subscribed`.
      return;
    }
    const p = frame.id != null ? this.pending.get(frame.id) : undefined;
    if (p) {
      this.pending.delete(frame.id);
      clearTimeout(p.timer);
      if (p.type === "subscribe") {
        const joining = this.joining.get(p.channel);
        if (joining) {
          this.joining.delete(p.channel);
          this.offsets.delete(p.channel);
          joining.reject(new RequestError(frame.message || frame.code, frame.code, frame));
        }
      }
      p.reject(new RequestError(frame.message || frame.code, frame.code, frame));
    } else if (frame.id == null && frame.channel != null && frame.code === "forbidden") {
      // A connect-time channel the gateway refused: stop asking for it on reconnect.
      this.channels.delete(frame.channel);
      this.offsets.delete(frame.channel);
    }
    this._emit("error", frame);
  }

  /** The channel an error is about: its `channel` field, else a known channel named in the message. */
  _errorChannel(frame) {
    if (frame.channel != null) return String(frame.channel);
    if (frame.id != null && this.pending.has(frame.id)) return this.pending.get(frame.id).channel;
    const text = String(frame.message || "");
    let best = null;
    for (const c of this.offsets.keys()) if (text.includes(c) && (!best || c.length > best.length)) best = c;
    return best;
  }

  _sendSubscribe(channel) {
    const frame = { type: "subscribe", channel };
    if (this.offsets.has(channel)) frame.since = this.offsets.get(channel);
    const req = this._request(frame);
    req.catch(() => {}); // the `joining` promise carries the outcome
  }

  _request(frame, { queue = false } = {}) {
    const id = this.nextId++;
    frame = { ...frame, id };
    return quiet(
      new Promise((resolve, reject) => {
        const open = this.state === "open" && this.ws && this.ws.readyState === 1;
        if (!open) {
          if (!queue || !this.wanted) {
            reject(new RequestError(`not connected (${this.state})`, "not_connected"));
            return;
          }
          this.outbox.push(frame);
        }
        const timer = setTimeout(() => {
          this.pending.delete(id);
          this.outbox = this.outbox.filter((f) => f !== frame);
          if (frame.type === "subscribe") {
            const joining = this.joining.get(frame.channel);
            if (joining) {
              this.joining.delete(frame.channel);
              joining.reject(new RequestError(`subscribe ${frame.channel} timed out`, "timeout"));
            }
          }
          reject(new RequestError(`${frame.type} timed out`, "timeout"));
        }, this.options.timeoutMs);
        this.pending.set(id, { resolve, reject, type: frame.type, channel: frame.channel, timer, sent: false });
        if (open) this._send(frame);
      }),
    );
  }

  /** A `pong` with id X: every publish sent before the ping that caused it was accepted. */
  _settlePublishes(pongId) {
    if (pongId == null) return;
    for (const [id, p] of this.pending) {
      if (p.type !== "publish" || !p.sent || id >= pongId) continue;
      this.pending.delete(id);
      clearTimeout(p.timer);
      p.resolve({ type: "published", channel: p.channel, id });
    }
  }

  /** One `ping` after a burst of publishes (sent in the same task) confirms them all. */
  _scheduleBarrier() {
    if (this.barrierScheduled) return;
    this.barrierScheduled = true;
    Promise.resolve().then(() => {
      this.barrierScheduled = false;
      // Not a user request: its pong only settles publishes (see `_settlePublishes`).
      this._send({ type: "ping", id: this.nextId++ });
    });
  }

  _resolve(frame) {
    if (frame.id == null) return;
    const p = this.pending.get(frame.id);
    if (!p) return;
    this.pending.delete(frame.id);
    clearTimeout(p.timer);
    p.resolve(frame);
  }

  _send(frame) {
    const ws = this.ws;
    if (!ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(frame));
    const p = frame.id != null ? this.pending.get(frame.id) : undefined;
    if (p) p.sent = true;
    if (frame.type === "publish" && !this.publishAcks) this._scheduleBarrier();
    return true;
  }

  _failAll(err) {
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      this.pending.delete(id);
      p.reject(err);
    }
    for (const [channel, j] of this.joining) {
      this.joining.delete(channel);
      j.reject(err);
    }
    this.outbox = [];
  }

  _setState(state, info = {}) {
    if (!STATES.includes(state)) return;
    const changed = state !== this.state;
    this.state = state;
    info = { ...info, transport: this.transport };
    this.info = info;
    if (changed || state === "reconnecting") this._emit("state", state, info);
  }

  _emit(event, ...args) {
    const set = this.listeners.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(...args);
      } catch (err) {
        reportError(err);
      }
    }
  }
}

/** The `/sse` URL of a `/ws` URL: same host, query and TLS; `/ws` or `/websocket` → `/sse`. */
export function sseUrl(wsUrl) {
  const u = new URL(wsUrl, typeof location !== "undefined" ? location.href : undefined);
  u.protocol = u.protocol === "wss:" ? "https:" : u.protocol === "ws:" ? "http:" : u.protocol;
  const path = u.pathname.replace(/\/(ws|websocket)\/?$/, "");
  u.pathname = (path.endsWith("/") ? path : path + "/") + "sse";
  return u.toString();
}

/**
 * A WebSocket look-alike over Server-Sent Events (docs/REFERENCE.md §9): server frames are the
 * stream's events; `send` POSTs one client frame to `/sse/{session}`, in order. It opens on
 * the welcome (the session id is needed to send), and closes with the code of the stream's
 * `event: close`, or 1006 when the stream breaks: the client reconnects and resumes with
 * `since` itself, so the browser's own reconnect is not used.
 */
class SseSocket {
  constructor(url, token) {
    this.url = url;
    this.token = typeof token === "string" ? token : undefined;
    this.readyState = 0;
    this.session = null;
    this.chain = Promise.resolve();
    this.onopen = this.onmessage = this.onerror = this.onclose = null;
    const es = (this.es = new EventSource(url));
    es.onmessage = (ev) => {
      if (this.readyState === 0) {
        let frame = null;
        try {
          frame = JSON.parse(ev.data);
        } catch (_) {
          /* handled by the client */
        }
        if (frame && frame.type === "welcome") {
          this.session = frame.session;
          this.readyState = 1;
          if (this.onopen) this.onopen({});
        }
      }
      if (this.readyState === 1 && this.onmessage) this.onmessage({ data: ev.data });
    };
    es.addEventListener("close", (ev) => {
      let info = {};
      try {
        info = JSON.parse(ev.data);
      } catch (_) {
        /* no code: treated as lost */
      }
      this._end(info.code ?? 1006, info.reason || "", true);
    });
    es.onerror = () => this._end(1006, "connection lost", false);
  }

  _end(code, reason, wasClean) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.es.close();
    if (this.onclose) this.onclose({ code, reason, wasClean });
  }

  /** POSTs one frame; frames leave one after another, so the session sees them in order. */
  send(text) {
    if (this.readyState !== 1) throw new Error("SSE session not open");
    const target = new URL(this.url);
    target.pathname = target.pathname.replace(/\/?$/, "/") + encodeURIComponent(this.session);
    target.search = "";
    if (this.token) target.searchParams.set("token", this.token);
    // text/plain and no custom header: a simple request, no CORS preflight.
    const post = () =>
      fetch(target, { method: "POST", body: text, headers: { "Content-Type": "text/plain;charset=UTF-8" } })
        .then(async (res) => {
          if (res.status === 202) return;
          if (res.status === 404) return this._end(1006, "session gone");
          if (res.status === 401 || res.status === 403) return this._end(4401, "token refused");
          let body = {};
          try {
            body = await res.json();
          } catch (_) {
            /* keep the status */
          }
          let id;
          try {
            id = JSON.parse(text).id;
          } catch (_) {
            /* no id */
          }
          const frame = { type: "error", code: body.error || `http_${res.status}`, message: body.message || res.statusText, id };
          if (this.readyState === 1 && this.onmessage) this.onmessage({ data: JSON.stringify(frame) });
        })
        .catch(() => this._end(1006, "connection lost"));
    this.chain = this.chain.then(post, post);
  }

  close() {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.es.close();
  }
}

function addTo(map, key, fn) {
  if (typeof fn !== "function") throw new TypeError("handler must be a function");
  let set = map.get(key);
  if (!set) map.set(key, (set = new Set()));
  set.add(fn);
  return () => set.delete(fn);
}

/** Marks a promise as handled so an ignored rejection (fire-and-forget publish) is not reported
 * as unhandled; whoever awaits it still sees the rejection. */
function quiet(promise) {
  promise.catch(() => {});
  return promise;
}

function reportError(err) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(err);
  else setTimeout(() => {
    throw err;
  });
}

export default GatewayClient;
