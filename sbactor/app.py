"""The quart-trio app: health, metrics, models and the admin API.

The inference routes (chat, embeddings, feedback) are served by ``sbactor.edge`` in front of it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from sbactor.auth import admin_key_ok
from sbactor.errors import GatewayError, error_body
from sbactor.gateway import Gateway
from sbactor.logs import request_id_from, request_id_var

log = logging.getLogger("sbactor.app")



def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(data), status=status, headers=headers, content_type="application/json"
    )


def error_response(err: GatewayError) -> Response:
    return Response(
        err.body(), status=err.status, headers=dict(err.headers), content_type="application/json"
    )


def create_app(gateway: Gateway) -> QuartTrio:
    app = QuartTrio("sbactor")
    app.config["MAX_CONTENT_LENGTH"] = gateway.config.server.max_body_bytes
    app.config["BODY_TIMEOUT"] = 60
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False

    @app.before_request
    async def _start() -> None:
        rid = request_id_from(request.headers.get("x-request-id"))
        g.request_id = rid
        g.started = time.perf_counter()
        request_id_var.set(rid)

    @app.after_request
    async def _finish(response: Response) -> Response:
        rid = getattr(g, "request_id", None)
        if rid:
            response.headers["x-request-id"] = rid
        started = getattr(g, "started", None)
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        status = str(response.status_code)
        gateway.metrics.requests.labels(rule, status).inc()
        if started is not None:
            gateway.metrics.latency.labels(rule, status).observe(time.perf_counter() - started)
        return response

    @app.errorhandler(GatewayError)
    async def _gateway_error(err: GatewayError) -> Response:
        return error_response(err)

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 413:
            limit = gateway.config.server.max_body_bytes
            message = f"request body is larger than the limit of {limit} bytes"
            return Response(
                error_body(message, "invalid_request_error", "request_too_large"),
                status=413,
                content_type="application/json",
            )
        if status == 404:
            message = f"no such route: {request.method} {request.path}"
        elif status == 405:
            message = f"method {request.method} not allowed on {request.path}"
        else:
            message = exc.description or exc.name
        return Response(
            error_body(message, "invalid_request_error", exc.name.lower().replace(" ", "_")),
            status=status,
            content_type="application/json",
        )

    @app.errorhandler(Exception)
    async def _bug(exc: Exception) -> Response:
        log.exception("internal error")
        return Response(
            error_body(
                "internal gateway error; see the gateway log for this request id",
                "internal_error",
                "internal_error",
            ),
            status=500,
            content_type="application/json",
        )

    def require_admin() -> None:
        ok = admin_key_ok(
            gateway.config.server.admin_key,
            request.headers.get("authorization"),
            request.headers.get("x-admin-key"),
        )
        if not ok:
            raise GatewayError(
                401, "admin key required", "authentication_error", "invalid_admin_key"
            )

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        reasons = gateway.unready_reasons()
        if reasons:
            return json_response({"ready": False, "reasons": reasons}, status=503)
        degraded = gateway.degraded_reasons()
        if degraded:
            return json_response({"ready": True, "degraded": degraded})
        return json_response({"ready": True})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), content_type="text/plain; version=0.0.4")

    @app.get("/admin/actors")
    async def admin_actors() -> Response:
        require_admin()
        return json_response({"actors": gateway.actor_statistics()})

    @app.get("/admin/budgets")
    async def admin_budgets() -> Response:
        require_admin()
        return json_response({"budgets": await gateway.budget_view()})

    @app.get("/admin/routing")
    async def admin_routing() -> Response:
        require_admin()
        return json_response(gateway.routing_view())

    @app.get("/v1/models")
    async def models() -> Response:
        gateway.authenticate(request.headers)
        data = [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "sbactor"}
            for m in gateway.config.models
        ]
        return json_response({"object": "list", "data": data})

    return app
