// tokenspool relay for Cloudflare Workers (and workerd): forwards /v1/* to one tokenspool gateway and
// streams the answer back as it arrives. The gateway does all the work (queueing, replay, resume); this
// Worker only has to avoid getting in the way: no buffering, the resume position passed through, the
// client's disconnect passed on, and an OpenAI-style error when the gateway cannot be reached.
//
// env.ORIGIN: the gateway (or its load balancer), e.g. "https://tokenspool.internal.example.com".

// Request headers the gateway reads. Everything else (cookies, Cloudflare's own cf-* headers) stays here.
const FORWARDED_REQUEST_HEADERS = [
  "accept",
  "authorization",
  "content-type",
  "idempotency-key",
  "last-event-id", // resume position; the `last_event_id` query parameter travels in the URL
];

// Hop-by-hop headers describe one connection, not the response; they are not relayed.
const HOP_BY_HOP = ["connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"];

export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    if (!url.pathname.startsWith("/v1/")) {
      return error(404, `no route ${url.pathname} (this relay serves /v1/*)`, "not_found_error", "not_found");
    }
    if (!env.ORIGIN) {
      return error(500, "the relay has no ORIGIN configured", "server_error", "origin_not_configured");
    }

    const headers = new Headers();
    for (const name of FORWARDED_REQUEST_HEADERS) {
      const value = request.headers.get(name);
      if (value !== null) headers.set(name, value);
    }
    const hasBody = request.method !== "GET" && request.method !== "HEAD";

    let upstream;
    try {
      upstream = await fetch(new URL(url.pathname + url.search, env.ORIGIN), {
        method: request.method,
        headers,
        body: hasBody ? request.body : null, // streamed, not read into memory first
        redirect: "manual",
        // Aborted when the client goes away (compatibility flag enable_request_signal): the gateway then
        // sees the disconnect at once and starts its grace period; the request stays resumable.
        signal: request.signal,
      });
    } catch (err) {
      if (request.signal.aborted) return new Response(null, { status: 499 }); // nobody is listening
      console.error(`origin ${env.ORIGIN} unreachable: ${err}`);
      return error(502, "the tokenspool gateway is unreachable; retry later", "server_error", "origin_unreachable");
    }

    // Status, body and headers (X-Request-Id, Retry-After, the gateway's JSON errors) pass through as they are.
    const responseHeaders = new Headers(upstream.headers);
    for (const name of HOP_BY_HOP) responseHeaders.delete(name);
    if ((responseHeaders.get("content-type") || "").startsWith("text/event-stream")) {
      // Tell every cache and proxy after this one to pass events on as they come.
      responseHeaders.set("cache-control", "no-cache");
      responseHeaders.set("x-accel-buffering", "no");
    }
    // The body is the upstream stream itself: each chunk goes to the client when it arrives.
    return new Response(upstream.body, { status: upstream.status, headers: responseHeaders });
  },
};

function error(status, message, type, code) {
  return Response.json({ error: { message, type, param: null, code } }, { status });
}
