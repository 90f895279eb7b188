"""examples/quickstart runs as documented: its config loads and serves through the openai SDK."""

from __future__ import annotations

import openai
import yaml

from sbactor.config import parse_config
from tests.conftest import REPO, MockUpstream, StartGateway

EXAMPLE = REPO / "examples" / "quickstart" / "sbactor.yaml"


async def test_quickstart_example_serves_with_its_key(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    config = parse_config(
        yaml.safe_load(EXAMPLE.read_text()), env={"MOCK_UPSTREAM_URL": mock_upstream.openai_base}
    )
    gw = await start_gateway(config)
    client = openai.AsyncOpenAI(
        base_url=f"{gw.url}/v1", api_key="sk-sb-quickstart-alice", max_retries=0
    )
    reply = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}]
    )
    assert reply.parse().choices[0].message.content
    assert reply.headers["x-sbactor-provider"] == "upstream"
    emb = await client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert emb.data[0].embedding
    bad = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="sk-wrong", max_retries=0)
    try:
        await bad.models.list()
    except openai.AuthenticationError:
        pass
    else:  # pragma: no cover
        raise AssertionError("a wrong key must be refused")
    admin = await gw.client.get("/admin/actors", headers={"x-admin-key": "change-me-admin"})
    assert admin.status_code == 200
    await client.close()
    await bad.close()
