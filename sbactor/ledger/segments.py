"""Ledger files on disk: segment naming, listing, line reading, checkpoint file, quarantine.

Sync file I/O only (the writer runs these in a worker thread); no hashing rules live here.
A ledger is a directory of segments ``ledger-000000.jsonl``, ``ledger-000001.jsonl``, ... whose
chain continues across files, plus ``checkpoints.jsonl`` beside them.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import attrs

from sbactor.ledger.checkpoint import Checkpoint, decode_checkpoint

CHECKPOINT_FILE = "checkpoints.jsonl"
SEGMENT_PATTERN = re.compile(r"^ledger-(\d{6,})\.jsonl$")


def segment_name(index: int) -> str:
    return f"ledger-{index:06d}.jsonl"


def segment_index(path: Path) -> int | None:
    match = SEGMENT_PATTERN.match(path.name)
    return int(match.group(1)) if match else None


def list_segments(directory: Path) -> list[Path]:
    """Segments in chain order (by index, not by name, so index 1000000 sorts right)."""
    found = []
    for child in directory.iterdir():
        index = segment_index(child)
        if index is not None and child.is_file():
            found.append((index, child))
    return [path for _, path in sorted(found)]


@attrs.frozen
class Line:
    """One line of a file: its bytes without the newline, where it starts, and whether the
    newline was there (only the final line of a file can lack it: a torn write)."""

    data: bytes
    offset: int
    number: int
    complete: bool


def iter_lines(path: Path) -> Iterator[Line]:
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            complete = raw.endswith(b"\n")
            yield Line(raw[:-1] if complete else raw, offset, number, complete)
            offset += len(raw)


@attrs.frozen
class CheckpointFile:
    checkpoints: tuple[Checkpoint, ...]
    torn_offset: int | None  # offset of an incomplete last line (crash mid-write), if any
    problem: str | None  # a malformed complete line


def read_checkpoints(path: Path) -> CheckpointFile:
    """Read the checkpoint file; a torn last line is reported, not treated as tampering."""
    found: list[Checkpoint] = []
    for line in iter_lines(path):
        if not line.complete:
            return CheckpointFile(tuple(found), line.offset, None)
        try:
            found.append(decode_checkpoint(line.data))
        except ValueError as exc:
            return CheckpointFile(tuple(found), None, f"{path.name} line {line.number}: {exc}")
    return CheckpointFile(tuple(found), None, None)


def fsync_directory(directory: Path) -> None:
    """Make a new or renamed file's directory entry durable (POSIX needs this separately)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def quarantine(directory: Path, segment: Path | None, offset: int | None, stamp: str) -> Path:
    """Move everything from ``segment`` at ``offset`` onward (later segments too) and the
    checkpoint file into ``quarantine-<stamp>/``, so the remaining ledger is a valid prefix."""
    target = directory / f"quarantine-{stamp}"
    target.mkdir(parents=True, exist_ok=False)
    if segment is not None and offset is not None:
        later = False
        for path in list_segments(directory):
            if later:
                shutil.move(str(path), target / path.name)
            elif path == segment:
                later = True
                with path.open("rb") as handle:
                    handle.seek(offset)
                    tail = handle.read()
                (target / f"{path.name}.tail").write_bytes(tail)
                os.truncate(path, offset)
    checkpoints = directory / CHECKPOINT_FILE
    if checkpoints.exists():
        shutil.move(str(checkpoints), target / CHECKPOINT_FILE)
    fsync_directory(directory)
    return target
