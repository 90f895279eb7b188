"""``POST /v1/feedback``: the client reports what really happened to an answer.

The verdict moves the serving deployment's success rate (outcome-aware routing) and is itself
a ledger event, so the proof covers what the gateway learned from, too.
"""

from __future__ import annotations

import orjson

from sbactor.errors import GatewayError, bad_request
from sbactor.gateway import Gateway
from sbactor.pipeline.context import Incoming, Reply, parse_body
from sbactor.usage.event import utc_now_rfc3339


async def handle_feedback(gateway: Gateway, incoming: Incoming) -> Reply:
    request_id = incoming.request_id
    principal = gateway.authenticate(incoming.headers)
    body = parse_body(incoming.body)
    target = body.get("request_id")
    outcome = body.get("outcome")
    score = body.get("score")
    if not isinstance(target, str) or not target:
        raise bad_request("missing required field 'request_id'", "missing_field", "request_id")
    if outcome not in ("success", "failure"):
        raise bad_request("'outcome' must be 'success' or 'failure'", "invalid_value", "outcome")
    if score is not None and (not isinstance(score, int | float) or isinstance(score, bool)):
        raise bad_request("'score' must be a number between 0 and 1", "invalid_type", "score")
    try:
        result = await gateway.feedback.feedback(
            target, outcome, score, owner=principal.key_id or ""
        )
    except ValueError as exc:
        raise bad_request(str(exc), "invalid_value") from None
    if result.status == "unknown":
        raise GatewayError(
            404,
            f"no served request with id {target!r} is known to this gateway",
            "invalid_request_error",
            "unknown_request_id",
            param="request_id",
        )
    if result.status == "applied":
        event = {
            "request_id": request_id,
            "dedup_key": f"feedback:{target}",
            "kind": "feedback",
            "time": utc_now_rfc3339(),
            "principal": principal.as_dict(),
            "feedback": {
                "request_id": target,
                "outcome": outcome,
                "score": score,
                "deployment": result.deployment_id,
                "model": result.model,
            },
        }
        for sink in gateway.sinks:
            try:
                await sink.record(event)
            except Exception as exc:  # the verdict counts, but the proof of it failed
                raise GatewayError(
                    503,
                    f"feedback applied but could not be recorded: {exc}",
                    "service_unavailable",
                    "ledger_unavailable",
                    headers={"retry-after": "1"},
                ) from None
    data = {"request_id": target, "status": result.status, "deployment": result.deployment_id}
    return Reply(200, {"content-type": "application/json"}, body=orjson.dumps(data))
