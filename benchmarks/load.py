"""Load benchmark: the gateway side by side with the direct upstream (and LiteLLM, when present).

Starts `sbactor mock-upstream` and the gateway(s) as subprocesses on loopback, then drives them
with bounded, self-stopping trio + httpx2 client processes (closed loop: N tasks, each sends its
next request when the previous one is answered). Scenarios:

  1 direct       straight to the mock upstream (the floor; also the client's own ceiling)
  2 passthrough  gateway, benchmarks/configs/passthrough.yaml (no capability on)
  3 all-on       gateway, benchmarks/configs/all-on.yaml (signed ledger, guardrail mesh, CEL
                 policy, outcome-aware routing over two deployments, a budget with soft landing
                 that never triggers, resilience)
  4 litellm      LiteLLM proxy, one worker, same model list against the same mock (only when a
                 `litellm` executable is found in --litellm-venv or on PATH)

Scenarios are interleaved (A B C D, then D C B A, …) in rounds so machine drift cancels; each
table shows the rounds merged. Progress goes to stderr, tables to stdout, and everything to
benchmarks/results/<timestamp>.json.

    python benchmarks/load.py                                  # defaults: ~2-3 minutes
    python benchmarks/load.py --duration 5 --rounds 3 --levels 1,32,128 --modes json,stream
    python benchmarks/load.py --litellm-venv /work/litellm-venv
    python benchmarks/load.py --soak        # 10 minutes of all-on at c=32: RSS flatness report
    python benchmarks/load.py --overload    # open loop at 4x saturation: 503/429 vs timeouts
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = 1  # VmRSS is already in kB
MODEL = "gpt-4o-mini"
PROMPT = "Summarise the quarterly planning notes in two sentences for the team newsletter."


# --------------------------------------------------------------------------------------------
# Client worker (runs in its own process: `load.py --worker`, one JSON command per stdin line)
# --------------------------------------------------------------------------------------------

def worker_main() -> None:
    from urllib.parse import urlsplit

    import httptools
    import httpx2
    import orjson
    import trio

    clients: dict[str, Any] = {}

    def client_for(base: str, timeout: float) -> Any:
        key = f"{base} {timeout}"
        if key not in clients:
            limits = httpx2.Limits(max_connections=4096, max_keepalive_connections=4096)
            clients[key] = httpx2.AsyncClient(limits=limits, trust_env=False,
                                              timeout=httpx2.Timeout(timeout, connect=timeout))
        return clients[key]

    async def run(cmd: dict[str, Any]) -> dict[str, Any]:
        client = client_for(cmd["url"], cmd["timeout"])
        url = cmd["url"] + "/chat/completions"
        stream = cmd["mode"] == "stream"
        headers = {"content-type": "application/json", "authorization": "Bearer bench"}
        unique = cmd.get("unique", True)
        tag = cmd.get("tag", 0)
        counter = 0
        lat: list[float] = []
        ttfb: list[float] = []
        statuses: dict[str, int] = {}
        timeouts = 0
        failures = 0
        failure_kinds: dict[str, int] = {}
        dropped = 0
        sent = 0
        done_all = 0

        def body() -> bytes:
            nonlocal counter
            counter += 1
            text = f"#{tag}-{counter} {PROMPT}" if unique else PROMPT
            doc: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
            if stream:
                doc["stream"] = True
            return orjson.dumps(doc)

        now = trio.current_time
        measure_from = now() + cmd["warmup"]
        deadline = measure_from + cmd["duration"]

        def record(t0: float, status: int, first: float | None) -> None:
            nonlocal done_all
            t1 = now()
            done_all += 1
            # a request counts when it completes inside the measured window (whenever it began)
            if not measure_from <= t1 <= deadline:
                return
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status == 200:
                lat.append((t1 - t0) * 1000.0)
                if first is not None:
                    ttfb.append((first - t0) * 1000.0)

        # The open loop's client: raw sockets + httptools. httpx2 costs ~0.5 ms of client CPU
        # per request (more when it opens connections), so on 2 shared cores it could not offer
        # 4x the gateway's saturation: the client melted first and its own backlog showed up as
        # "timeouts". This one costs a fraction of that; like a crowd of real clients, it opens
        # a new connection whenever all of its keep-alive ones are busy.
        split = urlsplit(url)
        target = (split.hostname or "127.0.0.1", split.port or 80)
        request_head = (f"POST {split.path} HTTP/1.1\r\nhost: {target[0]}:{target[1]}\r\n"
                        "content-type: application/json\r\nauthorization: Bearer bench\r\n"
                        "content-length: ").encode()
        idle: list[trio.SocketStream] = []

        class _Reply:
            done = False

            def on_message_complete(self) -> None:
                self.done = True

        async def one_raw() -> None:
            nonlocal timeouts, failures, sent
            t0 = now()
            if t0 >= measure_from:
                sent += 1
            payload = body()
            conn = idle.pop() if idle else None
            reply = _Reply()
            parser = httptools.HttpResponseParser(reply)
            try:
                with trio.move_on_after(cmd["timeout"]) as scope:
                    if conn is None:
                        conn = await trio.open_tcp_stream(*target)
                    await conn.send_all(request_head + b"%d\r\n\r\n" % len(payload) + payload)
                    while not reply.done:
                        data = await conn.receive_some(65536)
                        if not data:
                            raise trio.BrokenResourceError("closed before the response ended")
                        parser.feed_data(data)
            except (OSError, trio.BrokenResourceError, httptools.HttpParserError) as exc:
                if measure_from <= now() <= deadline:
                    failures += 1
                    kind = f"{type(exc).__name__}: {exc}"[:60]
                    failure_kinds[kind] = failure_kinds.get(kind, 0) + 1
                if conn is not None:
                    with trio.CancelScope(shield=True):
                        await conn.aclose()
                return
            if scope.cancelled_caught:
                if measure_from <= now() <= deadline + cmd["timeout"]:
                    timeouts += 1
                if conn is not None:
                    with trio.CancelScope(shield=True):
                        await conn.aclose()
                return
            assert conn is not None
            if parser.should_keep_alive():
                idle.append(conn)
            else:
                with trio.CancelScope(shield=True):
                    await conn.aclose()
            record(t0, parser.get_status_code(), None)

        async def one() -> None:
            nonlocal timeouts, failures, sent
            t0 = now()
            if t0 >= measure_from:
                sent += 1
            first = None
            status = 0
            try:
                if stream:
                    async with client.stream("POST", url, content=body(), headers=headers) as r:
                        status = r.status_code
                        async for _chunk in r.aiter_raw():
                            if first is None:
                                first = now()
                else:
                    r = await client.post(url, content=body(), headers=headers)
                    status = r.status_code
            except httpx2.TimeoutException:
                if measure_from <= now() <= deadline + cmd["timeout"]:
                    timeouts += 1
                return
            except httpx2.HTTPError:
                if measure_from <= now() <= deadline:
                    failures += 1
                return
            record(t0, status, first)

        cpu0 = time.process_time()
        started = now()
        if cmd.get("rate"):  # open loop: start requests on a schedule, whatever the answers do
            rate = float(cmd["rate"])
            cap = int(cmd.get("max_outstanding", 4096))
            outstanding = 0

            async def tracked() -> None:
                nonlocal outstanding
                outstanding += 1
                try:
                    await one_raw()
                finally:
                    outstanding -= 1

            async with trio.open_nursery() as nursery:
                launched = 0
                while now() < deadline:
                    due = int((now() - started) * rate)
                    while launched < due:
                        launched += 1
                        if outstanding >= cap:
                            dropped += 1
                            continue
                        nursery.start_soon(tracked)
                    await trio.sleep(0.001)
        else:
            async def loop() -> None:
                while now() < deadline:
                    await one()

            async with trio.open_nursery() as nursery:
                for _ in range(cmd["concurrency"]):
                    nursery.start_soon(loop)
        ended = now()
        return {"lat": [round(x, 3) for x in lat], "ttfb": [round(x, 3) for x in ttfb],
                "statuses": statuses, "timeouts": timeouts, "failures": failures,
                "failure_kinds": failure_kinds,
                "dropped": dropped, "sent": sent, "done_all": done_all,
                "elapsed": max(1e-9, min(ended, deadline) - max(started, measure_from)),
                "tail_s": max(0.0, ended - deadline),
                "client_cpu_s": time.process_time() - cpu0}

    async def main() -> None:
        stdin = trio.lowlevel.FdStream(os.dup(0))
        buf = b""
        print(json.dumps({"ready": True}), flush=True)
        while True:
            while b"\n" not in buf:
                data = await stdin.receive_some(65536)
                if not data:
                    return
                buf += data
            line, buf = buf.split(b"\n", 1)
            cmd = json.loads(line)
            if cmd.get("quit"):
                return
            result = await run(cmd)
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()

    trio.run(main)


# --------------------------------------------------------------------------------------------
# Orchestrator (plain blocking code: subprocesses, /proc sampling, tables)
# --------------------------------------------------------------------------------------------

TTY = sys.stderr.isatty()


def progress(msg: str) -> None:
    if TTY:
        print(f"\r\x1b[K{msg}", end="", file=sys.stderr, flush=True)
    else:
        print(msg, file=sys.stderr, flush=True)


def log(msg: str) -> None:
    print(f"\r\x1b[K{msg}" if TTY else msg, file=sys.stderr, flush=True)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def descendants(pid: int) -> list[int]:
    """pid and all its descendants (LiteLLM may fork; sbactor and the mock do not)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    return total


def rss_kb(pids: list[int], field: str = "VmRSS") -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_line(proc: subprocess.Popen[bytes], timeout: float, what: str) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(left):
            raise RuntimeError(f"{what}: no output within {timeout:.0f}s")
        ch = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(1)
        if not ch:
            raise RuntimeError(f"{what}: exited with status {proc.wait()}")
        line += ch
    sel.close()
    return line.decode()


def drain(stream: Any, path: Path) -> None:
    def pump() -> None:
        with path.open("ab") as f:
            for chunk in iter(lambda: stream.read1(65536), b""):
                f.write(chunk)
    threading.Thread(target=pump, daemon=True).start()


class Server:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], url: str, log_path: Path):
        self.name, self.proc, self.url, self.log_path = name, proc, url, log_path

    def pids(self) -> list[int]:
        return descendants(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_mock(tmp: Path, latency_ms: float) -> Server:
    log_path = tmp / "mock.log"
    cmd = [sys.executable, "-m", "sbactor", "mock-upstream", "--bind", "127.0.0.1:0",
           "--latency-ms", str(latency_ms)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=log_path.open("wb"))
    line = read_line(proc, 30, "mock-upstream")
    drain(proc.stdout, log_path)
    base = line.strip().split()[-1]  # "mock-upstream listening on http://HOST:PORT"
    return Server("mock", proc, base + "/v1", log_path)


def start_gateway(name: str, config: Path, tmp: Path, mock_url: str) -> Server:
    data_dir = tmp / f"data-{name}"
    log_path = tmp / f"{name}.log"
    env = {**os.environ, "MOCK_UPSTREAM_URL": mock_url}
    cmd = [sys.executable, "-m", "sbactor", "serve", "--config", str(config),
           "--bind", "127.0.0.1:0", "--data-dir", str(data_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=log_path.open("wb"))
    line = read_line(proc, 60, f"sbactor serve ({name}); see {log_path}")
    drain(proc.stdout, log_path)
    base = line.strip().split()[-1]  # "sbactor listening on http://HOST:PORT"
    return Server(name, proc, base + "/v1", log_path)


def gateway_counters(server: Server, prefix: str = "sbactor_http_") -> dict[str, float]:
    """The gateway's own counters from /metrics: what it says it did, beside what the
    client saw."""
    url = server.url.removesuffix("/v1") + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    except OSError as exc:
        return {"error": str(exc)}  # type: ignore[dict-item]
    counters = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, _, value = line.rpartition(" ")
            counters[name.removeprefix(prefix).removesuffix("_total")] = float(value)
    return counters


def find_litellm(venv: str | None) -> str | None:
    if venv:
        exe = Path(venv) / "bin" / "litellm"
        return str(exe) if exe.exists() else None
    return shutil.which("litellm")


def start_litellm(exe: str, tmp: Path, mock_url: str) -> Server:
    """LiteLLM proxy with the same model list as all-on/passthrough, one worker."""
    config = tmp / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {mock_url}\n"
        "      api_key: bench\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  drop_params: true\n"
    )
    port = free_port()
    log_path = tmp / "litellm.log"
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False",
           "DISABLE_SCHEMA_UPDATE": "true", "LITELLM_MODE": "PRODUCTION",
           # our gateways run with auth off; the equivalent here is no master key
           "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"}
    proc = subprocess.Popen([exe, "--config", str(config), "--host", "127.0.0.1", "--port",
                             str(port), "--num_workers", "1"], cwd=tmp, env=env,
                            stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"litellm exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(base + "/health/liveliness", timeout=2) as r:
                if r.status == 200:
                    return Server("litellm", proc, base + "/v1", log_path)
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"litellm did not become live within 180s; see {log_path}")


class Clients:
    """N long-lived client worker processes; a command runs on all of them at once."""

    def __init__(self, n: int):
        self.procs = [subprocess.Popen([sys.executable, __file__, "--worker"], cwd=REPO,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                      for _ in range(n)]
        for p in self.procs:
            read_line(p, 60, "client worker")

    def run(self, cmd: dict[str, Any], split: list[dict[str, Any]],
            sample: Any = None) -> list[dict[str, Any]]:
        used = self.procs[: len(split)]
        for i, (p, extra) in enumerate(zip(used, split, strict=True)):
            assert p.stdin is not None
            p.stdin.write((json.dumps({**cmd, **extra, "tag": i}) + "\n").encode())
            p.stdin.flush()
        limit = cmd["warmup"] + cmd["duration"] + cmd["timeout"] + 60
        out = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample, args=(stop,), daemon=True) if sample else None
        if sampler:
            sampler.start()
        try:
            for p in used:
                out.append(json.loads(read_line(p, limit, "client worker")))
        finally:
            stop.set()
            if sampler:
                sampler.join()
        return out

    def cpu_pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        for p in self.procs:
            try:
                assert p.stdin is not None
                p.stdin.write(b'{"quit": true}\n')
                p.stdin.flush()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def split_concurrency(c: int, workers: int) -> list[dict[str, Any]]:
    n = max(1, min(workers, c))
    return [{"concurrency": c // n + (1 if i < c % n else 0)} for i in range(n)]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def measure(clients: Clients, server: Server, cmd: dict[str, Any],
            split: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell: run the clients against ``server``; sample its RSS while they run."""
    pids = server.pids()
    peak = [rss_kb(pids)]

    def sample(stop: threading.Event) -> None:
        while not stop.wait(0.2):
            peak.append(rss_kb(pids))

    cpu0 = cpu_seconds(pids)
    t0 = time.monotonic()
    results = clients.run({**cmd, "url": server.url}, split, sample)
    wall = time.monotonic() - t0
    cpu1 = cpu_seconds(pids)
    lat = [x for r in results for x in r["lat"]]
    ttfb = [x for r in results for x in r["ttfb"]]
    statuses: dict[str, int] = {}
    for r in results:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    elapsed = max(r["elapsed"] for r in results)
    return {
        "n": len(lat), "elapsed": elapsed, "lat": lat, "ttfb": ttfb, "statuses": statuses,
        "errors": sum(v for k, v in statuses.items() if k != "200")
        + sum(r["timeouts"] + r["failures"] for r in results),
        "timeouts": sum(r["timeouts"] for r in results),
        "failures": sum(r["failures"] for r in results),
        "failure_kinds": {k: sum(r.get("failure_kinds", {}).get(k, 0) for r in results)
                          for r0 in results for k in r0.get("failure_kinds", {})},
        "dropped": sum(r["dropped"] for r in results),
        "sent": sum(r["sent"] for r in results),
        "server_cpu_s": cpu1 - cpu0, "wall_s": wall,
        "done_all": sum(r["done_all"] for r in results),
        "server_rss_peak_kb": max(peak), "server_hwm_kb": rss_kb(pids, "VmHWM"),
        "client_cpu_s": sum(r["client_cpu_s"] for r in results),
        "loadavg": loadavg(),
    }


def merge(cells: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [x for c in cells for x in c["lat"]]
    ttfb = [x for c in cells for x in c["ttfb"]]
    elapsed = sum(c["elapsed"] for c in cells)
    cpu = sum(c["server_cpu_s"] for c in cells)
    wall = sum(c["wall_s"] for c in cells)
    done_all = sum(c["done_all"] for c in cells)
    return {
        "requests": len(lat), "rps": len(lat) / elapsed if elapsed else 0.0,
        "p50": pct(lat, 0.50), "p95": pct(lat, 0.95), "p99": pct(lat, 0.99),
        "ttfb_p50": pct(ttfb, 0.50) if ttfb else None,
        "errors": sum(c["errors"] for c in cells),
        "server_cpu_s": cpu, "server_cpu_pct": 100.0 * cpu / wall if wall else 0.0,
        "server_cpu_ms_per_req": 1000.0 * cpu / done_all if done_all else None,
        "server_rss_peak_mb": max(c["server_rss_peak_kb"] for c in cells) / 1024,
        "client_cpu_pct": 100.0 * sum(c["client_cpu_s"] for c in cells) / wall
        if wall else 0.0,
    }


def fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return format(v, spec)


def print_table(title: str, rows: list[tuple[str, int, str, dict[str, Any]]]) -> None:
    print(f"\n{title}")
    print(f"{'scenario':<12} {'mode':<6} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'p99 ms':>8} {'errors':>6} {'srv CPU s':>9} {'srv CPU%':>8} {'CPU ms/req':>10} "
          f"{'peak RSS MB':>11} {'client CPU%':>11}")
    for name, c, mode, m in rows:
        print(f"{name:<12} {mode:<6} {c:>4} {fmt(m['rps'], '8.0f')} {fmt(m['p50'], '8.2f')} "
              f"{fmt(m['p95'], '8.2f')} {fmt(m['p99'], '8.2f')} {m['errors']:>6} "
              f"{fmt(m['server_cpu_s'], '9.1f')} {fmt(m['server_cpu_pct'], '8.0f')} "
              f"{fmt(m['server_cpu_ms_per_req'], '10.2f')} {fmt(m['server_rss_peak_mb'], '11.1f')} "
              f"{fmt(m['client_cpu_pct'], '11.0f')}")


def ratios(agg: dict[tuple[str, str, int], dict[str, Any]], levels: list[int],
           modes: list[str]) -> list[dict[str, Any]]:
    out = []
    for mode in modes:
        for c in levels:
            d = agg.get(("direct", mode, c))
            p = agg.get(("passthrough", mode, c))
            a = agg.get(("all-on", mode, c))
            lt = agg.get(("litellm", mode, c))
            row: dict[str, Any] = {"mode": mode, "conc": c}
            if a and d:
                row["allon_added_p50_ms"] = a["p50"] - d["p50"]
                row["allon_added_p99_ms"] = a["p99"] - d["p99"]
            if p and d:
                row["pass_added_p50_ms"] = p["p50"] - d["p50"]
            if a and p and p["rps"]:
                row["allon_vs_pass_rps"] = a["rps"] / p["rps"]
            if a and lt and lt["rps"]:
                row["allon_vs_litellm_rps"] = a["rps"] / lt["rps"]
                if d:
                    row["litellm_added_p50_ms"] = lt["p50"] - d["p50"]
                    added = lt["p50"] - d["p50"]
                    row["allon_vs_litellm_added_p50"] = (
                        (a["p50"] - d["p50"]) / added if added > 0 else None)
            out.append(row)
    return out


def print_ratios(rows: list[dict[str, Any]]) -> None:
    print("\nratios (same run)")
    print(f"{'mode':<6} {'conc':>4} {'3-1 add p50':>11} {'3-1 add p99':>11} {'2-1 add p50':>11} "
          f"{'3/2 req/s':>9} {'3/4 req/s':>9} {'4-1 add p50':>11} {'3/4 added':>9}")
    for r in rows:
        print(f"{r['mode']:<6} {r['conc']:>4} {fmt(r.get('allon_added_p50_ms'), '11.2f')} "
              f"{fmt(r.get('allon_added_p99_ms'), '11.2f')} "
              f"{fmt(r.get('pass_added_p50_ms'), '11.2f')} "
              f"{fmt(r.get('allon_vs_pass_rps'), '9.2f')} "
              f"{fmt(r.get('allon_vs_litellm_rps'), '9.2f')} "
              f"{fmt(r.get('litellm_added_p50_ms'), '11.2f')} "
              f"{fmt(r.get('allon_vs_litellm_added_p50'), '9.2f')}")


def git_rev() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=5).stdout
        return out.stdout.strip() + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def run_matrix(args: argparse.Namespace, servers: dict[str, Server], clients: Clients,
               result: dict[str, Any]) -> None:
    levels = [int(x) for x in args.levels.split(",")]
    modes = args.modes.split(",")
    names = list(servers)
    cells: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    total = args.rounds * len(levels) * len(modes) * len(names)
    done = 0
    # warm every server (connections, caches, JIT-free but lazy imports) before measuring
    for name in names:
        progress(f"warming {name} …")
        measure(clients, servers[name], {"mode": "json", "duration": 1.0, "warmup": 0.0,
                                         "timeout": args.timeout, "unique": args.unique},
                split_concurrency(8, args.clients))
    for rnd in range(args.rounds):
        order = names if rnd % 2 == 0 else names[::-1]
        for mode in modes:
            for c in levels:
                for name in order:
                    done += 1
                    cmd = {"mode": mode, "duration": args.duration, "warmup": args.warmup,
                           "timeout": args.timeout, "unique": args.unique}
                    cell = measure(clients, servers[name], cmd,
                                   split_concurrency(c, args.clients))
                    cells.setdefault((name, mode, c), []).append(cell)
                    rps = cell["n"] / cell["elapsed"]
                    progress(f"[{done:>3}/{total}] round {rnd + 1} {mode:<6} c={c:<4} "
                             f"{name:<12} {rps:7.0f} req/s p50 {pct(cell['lat'], .5):7.2f} ms "
                             f"errors {cell['errors']}  load {cell['loadavg']}")
    log(f"done: {total} cells")
    agg = {k: merge(v) for k, v in cells.items()}
    rows = [(name, c, mode, agg[(name, mode, c)]) for mode in modes for c in levels
            for name in names]
    print_table(f"load: {args.rounds} round(s) x {args.duration:g}s per cell, "
                f"{args.clients} client process(es), mock latency {args.mock_latency_ms:g} ms, "
                f"load avg {result['loadavg_start']} -> {loadavg()}", rows)
    rat = ratios(agg, levels, modes)
    print_ratios(rat)
    result["table"] = [{"scenario": n, "conc": c, "mode": m, **v} for n, c, m, v in rows]
    result["ratios"] = rat
    result["cells"] = [{"scenario": k[0], "mode": k[1], "conc": k[2], "round": i,
                        **{kk: vv for kk, vv in cell.items() if kk not in ("lat", "ttfb")}}
                       for k, v in cells.items() for i, cell in enumerate(v)]


def run_soak(args: argparse.Namespace, server: Server, clients: Clients,
             result: dict[str, Any]) -> None:
    chunk = 30.0
    warm = max(1, int(args.soak_warmup_s / chunk))  # warm-up chunks come before the measured ones
    n = warm + max(1, int(args.soak_minutes * 60 / chunk))
    samples = []
    for i in range(n):
        cell = measure(clients, server, {"mode": "json", "duration": chunk, "warmup": 0.0,
                                         "timeout": args.timeout, "unique": args.unique},
                       split_concurrency(args.soak_concurrency, args.clients))
        rss = rss_kb(server.pids()) / 1024
        samples.append({"t_s": (i + 1) * chunk, "rps": cell["n"] / cell["elapsed"],
                        "p99": pct(cell["lat"], .99), "errors": cell["errors"], "rss_mb": rss,
                        "loadavg": cell["loadavg"]})
        progress(f"soak {(i + 1) * chunk:5.0f}/{n * chunk:.0f}s  {samples[-1]['rps']:6.0f} req/s "
                 f"RSS {rss:7.1f} MB errors {cell['errors']}")
    log("soak done")
    print(f"\nsoak: all-on, json, c={args.soak_concurrency}, {warm * chunk:.0f}s warm-up, then "
          f"{(n - warm) * chunk:.0f}s measured")
    print(f"{'t s':>6} {'req/s':>7} {'p99 ms':>8} {'errors':>6} {'RSS MB':>8} load")
    for s in samples:
        print(f"{s['t_s']:>6.0f} {s['rps']:>7.0f} {s['p99']:>8.1f} {s['errors']:>6} "
              f"{s['rss_mb']:>8.1f} {s['loadavg']}")
    steady = [s["rss_mb"] for s in samples[warm:]] or [samples[-1]["rss_mb"]]
    spread = (max(steady) - min(steady)) / min(steady) * 100
    growth = (steady[-1] - steady[0]) / steady[0] * 100
    verdict = "FLAT" if spread <= 10 else "NOT FLAT"
    print(f"RSS after warm-up: min {min(steady):.1f} MB, max {max(steady):.1f} MB, "
          f"spread {spread:.1f}%, first->last {growth:+.1f}%  => {verdict} (target: within 10%)")
    result["soak"] = {"samples": samples, "spread_pct": spread, "growth_pct": growth,
                      "flat": spread <= 10}


def run_overload(args: argparse.Namespace, server: Server, clients: Clients,
                 result: dict[str, Any]) -> None:
    progress("overload: measuring saturation (closed loop c=128) …")
    base_cmd = {"mode": "json", "warmup": 0.5, "timeout": args.timeout, "unique": args.unique}
    sat = measure(clients, server, {**base_cmd, "duration": args.duration},
                  split_concurrency(128, args.clients))
    sat_rps = sat["n"] / sat["elapsed"]
    rate = sat_rps * args.overload_factor
    rss_before = rss_kb(server.pids()) / 1024
    progress(f"overload: open loop at {rate:.0f} req/s ({args.overload_factor:g}x {sat_rps:.0f}) "
             f"for {args.overload_duration:g}s …")
    split = [{"rate": rate / args.clients, "max_outstanding": 8192}
             for _ in range(args.clients)]
    over = measure(clients, server, {**base_cmd, "duration": args.overload_duration,
                                     "warmup": 0.0, "timeout": args.overload_timeout,
                                     "concurrency": 0}, split)
    rss_after = rss_kb(server.pids()) / 1024
    counters = gateway_counters(server)
    progress("overload: recovery (closed loop c=32) …")
    rec = measure(clients, server, {**base_cmd, "duration": args.duration},
                  split_concurrency(32, args.clients))
    log("overload done")
    st = over["statuses"]
    shed = st.get("503", 0) + st.get("429", 0)
    offered = over["sent"] / over["elapsed"]
    print(f"\noverload: all-on, json, open loop {args.overload_factor:g}x saturation "
          f"({sat_rps:.0f} req/s at c=128) for {args.overload_duration:g}s, client timeout "
          f"{args.overload_timeout:g}s, load avg {loadavg()}")
    print(f"  offered (achieved by the client)  {offered:8.0f} req/s  "
          f"(asked {rate:.0f}; {over['dropped']} not sent: client outstanding cap)")
    print(f"  served 200                        {st.get('200', 0):8d}  "
          f"({over['n'] / over['elapsed']:.0f} req/s, p50 {pct(over['lat'], .5):.0f} ms, "
          f"p99 {pct(over['lat'], .99):.0f} ms)")
    print(f"  shed 503/429                      {shed:8d}  {dict(sorted(st.items()))}")
    print(f"  client timeouts                   {over['timeouts']:8d}")
    print(f"  connection errors                 {over['failures']:8d}  "
          f"{dict(sorted(over['failure_kinds'].items(), key=lambda kv: -kv[1])[:3])}")
    print(f"  gateway RSS before/after/peak MB  {rss_before:.1f} / {rss_after:.1f} / "
          f"{over['server_rss_peak_kb'] / 1024:.1f}")
    print(f"  gateway's own counters            {counters}")
    print(f"  recovery c=32: {rec['n'] / rec['elapsed']:.0f} req/s, errors {rec['errors']}")
    result["overload"] = {"saturation_rps": sat_rps, "asked_rps": rate, "offered_rps": offered,
                          "statuses": st, "timeouts": over["timeouts"],
                          "failures": over["failures"], "dropped": over["dropped"],
                          "served_p99_ms": pct(over["lat"], .99),
                          "rss_before_mb": rss_before, "rss_after_mb": rss_after,
                          "rss_peak_mb": over["server_rss_peak_kb"] / 1024,
                          "gateway_http_counters": counters,
                          "recovery_rps": rec["n"] / rec["elapsed"],
                          "recovery_errors": rec["errors"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=2.0, help="measured seconds per cell")
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds per cell")
    ap.add_argument("--levels", default="1,32,128", help="concurrency levels")
    ap.add_argument("--modes", default="json,stream", help="json and/or stream")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (A B, B A, ...)")
    ap.add_argument("--scenarios", default="direct,passthrough,all-on,litellm")
    ap.add_argument("--clients", type=int, default=1, help="client processes")
    ap.add_argument("--timeout", type=float, default=30.0, help="client timeout per request")
    ap.add_argument("--mock-latency-ms", type=float, default=0.0, help="mock upstream delay")
    ap.add_argument("--same-prompt", dest="unique", action="store_false",
                    help="send one prompt (guardrail verdict cache hits); default: unique")
    ap.add_argument("--litellm-venv", default=None, help="venv with a `litellm` executable")
    ap.add_argument("--soak", action="store_true", help="10-minute RSS flatness run instead")
    ap.add_argument("--soak-minutes", type=float, default=10.0)
    ap.add_argument("--soak-warmup-s", type=float, default=60.0)
    ap.add_argument("--soak-concurrency", type=int, default=32)
    ap.add_argument("--overload", action="store_true", help="4x saturation run instead")
    ap.add_argument("--overload-factor", type=float, default=4.0)
    ap.add_argument("--overload-duration", type=float, default=10.0)
    ap.add_argument("--overload-timeout", type=float, default=10.0)
    ap.add_argument("--gateway-config", default=None,
                    help="all-on config to use instead of benchmarks/configs/all-on.yaml")
    ap.add_argument("--out", default=str(HERE / "results"), help="results directory")
    ap.add_argument("--keep-logs", action="store_true", help="keep the temp dir with logs")
    args = ap.parse_args()

    stamp = time.strftime("%Y%m%d-%H%M%S")
    result: dict[str, Any] = {
        "timestamp": stamp, "git": git_rev(), "args": vars(args),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "loadavg_start": loadavg(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="sbactor-load-"))
    servers: dict[str, Server] = {}
    clients: Clients | None = None
    wanted = args.scenarios.split(",")
    try:
        progress("starting mock upstream …")
        mock = start_mock(tmp, args.mock_latency_ms)
        if "direct" in wanted and not (args.soak or args.overload):
            servers["direct"] = mock
        if "passthrough" in wanted and not (args.soak or args.overload):
            progress("starting gateway (passthrough) …")
            servers["passthrough"] = start_gateway("passthrough",
                                                   HERE / "configs" / "passthrough.yaml",
                                                   tmp, mock.url)
        if "all-on" in wanted or args.soak or args.overload:
            progress("starting gateway (all-on) …")
            cfg = Path(args.gateway_config) if args.gateway_config else \
                HERE / "configs" / "all-on.yaml"
            servers["all-on"] = start_gateway("all-on", cfg, tmp, mock.url)
        if "litellm" in wanted and not (args.soak or args.overload):
            exe = find_litellm(args.litellm_venv)
            if exe is None:
                where = f"{args.litellm_venv}/bin" if args.litellm_venv else "PATH"
                log(f"SKIP scenario 4 (litellm): no `litellm` executable in {where} "
                    f"(pass --litellm-venv DIR; install: pip install 'litellm[proxy]')")
                result["litellm"] = f"skipped: not found in {where}"
            else:
                progress(f"starting litellm proxy ({exe}) …")
                try:
                    servers["litellm"] = start_litellm(exe, tmp, mock.url)
                    result["litellm"] = exe
                except RuntimeError as exc:
                    log(f"SKIP scenario 4 (litellm): {exc}")
                    result["litellm"] = f"skipped: {exc}"
        progress(f"starting {args.clients} client process(es) …")
        clients = Clients(args.clients)
        if args.soak:
            run_soak(args, servers["all-on"], clients, result)
        elif args.overload:
            run_overload(args, servers["all-on"], clients, result)
        else:
            run_matrix(args, servers, clients, result)
        result["loadavg_end"] = loadavg()
        print(f"\nmachine: {os.cpu_count()} cpus, load avg start {result['loadavg_start']} "
              f"end {result['loadavg_end']}, git {result['git']}")
    finally:
        if clients is not None:
            clients.close()
        for s in servers.values():
            if s.name != "mock":
                s.stop()
        if "mock" in locals():
            mock.stop()
        if not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"logs kept in {tmp}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stamp}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main()
    else:
        sys.exit(main())
