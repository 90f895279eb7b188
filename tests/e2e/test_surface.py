"""The OpenAI-compatible surface end to end: real gateway, real mock upstream, real HTTP."""

from __future__ import annotations

import hashlib

import openai
import orjson
import trio

from tests.conftest import MockUpstream, StartGateway, StartMock, mock_config

SERVED_HEADERS = (
    "x-request-id",
    "x-sbactor-provider",
    "x-sbactor-model",
    "x-sbactor-attempts",
    "x-sbactor-cost-usd",
    "x-sbactor-overhead-ms",
)


def _config(upstream: MockUpstream, **sections: object) -> dict:
    cfg = mock_config(upstream, **sections)
    cfg["models"].append(
        {"name": "emb", "surface": "embeddings",
         "deployments": [{"provider": "up", "model": "up-emb"}]}
    )
    cfg["usage_sinks"] = [{"type": "jsonl", "path": "usage.jsonl"}]
    return cfg


async def test_chat_json_headers_and_usage_event(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(_config(mock_upstream))
    r = await gw.chat("hello there", temperature=0.3, response_format={"type": "text"},
                      headers={"x-request-id": "req-abc"})
    assert r.status_code == 200, r.text
    for header in SERVED_HEADERS:
        assert header in r.headers, header
    assert r.headers["x-request-id"] == "req-abc"
    assert r.headers["x-sbactor-provider"] == "up"
    assert r.headers["x-sbactor-model"] == "m"
    assert r.headers["x-sbactor-attempts"] == "1"
    body = r.json()
    assert body["model"] == "m"
    assert body["choices"][0]["message"]["content"]
    # every field the client sent reaches the upstream, with the deployment's model name
    sent = mock_upstream.received()[-1]
    assert sent["model"] == "up-m"
    assert sent["temperature"] == 0.3
    assert sent["response_format"] == {"type": "text"}
    usage = body["usage"]
    expected_cost = (usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1e6
    assert abs(float(r.headers["x-sbactor-cost-usd"]) - expected_cost) < 1e-8
    await gw.stop()
    await trio.sleep(0.2)
    lines = (gw.data_dir / "usage.jsonl").read_bytes().splitlines()
    event = orjson.loads(lines[-1])
    assert event["request_id"] == "req-abc"
    assert event["kind"] == "completion"
    assert event["prompt_tokens"] == usage["prompt_tokens"]
    assert event["deployment"] == "m/up/0"
    assert event["provider"] == "up"


async def test_streaming_with_include_usage(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(_config(mock_upstream))
    body = {"model": "m", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "stream please"}]}
    chunks = []
    async with gw.client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    parsed = [orjson.loads(c) for c in chunks[:-1]]
    assert all(p["model"] == "m" for p in parsed)
    assert parsed[-1]["usage"]["completion_tokens"] > 0
    text = "".join(
        p["choices"][0]["delta"].get("content") or "" for p in parsed if p["choices"]
    )
    assert text


async def test_streaming_without_include_usage_hides_usage_chunk(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(_config(mock_upstream))
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with gw.client.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert all("usage" not in orjson.loads(line[6:]) for line in lines[:-1])
    # the gateway asked the upstream for usage anyway, to bill the stream
    assert mock_upstream.received()[-1]["stream_options"] == {"include_usage": True}


async def test_openai_sdk_json_stream_models_embeddings(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(_config(mock_upstream))
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
    completion = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Say hi"}]
    )
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.total_tokens > 0

    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Stream hi"}], stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces)
    assert usage is not None

    models = await client.models.list()
    assert sorted(m.id for m in models.data) == ["emb", "m"]

    emb = await client.embeddings.create(model="emb", input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0

    try:
        await client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}]
        )
    except openai.NotFoundError as exc:
        assert "nope" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("unknown model must be a 404")
    await client.close()


async def test_error_statuses_and_shapes(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    cfg = _config(mock_upstream)
    cfg["server"] = {"auth": "off", "max_body_bytes": 2000}
    gw = await start_gateway(cfg)
    c = gw.client
    cases = [
        (await c.post("/v1/chat/completions", content=b"{not json",
                      headers={"content-type": "application/json"}), 400, "invalid_json"),
        (await c.post("/v1/chat/completions", json=[1, 2]), 400, "invalid_json"),
        (await c.post("/v1/chat/completions", json={"messages": []}), 400, "missing_field"),
        (await c.post("/v1/chat/completions", json={"model": "m"}), 400, "missing_field"),
        (await c.post("/v1/chat/completions",
                      json={"model": "m", "messages": "hi"}), 400, "invalid_type"),
        (await c.post("/v1/chat/completions",
                      json={"model": "zzz", "messages": [{"role": "user", "content": "x"}]}),
         404, "model_not_found"),
        (await c.post("/v1/chat/completions",
                      json={"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}),
         413, "request_too_large"),
        (await c.post("/v1/embeddings", json={"model": "emb"}), 400, "missing_field"),
        (await c.post("/v1/embeddings", json={"model": "m", "input": "x"}), 400, "wrong_surface"),
        (await c.get("/v1/nothing"), 404, "not_found"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, (status, response.text)
        error = response.json()["error"]
        assert error["code"] == code, response.text
        assert error["message"] and error["type"]
        assert "x-request-id" in response.headers
        assert "Traceback" not in response.text


async def test_server_guards_from_the_config(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    """request_read_s and max_header_bytes reach the HTTP server: a slow-loris request gets 408,
    an oversized header block 431, and a normal request on the same gateway is served."""
    cfg = _config(mock_upstream)
    cfg["server"] = {"auth": "off", "request_read_s": 0.3, "max_header_bytes": 2048,
                     "write_timeout_s": 5}
    gw = await start_gateway(cfg)
    assert (gw.gateway.config.server.write_timeout_s, gw.gateway.config.server.max_header_bytes
            ) == (5, 2048)
    host, port = gw.address.rsplit(":", 1)

    async def exchange(data: bytes) -> bytes:
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(data)
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
        await stream.aclose()
        return answer

    with trio.fail_after(10):
        started = trio.current_time()
        slow = await exchange(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")  # never ends
        assert slow.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in slow
        assert trio.current_time() - started < 5
        big = await exchange(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"y" * 3000
                             + b"\r\n\r\n")
        assert big.startswith(b"HTTP/1.1 431")
    assert (await gw.chat("hi")).status_code == 200


async def test_virtual_keys(start_gateway: StartGateway, mock_upstream: MockUpstream) -> None:
    key = "sk-sb-test-key-123"
    cfg = _config(mock_upstream)
    cfg["server"] = {"auth": "keys"}
    cfg["keys"] = [{"id": "k1", "key_sha256": hashlib.sha256(key.encode()).hexdigest(),
                    "user": "alice", "team": "research", "tier": "pro", "tags": ["beta"]}]
    gw = await start_gateway(cfg)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    missing = await gw.client.post("/v1/chat/completions", json=body)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    wrong = await gw.client.post("/v1/chat/completions", json=body,
                                 headers={"authorization": "Bearer sk-wrong"})
    assert wrong.status_code == 401
    ok = await gw.client.post("/v1/chat/completions", json=body,
                              headers={"authorization": f"Bearer {key}"})
    assert ok.status_code == 200
    models = await gw.client.get("/v1/models")
    assert models.status_code == 401
    await gw.stop()
    await trio.sleep(0.2)
    events = [orjson.loads(x) for x in (gw.data_dir / "usage.jsonl").read_bytes().splitlines()]
    assert events[-1]["principal"] == {"key_id": "k1", "user": "alice", "team": "research",
                                       "tier": "pro", "tags": ["beta"]}
    assert key not in (gw.data_dir / "usage.jsonl").read_text()


async def test_client_leaving_while_a_stream_opens_frees_the_upstream_connection(
    start_gateway: StartGateway, start_mock: StartMock
) -> None:
    """A disconnect after the upstream's empty opening chunk but before any content must close
    the upstream request and free its pool slot (max_connections: 1 here, so a leak would turn
    the next request into a 504), and still record the request."""
    slow = await start_mock(tokens_per_second=2.0)  # the role chunk now, content much later
    cfg = _config(slow)
    cfg["providers"][0]["max_connections"] = 1
    gw = await start_gateway(cfg)
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "slow"}]}
    with trio.move_on_after(0.3):
        async with gw.client.stream("POST", "/v1/chat/completions", json=body) as r:
            async for _ in r.aiter_bytes():
                pass
    with trio.fail_after(5):
        r = await gw.chat("quick one", max_tokens=1)
    assert r.status_code == 200, r.text
    await gw.stop()
    await trio.sleep(0.2)
    events = [orjson.loads(x) for x in (gw.data_dir / "usage.jsonl").read_bytes().splitlines()]
    left = [e for e in events if e.get("client_disconnected")]
    assert len(left) == 1 and left[0]["status"] == 499


async def test_bad_stream_options_and_token_limits_are_400s(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(_config(mock_upstream))
    msgs = [{"role": "user", "content": "x"}]
    bad = [
        ({"stream": True, "stream_options": "x"}, "stream_options"),
        ({"max_tokens": None, "max_completion_tokens": -100}, "max_completion_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
    ]
    for extra, param in bad:
        body = {"model": "m", "messages": msgs, **extra}
        r = await gw.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == param
    assert mock_upstream.received() == []


async def test_stream_ends_with_its_cost_as_an_sse_comment(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(_config(mock_upstream))
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with gw.client.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = [line async for line in r.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert lines[-2].startswith(": x-sbactor-cost-usd=")
    assert float(lines[-2].split("=")[1]) > 0
