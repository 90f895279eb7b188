"""``sbactor serve --workers N``: N processes on one port, each its own trio.run and actors.

The parent only supervises: it starts ``sbactor serve --worker-id I`` N times (each worker binds
the same port with SO_REUSEPORT, so the kernel spreads connections), prints one ready line when
all are listening, forwards SIGTERM/SIGINT to every worker (each drains and writes its final
ledger checkpoint) and exits 0 when all exited 0. A worker that dies on its own stops the rest
(exit 1): a half-sized gateway should be restarted by the process manager, not limp on.

Each worker is one ledger writer: its chain lives in ``<ledger path>/worker-<id>/`` (JSONL sinks
get ``.worker-<id>`` before their suffix), and ``sbactor ledger verify <ledger path>`` checks
every chain. Budgets, rate limits and routing feedback are shared through Redis, which is why
more than one worker requires ``state.backend: redis``.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType

import attrs

from sbactor.config import Config, JsonlSinkConfig
from sbactor.ledger.config import LedgerSinkConfig


def worker_config(config: Config, worker_id: int) -> Config:
    """The config of worker ``worker_id``: its own ledger chain and usage files."""
    sinks = []
    for sink in config.usage_sinks:
        if isinstance(sink, LedgerSinkConfig):
            sink = attrs.evolve(sink, path=str(Path(sink.path) / f"worker-{worker_id}"))
        elif isinstance(sink, JsonlSinkConfig):
            p = Path(sink.path)
            name = f"{p.stem}.worker-{worker_id}{p.suffix}"
            sink = attrs.evolve(sink, path=str(p.with_name(name)))
        sinks.append(sink)
    return attrs.evolve(config, usage_sinks=sinks)


def _reserve_port(bind: str) -> tuple[str, socket.socket | None]:
    """Port 0 → pick one now (a bound, never-listening SO_REUSEPORT socket holds it; it takes
    no connections) so that every worker binds the same port."""
    host, _, port = bind.rpartition(":")
    if int(port) != 0:
        return bind, None
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), 0))
    return f"{host}:{sock.getsockname()[1]}", sock


def serve_workers(
    workers: int,
    config_path: str,
    bind: str,
    data_dir: Path,
    *,
    ledger_recover: str = "refuse",
) -> int:
    """Run ``workers`` worker processes until SIGTERM/SIGINT; the process exit code."""
    bind, holder = _reserve_port(bind)
    stopping = threading.Event()
    ready = threading.Semaphore(0)
    procs: list[subprocess.Popen[str]] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        first = not stopping.is_set()
        stopping.set()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if first else signal.SIGKILL)

    def relay(proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("sbactor listening on "):
                ready.release()
            else:
                sys.stdout.write(line)
                sys.stdout.flush()

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for worker_id in range(workers):
            cmd = [sys.executable, "-m", "sbactor", "serve", "--config", config_path,
                   "--bind", bind, "--data-dir", str(data_dir), "--workers", str(workers),
                   "--worker-id", str(worker_id), "--ledger-recover", ledger_recover]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1)
            procs.append(proc)
            threading.Thread(target=relay, args=(proc,), daemon=True).start()
        for _ in range(workers):
            while not ready.acquire(timeout=0.2):
                if stopping.is_set() or any(p.poll() is not None for p in procs):
                    break
            else:
                continue
            break
        else:
            print(f"sbactor listening on http://{bind} ({workers} workers)", flush=True)
        failed = False
        while True:
            alive = [p for p in procs if p.poll() is None]
            if not alive:
                break
            if not stopping.is_set() and len(alive) < len(procs):
                print("sbactor: a worker exited; stopping the others", file=sys.stderr,
                      flush=True)
                failed = True
                forward(signal.SIGTERM, None)
            try:
                alive[0].wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        codes = [p.returncode for p in procs]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if holder is not None:
            holder.close()
    if failed or any(codes):
        bad = [c for c in codes if c]
        return bad[0] if bad and not failed else 1
    return 0
