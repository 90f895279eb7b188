"""Compare two benchmark result files (e.g. the same script at two commits).

    /work/venv/bin/python benchmarks/compare.py OLD.json NEW.json [--threshold 10] [--changed]

Reads the files the ``bench_*.py`` scripts write (``benchmarks/results/<script>-<timestamp>.json``,
see ``_results.py``) and the ones ``load.py`` writes (``benchmarks/results/<timestamp>.json``).
Rows are matched by their identifying fields (a bench file lists them under ``keys``; for
load.py: scenario/mode/conc for the merged table, mode/conc for the ratios, plus the overload and
soak summaries; ``--rounds`` adds load.py's per-round cells). For each matched row it prints every
numeric metric as old → new, the ratio new/old and the change; a change beyond ±threshold %
is flagged ``!``, with ``better``/``worse`` where the metric's name tells the direction
(``*_per_s``, ``rps``: higher is better; ``*_us``, ``*_ms``, ``p99``, ``errors``: lower).
Single cells move by ±30 % on a shared machine: read flags next to the load averages shown.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

Section = tuple[list[str], list[dict[str, Any]]]

# load.py has no units in its field names; these are its units (for display only)
LOAD_UNITS = {"p50": "ms", "p95": "ms", "p99": "ms", "ttfb_p50": "ms", "rps": "req/s",
              "server_cpu_s": "s", "server_cpu_pct": "%", "client_cpu_pct": "%",
              "server_cpu_ms_per_req": "ms", "server_rss_peak_mb": "MB"}


def sections(doc: dict[str, Any], rounds: bool) -> dict[str, Section]:
    """The comparable parts of a result file: name -> (identifying fields, rows)."""
    if "script" in doc:  # a bench_*.py file
        out: dict[str, Section] = {"rows": (list(doc.get("keys", [])), doc.get("rows", []))}
        if doc.get("summary"):
            out["summary"] = ([], [doc["summary"]])
        return out
    out = {}  # load.py
    if doc.get("table"):
        out["table"] = (["scenario", "mode", "conc"], doc["table"])
    if doc.get("cells") and (rounds or not doc.get("table")):
        out["cells"] = (["scenario", "mode", "conc", "round"], doc["cells"])
    if doc.get("ratios"):
        out["ratios"] = (["mode", "conc"], doc["ratios"])
    if doc.get("overload"):
        out["overload"] = ([], [doc["overload"]])
    if doc.get("soak"):
        out["soak"] = ([], [{k: v for k, v in doc["soak"].items() if k != "samples"}])
    return out


def script_name(doc: dict[str, Any]) -> str:
    if "script" in doc:
        return str(doc["script"])
    mode = "soak" if "soak" in doc else "overload" if "overload" in doc else "matrix"
    return f"load ({mode})"


def describe(doc: dict[str, Any]) -> str:
    git = doc.get("git")
    if isinstance(git, dict):
        git = f"{git.get('revision')}{'+dirty' if git.get('dirty') else ''}"
    fields = ("loadavg_before", "loadavg_after", "loadavg_start", "loadavg_end")
    load = [" ".join(map(str, x)) if isinstance(x, list) else str(x)
            for x in (doc.get(k) for k in fields) if x is not None]
    return f"git {git}, {doc.get('timestamp')}, load avg {' -> '.join(load) or '?'}"


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def direction(metric: str) -> int:
    """+1 when higher is better, -1 when lower is better, 0 when the name does not say."""
    name = metric.lower()
    if any(t in name for t in ("overhead", "usd", "cost")):
        return -1
    if name.endswith("_x"):  # a ratio between two cases of the same run
        return 0
    if any(t in name for t in ("per_s", "rps", "success", "saves")):
        return 1
    if any(t in name for t in ("_us", "us_", "_ms", "ms_", "p50", "p95", "p99", "error", "rss",
                                "timeout", "failure", "dropped", "added", "spread", "growth",
                                "attempts")):
        return -1
    return 0


def index(keys: list[str], rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        ident = tuple((k, row[k]) for k in keys if row.get(k) is not None)
        if ident in out:  # the same identifying fields again: number the repeats, in order
            ident += (("#", sum(1 for i in out if i[:len(ident)] == ident) + 1),)
        out[ident] = row
    return out


def label(ident: tuple[Any, ...]) -> str:
    return " ".join(f"{k}={v}" for k, v in ident) or "(summary)"


def fmt(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}" if value == 0 or abs(value) >= 0.01 else f"{value:.3g}"


def flatten(row: dict[str, Any]) -> dict[str, Any]:
    """Nested counts (e.g. ``statuses``) become ``statuses.200`` and so on."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def compare_rows(old: dict[str, Any], new: dict[str, Any], keys: list[str],
                 threshold: float, changed_only: bool) -> tuple[list[str], int, int]:
    """Lines for one matched row; also how many metrics were compared and how many flagged."""
    lines, compared, flagged = [], 0, 0
    counts = [k for k, v in new.items() if isinstance(v, dict) and isinstance(old.get(k), dict)]
    old, new = flatten(old), flatten(new)
    for key in list(old) + list(new):  # a count present on one side only is 0 on the other
        if key.split(".", 1)[0] in counts:
            old.setdefault(key, 0)
            new.setdefault(key, 0)
    for metric, after in new.items():
        before: Any = old.get(metric)
        if metric in keys or not (is_number(before) and is_number(after)):
            continue
        if not (math.isfinite(before) and math.isfinite(after)):
            continue
        compared += 1
        if before == 0:
            ratio = 1.0 if after == 0 else math.inf
        else:
            ratio = after / before
        change = (ratio - 1) * 100
        flag = abs(change) > threshold
        flagged += flag
        if changed_only and not flag:
            continue
        verdict = ""
        if flag:
            sign = direction(metric) * (1 if after > before else -1)
            verdict = "! " + {1: "better", -1: "worse", 0: "changed"}[sign]
        unit = LOAD_UNITS.get(metric)
        name = f"{metric} [{unit}]" if unit else metric
        ratio_text = f"{ratio:.2f}x {change:+7.1f} %" if math.isfinite(ratio) else "(was 0)"
        lines.append(f"    {name:<34} {fmt(before):>12} -> {fmt(after):<12} {ratio_text:>17}  "
                     f"{verdict}".rstrip())
    return lines, compared, flagged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--threshold", type=float, default=10.0,
                        help="flag changes larger than this many percent (default 10)")
    parser.add_argument("--changed", action="store_true", help="print only flagged metrics")
    parser.add_argument("--rounds", action="store_true",
                        help="load.py files: also compare the per-round cells")
    args = parser.parse_args()
    old, new = (json.loads(p.read_text()) for p in (args.old, args.new))
    if script_name(old) != script_name(new):
        print(f"different benchmarks: {script_name(old)} vs {script_name(new)}", file=sys.stderr)
        return 2
    print(f"{script_name(new)}\n  old: {args.old.name}: {describe(old)}\n"
          f"  new: {args.new.name}: {describe(new)}")
    differing = {k: (old.get("args", {}).get(k), v) for k, v in new.get("args", {}).items()
                 if old.get("args", {}).get(k) != v and k != "out"}
    if differing:
        print("  args differ: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in
                                             differing.items()))
    old_sections, new_sections = sections(old, args.rounds), sections(new, args.rounds)
    total = flagged = 0
    for name, (keys, new_rows) in new_sections.items():
        if name not in old_sections:
            print(f"\n[{name}] only in new")
            continue
        old_index, new_index = index(keys, old_sections[name][1]), index(keys, new_rows)
        out = []
        for ident, row in new_index.items():
            if ident not in old_index:
                out.append(f"  {label(ident)}: only in new")
                continue
            lines, n, f = compare_rows(old_index[ident], row, keys, args.threshold,
                                       args.changed)
            total, flagged = total + n, flagged + f
            if lines:
                out += [f"  {label(ident)}", *lines]
        out += [f"  {label(ident)}: only in old" for ident in old_index if ident not in new_index]
        if out:
            print(f"\n[{name}]\n" + "\n".join(out))
    for name in old_sections:
        if name not in new_sections:
            print(f"\n[{name}] only in old")
    print(f"\n{total} metrics compared, {flagged} changed by more than ±{args.threshold:g} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
