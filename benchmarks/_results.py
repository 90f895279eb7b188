"""Shared by the ``bench_*.py`` scripts: a progress line on stderr and a JSON result file.

A script calls ``started = start()`` before it measures anything and, after printing its table,
``write(__file__, args, rows, started, keys=[...])``. That writes
``benchmarks/results/<script>-<timestamp>.json`` (gitignored)::

    {"script": "bench_actors", "timestamp": "20261203-165016", "args": {...},
     "git": {"revision": "9508f26", "dirty": false},
     "machine": {"cpus": 2, "platform": "...", "python": "3.11.7"},
     "loadavg_before": [0.8, 1.1, 1.2], "loadavg_after": [1.9, 1.3, 1.2], "elapsed_s": 14.2,
     "keys": ["mode", "senders"],
     "rows": [{"mode": "cast", "senders": 1, "msgs_per_s": 89803.0, "us_per_msg": 11.1}, ...]}

``rows`` are the rows the script printed, one dict each; a metric's unit is in its name
(``p50_us``, ``entries_per_s``). ``keys`` names the fields that identify a row, so that
``compare.py`` can match the same row in two files; ``summary={...}`` (optional) holds the
script's one-line conclusions (ratios). ``load.py`` writes its own format.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"


def progress(label: str, done: int, total: int) -> None:
    """A progress counter on stderr, rewritten in place with ``\\r`` (about 20 updates) and
    ended with a newline when ``done == total``."""
    if done == total or done % max(1, total // 20) == 0:
        print(f"\r{label} {done}/{total}", end="\n" if done == total else "", file=sys.stderr,
              flush=True)


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where there is no /proc."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def git_revision() -> dict[str, Any]:
    """Short HEAD revision and whether tracked files differ from it (read-only git calls)."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", *argv], cwd=HERE,
                              capture_output=True, text=True, timeout=5, check=True).stdout

    try:
        revision = git("rev-parse", "--short", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}
    return {"revision": revision, "dirty": dirty}


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def start() -> dict[str, Any]:
    """Call before measuring: the timestamp and the load average before the run."""
    return {"timestamp": time.strftime("%Y%m%d-%H%M%S"), "loadavg_before": loadavg(),
            "t0": time.monotonic()}


def _finite(value: Any) -> Any:
    """NaN and infinity become null: the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write(script: str, args: argparse.Namespace | Mapping[str, Any],
          rows: Iterable[Mapping[str, Any]], started: Mapping[str, Any], *,
          keys: Iterable[str], **extra: Any) -> Path:
    """Write the result file (see the module docstring); return its path and name it on stderr.

    ``script`` may be ``__file__``; ``extra`` adds top-level fields (e.g. a summary ratio).
    """
    name = Path(script).stem
    result = {
        "script": name,
        "timestamp": started["timestamp"],
        "args": dict(vars(args) if isinstance(args, argparse.Namespace) else args),
        "git": git_revision(),
        "machine": machine(),
        "loadavg_before": started["loadavg_before"],
        "loadavg_after": loadavg(),
        "elapsed_s": round(time.monotonic() - started["t0"], 3),
        **extra,
        "keys": list(keys),
        "rows": [dict(r) for r in rows],
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{started['timestamp']}.json"
    suffix = 1
    while path.exists():  # two runs in the same second
        suffix += 1
        path = RESULTS_DIR / f"{name}-{started['timestamp']}-{suffix}.json"
    path.write_text(json.dumps(_finite(result), indent=1, default=str) + "\n")
    print(f"results: {path}", file=sys.stderr, flush=True)
    return path
