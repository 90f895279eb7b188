"""``sbactor mock-upstream``: a fast raw-ASGI OpenAI- and Anthropic-compatible fake upstream.

Served by the gateway's own HTTP server (no framework: it must never be a benchmark's
bottleneck; it also runs on the same 2 cores as what it measures, so its CPU matters).
Scenario rules come from ``scenarios``; the last 1000 request bodies and headers are kept for
tests at ``GET /_mock/requests``. A "cut" stream simply returns from the app mid-body, which
makes the server drop the connection without the terminating chunk.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import orjson
import trio

from sbactor.http_server import HttpServer, ServerLimits, display_address, open_listen_socket
from sbactor.upstream_mock import scenarios as sc

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
MODELS = ("mock-small", "mock-large", "gpt-4o-mini", "gpt-4o", "claude-sonnet")


class MockUpstreamApp:
    """The ASGI app. One ``ScenarioEngine`` (rng + ``times`` counters) for the whole process."""

    def __init__(self, settings: sc.Settings | None = None, record_limit: int = 1000) -> None:
        self.settings = settings or sc.Settings()
        self.engine = sc.ScenarioEngine(self.settings)
        self.recorded: deque[dict[str, Any]] = deque(maxlen=record_limit)
        self._ids = itertools.count(1)
        self.served = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        self.served += 1
        method, path = scope["method"], scope["path"]
        raw = await _read_body(receive)
        if method == "POST":
            return await self._post(scope, path, raw, send)
        if method == "GET" and path == "/healthz":
            return await _send_json(send, 200, {"status": "ok"})
        if method == "GET" and path == "/v1/models":
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "sbactor-mock"}
                    for m in MODELS]
            return await _send_json(send, 200, {"object": "list", "data": data})
        if path == "/_mock/requests" and method == "GET":
            return await _send_json(send, 200, list(self.recorded))
        if path == "/_mock/requests" and method == "DELETE":
            self.recorded.clear()
            return await _send_json(send, 200, {"cleared": True})
        await _send_json(send, 404, sc.openai_error_body(f"no route {method} {path}",
                                                         code="not_found"))

    async def _post(self, scope: Scope, path: str, raw: bytes, send: Send) -> None:
        try:
            body = orjson.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("request body must be a JSON object")
        except (orjson.JSONDecodeError, ValueError) as exc:
            return await _send_json(send, 400, sc.openai_error_body(f"invalid JSON body: {exc}"))
        headers = {k.decode("latin1"): v.decode("latin1") for k, v in scope["headers"]}
        self.recorded.append({"method": "POST", "path": path, "headers": headers, "body": body})
        if path == "/v1/chat/completions":
            return await self._chat(body, send)
        if path == "/v1/messages":
            return await self._messages(body, send)
        if path == "/v1/embeddings":
            await trio.sleep(self.settings.latency_ms / 1000.0)
            return await _send_json(send, 200, sc.render_embeddings(body))
        await _send_json(send, 404, sc.openai_error_body(f"no route POST {path}",
                                                         code="not_found"))

    def _decide(self, body: Mapping[str, Any]) -> sc.Decision | str:
        try:
            return self.engine.decide(body)
        except sc.MarkerError as exc:
            return str(exc)

    async def _chat(self, body: dict[str, Any], send: Send) -> None:
        d = self._decide(body)
        if isinstance(d, str):
            return await _send_json(send, 400, sc.openai_error_body(d))
        rid = str(next(self._ids))
        if not body.get("stream"):
            await trio.sleep(d.latency_s + d.stall_s + _pacing(d))
            if d.is_error:
                return await _send_json(send, d.status, sc.render_openai_error(d),
                                        sc.error_headers(d))
            return await _send_json(send, 200, sc.render_openai_completion(d, rid,
                                                                           int(time.time())))
        await trio.sleep(d.latency_s)
        if d.is_error:
            return await _send_json(send, d.status, sc.render_openai_error(d),
                                    sc.error_headers(d))
        opts = body.get("stream_options") or {}
        chunks = sc.render_openai_chunks(d, rid, int(time.time()),
                                         bool(opts.get("include_usage")))
        frames = (b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)
        await _stream(send, d, frames, b"data: [DONE]\n\n")

    async def _messages(self, body: dict[str, Any], send: Send) -> None:
        d = self._decide(body)
        if isinstance(d, str):
            err = {"type": "error", "error": {"type": "invalid_request_error", "message": d}}
            return await _send_json(send, 400, err)
        rid = f"mock{next(self._ids)}"
        if not body.get("stream"):
            await trio.sleep(d.latency_s + d.stall_s + _pacing(d))
            if d.is_error:
                return await _send_json(send, d.status, sc.render_anthropic_error(d),
                                        sc.error_headers(d))
            return await _send_json(send, 200, sc.render_anthropic_message(d, rid))
        await trio.sleep(d.latency_s)
        if d.is_error:
            return await _send_json(send, d.status, sc.render_anthropic_error(d),
                                    sc.error_headers(d))
        frames = (f"event: {name}\n".encode() + b"data: " + orjson.dumps(data) + b"\n\n"
                  for name, data in sc.render_anthropic_events(d, rid))
        await _stream(send, d, frames, b"")


def _pacing(d: sc.Decision) -> float:
    return d.seconds_per_chunk * len(sc.text_pieces(d.text)) if d.seconds_per_chunk else 0.0


async def _stream(send: Send, d: sc.Decision, frames: Iterable[bytes], tail: bytes) -> None:
    """Send SSE frames; honour ``cut_after`` (drop connection), stall and pacing."""
    await send({"type": "http.response.start", "status": 200, "headers": _SSE})
    for i, frame in enumerate(frames):
        if d.cut_after is not None and i >= d.cut_after:
            return  # returning mid-body: the server closes the connection, no final chunk
        if i == 2 and d.stall_s:  # after the role chunk and the first content
            await trio.sleep(d.stall_s)
        elif i > 0 and d.seconds_per_chunk:
            await trio.sleep(d.seconds_per_chunk)
        await send({"type": "http.response.body", "body": frame, "more_body": True})
    if d.cut_after is not None:
        return
    await send({"type": "http.response.body", "body": tail, "more_body": False})


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(parts)


async def _send_json(send: Send, status: int, value: Any,
                     headers: Mapping[str, str] | None = None) -> None:
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": _JSON + extra})
    await send({"type": "http.response.body", "body": orjson.dumps(value)})


async def serve_mock(
    bind: str,
    settings: sc.Settings | None = None,
    *,
    app: MockUpstreamApp | None = None,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    quiet: bool = False,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled (or ``shutdown_trigger`` returns); reports "host:port" when bound."""
    app = app or MockUpstreamApp(settings)
    sock = open_listen_socket(bind, backlog=4096, reuse_port=False)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    server = HttpServer(app, ServerLimits(max_connections=8192, max_body_bytes=64 << 20))  # type: ignore[arg-type]
    hostport = display_address(sock)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: server.serve(
                [listener],
                shutdown_trigger=shutdown_trigger or trio.sleep_forever,
                grace_s=2.0,
                task_status=task_status,
            )
        )
        if not quiet:
            print(f"mock-upstream listening on http://{hostport}", flush=True, file=sys.stdout)
        task_status.started(hostport)
