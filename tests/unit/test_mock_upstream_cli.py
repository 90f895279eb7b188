"""``mock-upstream`` as a real process: prints where it listens, exits 0 on SIGTERM."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys

import httpx2
import pytest
import trio

from sbactor.upstream_mock.cli import add_parser, run, settings_from_args


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["mock-upstream", *argv])


def test_flags_to_settings() -> None:
    s = settings_from_args(parse("--latency-ms", "5", "--fail-rate", "0.1", "--seed", "3",
                                 "--fail-status", "503", "--refusal-rate", "0.2"))
    assert (s.latency_ms, s.fail_rate, s.fail_status, s.refusal_rate, s.seed) == (
        5, 0.1, 503, 0.2, 3)
    args = parse("--fail-rate", "3")
    assert args.func is run
    with pytest.raises(ValueError, match="fail-rate"):
        settings_from_args(args)


def test_bad_flag_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(parse("--fail-status", "200")) == 2
    assert "fail-status" in capsys.readouterr().err


async def test_process_serves_and_stops_on_sigterm() -> None:
    cmd = [sys.executable, "-m", "sbactor.upstream_mock.cli", "mock-upstream",
           "--bind", "127.0.0.1:0"]
    proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        with trio.fail_after(15):
            line = b""
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some(1)
        assert line.startswith(b"mock-upstream listening on http://127.0.0.1:")
        url = line.decode().split()[-1]
        async with httpx2.AsyncClient() as c:
            assert (await c.get(url + "/healthz")).status_code == 200
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
