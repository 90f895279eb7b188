"""Shared fixtures: a real mock upstream and a real gateway, both on loopback port 0.

The gateway runs in-process (``run_gateway`` in the test's nursery) so tests can also look at
its actors; the lifecycle tests start it as a subprocess to exercise signals and exit codes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx2
import pytest
import trio
import yaml

from sbactor.config import Config, parse_config
from sbactor.gateway import Gateway
from sbactor.server import run_gateway
from sbactor.upstream_mock.scenarios import Settings
from sbactor.upstream_mock.server import MockUpstreamApp, serve_mock

REPO = Path(__file__).resolve().parent.parent


@attrs.define(eq=False)
class MockUpstream:
    address: str
    app: MockUpstreamApp

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def openai_base(self) -> str:
        return f"http://{self.address}/v1"

    def received(self) -> list[dict[str, Any]]:
        """Bodies the upstream received, oldest first."""
        return [r["body"] for r in self.app.recorded]


@attrs.define(eq=False)
class RunningGateway:
    gateway: Gateway
    address: str
    shutdown: trio.Event
    client: httpx2.AsyncClient
    data_dir: Path

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    async def chat(self, content: str, *, model: str = "m", **extra: Any) -> httpx2.Response:
        headers = extra.pop("headers", None)
        body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
        return await self.client.post("/v1/chat/completions", json=body, headers=headers)

    async def stop(self) -> None:
        self.shutdown.set()


StartMock = Callable[..., Awaitable[MockUpstream]]
StartGateway = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def start_mock(nursery: trio.Nursery) -> StartMock:
    async def start(**settings: Any) -> MockUpstream:
        app = MockUpstreamApp(Settings(**settings))
        address = await nursery.start(
            lambda task_status: serve_mock("127.0.0.1:0", app=app, quiet=True, task_status=task_status)
        )
        return MockUpstream(address, app)

    return start


@pytest.fixture
async def mock_upstream(start_mock: StartMock) -> MockUpstream:
    return await start_mock()


def as_config(config: str | dict[str, Any] | Config, **replace: Any) -> Config:
    if isinstance(config, Config):
        return config
    data = yaml.safe_load(config) if isinstance(config, str) else config
    return parse_config(data, env={})


@pytest.fixture
async def start_gateway(
    nursery: trio.Nursery, tmp_path: Path
) -> AsyncIterator[StartGateway]:
    clients: list[httpx2.AsyncClient] = []
    count = 0

    async def start(config: str | dict[str, Any] | Config, *, data_dir: Path | None = None) -> RunningGateway:
        nonlocal count
        count += 1
        cfg = as_config(config)
        directory = data_dir or tmp_path / f"gw{count}"
        shutdown = trio.Event()
        gateway, address = await nursery.start(
            lambda task_status: run_gateway(
                cfg, directory, "127.0.0.1:0", shutdown=shutdown, task_status=task_status
            )
        )
        client = httpx2.AsyncClient(base_url=f"http://{address}", timeout=30)
        clients.append(client)
        return RunningGateway(gateway, address, shutdown, client, directory)

    yield start
    for client in clients:
        await client.aclose()


def mock_config(upstream: MockUpstream, **sections: Any) -> dict[str, Any]:
    """A minimal config: one openai-type provider pointing at the mock upstream, model ``m``."""
    config: dict[str, Any] = {
        "server": {"auth": "off"},
        "providers": [{"name": "up", "type": "openai", "base_url": upstream.openai_base,
                       "api_key": "test"}],
        "models": [
            {"name": "m", "deployments": [{"provider": "up", "model": "up-m",
                                          "price": {"input_per_mtok": 1.0,
                                                    "output_per_mtok": 2.0}}]},
        ],
    }
    config.update(sections)
    return config
