"""The served process end to end: `python -m sbactor serve` in a subprocess, signals, exit codes.

The upstream is a real mock server in the test process with a fixed latency, so requests are
provably in flight (the mock has recorded them, the answers are not sent yet) when SIGTERM lands.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import httpx2
import orjson
import trio
import yaml

from sbactor.config import ServerConfig
from tests.conftest import REPO, MockUpstream, StartMock

SEED = "22" * 32
IN_FLIGHT = 6


def gateway_config(upstream: MockUpstream) -> dict[str, Any]:
    return {
        "server": {"auth": "off", "shutdown_grace_s": 30},
        "providers": [{"name": "up", "type": "openai", "base_url": upstream.openai_base,
                       "api_key": "test"}],
        "models": [{"name": "m", "deployments": [{"provider": "up", "model": "up-m",
                                                  "price": {"input_per_mtok": 1,
                                                            "output_per_mtok": 2}}]}],
        "usage_sinks": [
            {"type": "ledger", "path": "ledger", "signing_seed_hex": SEED},
            {"type": "jsonl", "path": "usage.jsonl"},
        ],
    }


@attrs.define(eq=False)
class Served:
    process: trio.Process
    address: str
    stdout_lines: list[str]
    stderr: bytearray

    def logs(self) -> list[dict[str, Any]]:
        """The structured JSON log lines written to stderr so far."""
        out = []
        for line in bytes(self.stderr).splitlines():
            if line.startswith(b"{"):
                out.append(orjson.loads(line))
        return out

    @property
    def url(self) -> str:
        return f"http://{self.address}"


def write_config(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "sbactor.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def serve(config_path: Path, data_dir: Path, nursery: trio.Nursery) -> Served:
    """Start the gateway and wait for its "listening" line (which names the bound port)."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "sbactor", "serve", "--config", str(config_path),
         "--bind", "127.0.0.1:0", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
    )
    assert process.stdout is not None and process.stderr is not None
    stderr = bytearray()

    async def collect_stderr() -> None:
        assert process.stderr is not None
        while chunk := await process.stderr.receive_some():
            stderr.extend(chunk)

    nursery.start_soon(collect_stderr)
    lines: list[str] = []
    buffer = b""
    with trio.fail_after(30):
        while True:
            chunk = await process.stdout.receive_some()
            assert chunk, f"gateway exited before listening: {lines}"
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            lines += [c.decode() for c in complete]
            found = [ln for ln in lines if ln.startswith("sbactor listening on http://")]
            if found:
                address = found[0].removeprefix("sbactor listening on http://")
                break

    async def drain_stdout() -> None:  # keep the pipe from filling up
        assert process.stdout is not None
        while await process.stdout.receive_some():
            pass

    nursery.start_soon(drain_stdout)
    return Served(process, address, lines, stderr)


async def wait_exit(process: trio.Process) -> int:
    with trio.fail_after(30):
        return await process.wait()


async def until(predicate: Any) -> None:
    """Poll a condition the test cannot be notified of (the other process's progress)."""
    with trio.fail_after(15):
        while not predicate():  # noqa: ASYNC110 - the state lives in another process
            await trio.sleep(0.01)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sbactor", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


async def test_sigterm_completes_in_flight_requests_and_records_all(
    start_mock: StartMock, tmp_path: Path, nursery: trio.Nursery
) -> None:
    mock = await start_mock(latency_ms=500)
    data_dir = tmp_path / "data"
    served = await serve(write_config(tmp_path, gateway_config(mock)), data_dir, nursery)
    results: dict[int, httpx2.Response] = {}

    async with httpx2.AsyncClient(base_url=served.url, timeout=30) as client:
        r = await client.get("/readyz")
        assert r.status_code == 200 and r.json() == {"ready": True}

        async def ask(i: int) -> None:
            results[i] = await client.post("/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": f"request {i}"}],
            }, headers={"x-request-id": f"req-{i}"})

        async with trio.open_nursery() as requests:
            for i in range(IN_FLIGHT):
                requests.start_soon(ask, i)
            # every request reached the upstream, none has been answered yet
            await until(lambda: len(mock.received()) == IN_FLIGHT)
            assert not results
            served.process.send_signal(signal.SIGTERM)

    assert await wait_exit(served.process) == 0
    assert sorted(results) == list(range(IN_FLIGHT))
    for i, r in results.items():
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
        assert r.headers["x-request-id"] == f"req-{i}"

    # nothing dropped: one usage event per request in the jsonl sink and in the ledger
    events = [orjson.loads(ln) for ln in (data_dir / "usage.jsonl").read_bytes().splitlines()]
    assert sorted(e["request_id"] for e in events) == [f"req-{i}" for i in range(IN_FLIGHT)]
    assert all(e["kind"] == "completion" for e in events)
    verify = run_cli("ledger", "verify", str(data_dir / "ledger"), "--signing-seed-hex", SEED,
                     "--format", "json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    report = json.loads(verify.stdout)
    assert report["entries"] == IN_FLIGHT
    assert report["checkpoint_checked"]  # the final checkpoint was written on shutdown


async def test_second_signal_forces_exit(
    start_mock: StartMock, tmp_path: Path, nursery: trio.Nursery
) -> None:
    mock = await start_mock()
    served = await serve(write_config(tmp_path, gateway_config(mock)), tmp_path / "d", nursery)
    async with httpx2.AsyncClient(base_url=served.url, timeout=60) as client:
        async with trio.open_nursery() as requests:
            body = {"model": "m",
                    "messages": [{"role": "user", "content": "slow [mock:latency=60000]"}]}
            outcome: list[str] = []

            async def doomed() -> None:
                try:
                    await client.post("/v1/chat/completions", json=body)
                    outcome.append("answered")
                except httpx2.TransportError:
                    outcome.append("dropped")  # the forced exit cut the connection

            requests.start_soon(doomed)
            await until(lambda: len(mock.received()) == 1)
            served.process.send_signal(signal.SIGTERM)  # graceful: would wait for the request
            await until(lambda: any(e["msg"] == "shutdown requested" for e in served.logs()))
            (event,) = [e for e in served.logs() if e["msg"] == "shutdown requested"]
            assert event["signal"] == "SIGTERM" and event["in_flight"] == 1
            assert served.process.poll() is None  # still draining
            served.process.send_signal(signal.SIGTERM)
            code = await wait_exit(served.process)
    assert code == 130  # non-zero: the drain was skipped
    assert outcome == ["dropped"]
    assert any(e["msg"] == "second signal: exiting without draining" for e in served.logs())


async def test_port_in_use_is_one_line_exit_2(tmp_path: Path, mock_upstream: MockUpstream) -> None:
    config = write_config(tmp_path, gateway_config(mock_upstream))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli("serve", "--config", str(config), "--bind", f"127.0.0.1:{port}",
                    "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"sbactor: cannot bind 127.0.0.1:{port}: address already in use"
    ]
    assert "sbactor listening" not in r.stdout


async def test_unusable_data_dir_exit_2(tmp_path: Path, mock_upstream: MockUpstream) -> None:
    config = write_config(tmp_path, gateway_config(mock_upstream))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = run_cli("serve", "--config", str(config), "--bind", "127.0.0.1:0",
                "--data-dir", str(blocker / "data"))
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"sbactor: data dir {blocker / 'data'} is not usable:")
    assert "Traceback" not in r.stderr


async def test_bad_config_exit_2_lists_problems(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"bind": "nowhere", "colour": "red"},
        "providers": [{"name": "p", "type": "opnai"}],
    }))
    r = run_cli("serve", "--config", str(config), "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 2
    server_keys = ", ".join(sorted(a.name for a in attrs.fields(ServerConfig)))
    assert r.stderr.strip().splitlines() == [
        f"sbactor: {config}: 3 problem(s) in the config:",
        "  server.bind: expected HOST:PORT, got 'nowhere'",
        f"  server.colour: unknown key (allowed: {server_keys})",
        "  providers[0]: type: unknown type 'opnai' (known: anthropic, mock, openai)",
    ]
    assert not (tmp_path / "d").exists()  # nothing started


async def test_sigint_is_graceful_too(
    mock_upstream: MockUpstream, tmp_path: Path, nursery: trio.Nursery
) -> None:
    data_dir = tmp_path / "data"
    served = await serve(write_config(tmp_path, gateway_config(mock_upstream)), data_dir, nursery)
    async with httpx2.AsyncClient(base_url=served.url, timeout=30) as client:
        r = await client.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
    served.process.send_signal(signal.SIGINT)
    assert await wait_exit(served.process) == 0
    assert len((data_dir / "usage.jsonl").read_bytes().splitlines()) == 1
    verify = run_cli("ledger", "verify", str(data_dir / "ledger"), "--signing-seed-hex", SEED)
    assert verify.returncode == 0, verify.stdout + verify.stderr
