// bun-peer.js: a comparison peer for the load generator, not a gateway. It behaves like one
// gateway node as far as `loadgen` can tell, using Bun's built-in server (uWebSockets inside:
// native topic fan-out with `server.publish`) and Bun's own Redis client:
//
//   GET /ws?channels=a,b   WebSocket upgrade; the socket joins each channel as a topic and gets
//                          {"type":"welcome",…} once Redis confirms every subscription
//   GET /readyz            200 once Redis is connected
//
// Each channel a local socket wants is subscribed on Redis once (released when the last local
// socket leaves); each Redis message becomes {"type":"message","channel":C,"data":<payload>}
// published to the topic C. The payload is spliced in verbatim, so it must be JSON, as
// loadgen's are (the gateway validates it; this peer does not: no auth, no limits, no
// history, no slow-consumer policy beyond Bun's defaults).
//
//   bun tests/bench/bun-peer.js [--listen 127.0.0.1:8080] [--redis redis://127.0.0.1:6379]
//   (or BUN_PEER_LISTEN / REDIS_URL in the environment)

const arg = (name, fallback) => {
  const i = process.argv.indexOf(name);
  return i > 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
};
const listen = arg("--listen", process.env.BUN_PEER_LISTEN ?? "127.0.0.1:8080");
const redisUrl = arg("--redis", process.env.REDIS_URL ?? "redis://127.0.0.1:6379");
const [hostname, port] = [listen.slice(0, listen.lastIndexOf(":")), Number(listen.slice(listen.lastIndexOf(":") + 1))];
const node = `bun-${process.pid}`;

const bus = new Bun.RedisClient(redisUrl);
await bus.connect();

// channel → { sockets: local sockets that want it, ready: Promise of the Redis subscription }
const wants = new Map();
// The frame's head per channel, JSON-escaped once.
const heads = new Map();
let server;

function onMessage(message, channel) {
  let head = heads.get(channel);
  if (head === undefined) {
    head = `{"type":"message","channel":${JSON.stringify(channel)},"data":`;
    heads.set(channel, head);
  }
  server.publish(channel, head + message + "}");
}

function want(channel) {
  let w = wants.get(channel);
  if (!w) {
    w = { sockets: 0, ready: bus.subscribe(channel, onMessage) };
    wants.set(channel, w);
  }
  w.sockets += 1;
  return w.ready;
}

function release(channel) {
  const w = wants.get(channel);
  if (!w || --w.sockets > 0) return;
  wants.delete(channel);
  heads.delete(channel);
  bus.unsubscribe(channel).catch(() => {});
}

let sessions = 0;
server = Bun.serve({
  hostname,
  port,
  fetch(req, srv) {
    const url = new URL(req.url);
    if (url.pathname === "/readyz") return new Response("ready\n");
    if (url.pathname !== "/ws") return new Response("not found\n", { status: 404 });
    const channels = [...new Set((url.searchParams.get("channels") ?? "").split(",").filter(Boolean))];
    if (srv.upgrade(req, { data: { channels, session: `${node}-${++sessions}`, open: true } })) return;
    return new Response("expected a WebSocket upgrade\n", { status: 400 });
  },
  websocket: {
    perMessageDeflate: false,
    async open(ws) {
      const { channels, session } = ws.data;
      for (const c of channels) ws.subscribe(c);
      try {
        await Promise.all(channels.map(want));
      } catch (err) {
        ws.close(1011, "bus unavailable");
        return;
      }
      if (!ws.data.open) return;
      ws.send(JSON.stringify({ type: "welcome", session, client_id: session, node, channels }));
    },
    message() {},
    close(ws) {
      ws.data.open = false;
      for (const c of ws.data.channels) release(c);
    },
  },
});
console.error(`bun-peer ${node} listening on ${server.hostname}:${server.port}, bus ${redisUrl}`);
