"""The hot path's HTTP edge: a raw ASGI front for the inference routes, Quart for the rest.

Quart's per-request machinery (request/app contexts, hooks, response objects) cost about as much
CPU as everything the gateway does for a request (measured; see benchmarks/README.md). The
inference routes are served here directly from ASGI messages; health, metrics and the admin API
stay in the quart-trio app, which receives every other request unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

from sbactor.errors import GatewayError, error_body
from sbactor.gateway import Gateway
from sbactor.http_server import Refusal, Request, request_id_of
from sbactor.logs import request_id_from, request_id_var
from sbactor.pipeline.chat import handle_chat, handle_embeddings
from sbactor.pipeline.context import Incoming, Reply
from sbactor.pipeline.feedback import handle_feedback

log = logging.getLogger("sbactor.app")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Handler = Callable[[Gateway, Incoming], Awaitable[Reply]]

ROUTES: dict[str, Handler] = {
    "/v1/chat/completions": handle_chat,
    "/v1/embeddings": handle_embeddings,
    "/v1/feedback": handle_feedback,
}


_PAID_ROUTES = frozenset(route.encode() for route in ROUTES if route != "/v1/feedback")


class _TooLarge(Exception):
    pass


def early_admission(gateway: Gateway) -> Callable[[Request], Refusal | None]:
    """The gateway's admission check (draining, overload, ledger unavailable), run by the HTTP
    server on each parsed request before any application work.

    Under a storm, shedding in the edge still cost a request task, a disconnect watcher and a
    JSON parse per refused request — and on one trio thread those steps are scheduled round
    robin with the requests being served, so the refusals starved them (measured at 4x
    saturation: 7 req/s served of ~700 possible). Here a refusal is a canned answer on the
    connection's own task, and the connection stays open.
    """

    def check(request: Request) -> Refusal | None:
        if request.method != "POST":
            return None
        path = request.target.partition(b"?")[0]
        if path not in _PAID_ROUTES:
            return None
        error = gateway.admission()
        if error is None:
            return None
        request_id = request_id_from(request_id_of(request.headers))
        gateway.metrics.requests.labels(path.decode("latin-1"), str(error.status)).inc()
        headers = [
            (b"content-type", b"application/json"),
            (b"x-request-id", request_id.encode("latin-1")),
            *((k.encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()),
        ]
        return Refusal(error.status, headers, error.body())

    return check


class Edge:
    """ASGI app: POST to an inference route is handled here, anything else goes to ``fallback``."""

    def __init__(self, gateway: Gateway, fallback: ASGIApp) -> None:
        self.gateway = gateway
        self.fallback = fallback
        self.max_body = gateway.config.server.max_body_bytes
        self._metric_children: dict[tuple[str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = ROUTES.get(scope.get("path", "")) if scope["type"] == "http" else None
        if handler is None or scope.get("method") != "POST":
            await self.fallback(scope, receive, send)
            return
        await self._serve(scope, receive, send, handler)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, handler: Handler) -> None:
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = request_id_from(headers.get("x-request-id"))
        request_id_var.set(request_id)
        try:
            body = await self._read_body(receive, headers)
        except _TooLarge:
            message = f"request body is larger than the limit of {self.max_body} bytes"
            error = GatewayError(413, message, "invalid_request_error", "request_too_large")
            await self._answer(send, scope["path"], request_id, started, _error_reply(error))
            return
        incoming = Incoming(request_id, started, headers, body)
        async with trio.open_nursery() as nursery:
            # a client that goes away cancels the request, as in quart-trio; the pipeline
            # still records its usage event (shielded)
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            reply = await _run(handler, self.gateway, incoming)
            await self._answer(send, scope["path"], request_id, started, reply)
            nursery.cancel_scope.cancel()

    async def _answer(
        self, send: Send, route: str, request_id: str, started: float, reply: Reply
    ) -> None:
        reply.headers["x-request-id"] = request_id
        self._observe(route, reply.status, started)  # before sending: the client may ask next
        await self._send(send, reply)

    def _observe(self, route: str, status_code: int, started: float) -> None:
        key = (route, status_code)
        children = self._metric_children.get(key)
        if children is None:  # ``labels()`` validates and locks on every call: look up once
            metrics, status = self.gateway.metrics, str(status_code)
            children = (
                metrics.requests.labels(route, status),
                metrics.latency.labels(route, status),
            )
            if len(self._metric_children) < 256:  # routes x statuses: small, but bounded
                self._metric_children[key] = children
        children[0].inc()
        children[1].observe(time.perf_counter() - started)

    async def _read_body(self, receive: Receive, headers: dict[str, str]) -> bytes:
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _send(self, send: Send, reply: Reply) -> None:
        raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()]
        if reply.stream is None:
            raw_headers.append((b"content-length", str(len(reply.body)).encode()))
            await send(
                {"type": "http.response.start", "status": reply.status, "headers": raw_headers}
            )
            await send({"type": "http.response.body", "body": reply.body, "more_body": False})
            return
        stream = reply.stream
        started = False
        try:
            await send(
                {"type": "http.response.start", "status": reply.status, "headers": raw_headers}
            )
            async for piece in stream:
                started = True
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if not started and reply.abandon is not None:
                await reply.abandon()  # the generator never ran: it cannot clean up itself
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()


async def _run(handler: Handler, gateway: Gateway, incoming: Incoming) -> Reply:
    """The handler's reply, or the error reply: our own bugs become a 500, never a traceback."""
    try:
        return await handler(gateway, incoming)
    except GatewayError as err:
        return _error_reply(err)
    except Exception:
        log.exception("internal error")
        return Reply(
            500,
            {"content-type": "application/json"},
            error_body(
                "internal gateway error; see the gateway log for this request id",
                "internal_error",
                "internal_error",
            ),
        )


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


def _error_reply(err: GatewayError) -> Reply:
    headers = {"content-type": "application/json", **err.headers}
    return Reply(err.status, headers, err.body())
