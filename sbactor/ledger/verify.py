"""Verify a ledger (file or directory of segments) and replay it for the writer at startup.

Both walk the same scan: every line through ChainChecker, every checkpoint compared with the
entry at its seq, and the last checkpoint compared with the end (tail truncation).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import attrs

from sbactor.bounded import RecentKeys
from sbactor.ledger.chain import GENESIS_HASH, ChainChecker, ChainError, PublicKey, dedup_key
from sbactor.ledger.checkpoint import Checkpoint, checkpoint_problem
from sbactor.ledger.segments import (
    CHECKPOINT_FILE,
    iter_lines,
    list_segments,
    read_checkpoints,
    segment_index,
)

Progress = Callable[[int, int, int], None]  # (bytes done, bytes total, entries)


class LedgerOperationalError(Exception):
    """The ledger could not be examined at all (missing path, unreadable file): exit 2."""


class LedgerCorrupt(RuntimeError):
    """The ledger on disk is broken; the writer refuses to start on it."""

    def __init__(
        self, message: str, seq: int | None, segment: Path | None, offset: int | None
    ) -> None:
        super().__init__(message)
        self.seq = seq
        self.segment = segment
        self.offset = offset


@attrs.frozen
class VerifyReport:
    path: str
    entries: int
    ok: bool
    broken_seq: int | None
    reason: str | None
    signatures_checked: int
    checkpoint_checked: bool
    checkpoint_seq: int | None
    segments: int
    kid: str | None
    head_hash: str


@attrs.frozen
class TornTail:
    """An incomplete last line (crash mid-write): where it starts and what it held."""

    segment: Path
    offset: int
    length: int


@attrs.frozen
class _Scan:
    checker: ChainChecker
    error: ChainError | None = None
    segment: Path | None = None
    offset: int | None = None
    line_number: int | None = None
    torn: TornTail | None = None
    end_size: int = 0
    checkpoint_checked: bool = False
    checkpoint_seq: int | None = None


def _checkpoint_map(checkpoints: tuple[Checkpoint, ...]) -> dict[int, str]:
    by_seq: dict[int, str] = {}
    for cp in checkpoints:
        if by_seq.setdefault(cp.seq, cp.head_hash) != cp.head_hash:
            raise ChainError(cp.seq, f"conflicting checkpoints at seq {cp.seq} (a forked ledger)")
    return by_seq


def _scan(
    segments: list[Path],
    checker: ChainChecker,
    checkpoints: tuple[Checkpoint, ...],
    *,
    on_key: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> _Scan:
    total = sum(p.stat().st_size for p in segments)
    done = 0
    try:
        expected = _checkpoint_map(checkpoints)
    except ChainError as exc:
        return _Scan(checker, error=exc)
    last_cp = max(expected) if expected else None
    torn: TornTail | None = None
    end_size = 0
    for position, segment in enumerate(segments):
        is_last_segment = position == len(segments) - 1
        size = 0
        for line in iter_lines(segment):
            size = line.offset + len(line.data) + (1 if line.complete else 0)
            if not line.complete and is_last_segment:
                torn = TornTail(segment, line.offset, len(line.data))
                size = line.offset
                break
            try:
                if not line.complete:
                    raise ChainError(checker.next_seq, "incomplete line at the end of a segment")
                entry = checker.check(line.data)
                want = expected.get(entry.seq)
                if want is not None and want != entry.entry_hash:
                    raise ChainError(entry.seq, "entry does not match the signed checkpoint")
            except ChainError as exc:
                return _Scan(checker, error=exc, segment=segment, offset=line.offset,
                             line_number=line.number)
            if on_key is not None:
                key = dedup_key(entry.event)
                if key is not None:
                    on_key(key)
            if progress is not None and line.number % 4096 == 0:
                progress(done + size, total, checker.next_seq)
        done += size
        end_size = size
    if progress is not None:
        progress(total, total, checker.next_seq)
    torn_at = (torn.segment, torn.offset) if torn else (None, None)
    if last_cp is not None and last_cp >= checker.next_seq:
        missing = ChainError(
            checker.next_seq,
            f"ledger ends at seq {checker.next_seq - 1} but a checkpoint covers seq {last_cp}"
            " (entries deleted from the end)",
        )
        return _Scan(checker, error=missing, torn=torn, segment=torn_at[0], offset=torn_at[1],
                     checkpoint_checked=True, checkpoint_seq=last_cp)
    return _Scan(checker, torn=torn, segment=torn_at[0], offset=torn_at[1], end_size=end_size,
                 checkpoint_checked=last_cp is not None, checkpoint_seq=last_cp)


def _resolve(path: Path, checkpoints: Path | None) -> tuple[list[Path], Path | None]:
    if not path.exists():
        raise LedgerOperationalError(f"{path}: no such file or directory")
    if path.is_dir():
        segments = list_segments(path)
        if not segments:
            raise LedgerOperationalError(f"{path}: no ledger segments (ledger-*.jsonl) found")
        beside = path / CHECKPOINT_FILE
    else:
        segments = [path]
        beside = path.parent / CHECKPOINT_FILE
        # Checkpoints describe the whole ledger: use them only if this file is its last segment.
        if segment_index(path) is None or list_segments(path.parent)[-1:] != [path]:
            return segments, _explicit(checkpoints)
    if checkpoints is not None:
        return segments, _explicit(checkpoints)
    return segments, beside if beside.is_file() else None


def chain_dirs(path: Path | str) -> list[Path]:
    """The chains under a ledger directory written by several writers (``worker-<id>/``, one
    chain per writer): its subdirectories holding segments, sorted. Empty when ``path`` is itself
    a chain (or not a directory)."""
    path = Path(path)
    if not path.is_dir() or list_segments(path):
        return []
    return sorted(d for d in path.iterdir() if d.is_dir() and list_segments(d))


def _explicit(checkpoints: Path | None) -> Path | None:
    if checkpoints is not None and not checkpoints.is_file():
        raise LedgerOperationalError(f"{checkpoints}: checkpoint file not found")
    return checkpoints


def verify(
    path: Path | str,
    *,
    public_key: PublicKey | None = None,
    checkpoints: Path | str | None = None,
    progress: Progress | None = None,
) -> VerifyReport:
    """Verify a ledger file or directory; raises LedgerOperationalError if it cannot be read."""
    path = Path(path)
    try:
        segments, cp_path = _resolve(path, Path(checkpoints) if checkpoints else None)
        cp_problem: str | None = None
        cps: tuple[Checkpoint, ...] = ()
        if cp_path is not None:
            cp_file = read_checkpoints(cp_path)
            cps, cp_problem = cp_file.checkpoints, cp_file.problem
            for cp in cps:
                cp_problem = cp_problem or checkpoint_problem(cp, public_key)
        checker = ChainChecker(public_key=public_key)
        scan = _scan(segments, checker, cps, progress=progress)
    except OSError as exc:
        raise LedgerOperationalError(f"{exc.filename or path}: {exc.strerror or exc}") from None

    def report(ok: bool, seq: int | None, reason: str | None) -> VerifyReport:
        return VerifyReport(
            path=str(path), entries=checker.next_seq, ok=ok, broken_seq=seq, reason=reason,
            signatures_checked=checker.signatures_checked,
            checkpoint_checked=scan.checkpoint_checked, checkpoint_seq=scan.checkpoint_seq,
            segments=len(segments), kid=checker.kid, head_hash=checker.head_hash,
        )

    if scan.torn is not None:
        return report(False, checker.next_seq, f"{scan.torn.segment.name} byte {scan.torn.offset}:"
                      f" torn last line ({scan.torn.length} bytes, an incomplete write; the"
                      " writer truncates it on restart)")
    where = ""
    if scan.segment is not None and scan.line_number is not None:
        where = f"{scan.segment.name} line {scan.line_number}: "
    if scan.error is not None:
        return report(False, scan.error.seq, where + scan.error.reason)
    if cp_problem is not None:
        return report(False, None, cp_problem)
    return report(True, None, None)


@attrs.frozen
class ReplayResult:
    """What the writer needs to continue the chain."""

    next_seq: int
    head_hash: str
    segment: Path | None  # the last segment (None: empty directory)
    segment_size: int  # its size once a torn tail is cut off
    recent: RecentKeys  # the dedup keys of the newest dedup_capacity entries that have one
    torn: TornTail | None
    checkpoint_torn_offset: int | None
    last_checkpoint_seq: int | None
    signed: bool | None
    kid: str | None


def replay(directory: Path, *, dedup_capacity: int) -> ReplayResult:
    """Scan the ledger at startup (hashes, not signatures); raise LedgerCorrupt if broken."""
    segments = list_segments(directory) if directory.is_dir() else []
    cp_path = directory / CHECKPOINT_FILE
    cp_file = read_checkpoints(cp_path) if cp_path.is_file() else None
    if cp_file is not None and cp_file.problem is not None:
        raise LedgerCorrupt(f"ledger {directory}: {cp_file.problem}", None, None, None)
    recent = RecentKeys(dedup_capacity)
    checker = ChainChecker()
    scan = _scan(segments, checker, cp_file.checkpoints if cp_file else (), on_key=recent.add)
    if scan.error is not None:
        where = f"{scan.segment} line {scan.line_number}" if scan.line_number else str(directory)
        raise LedgerCorrupt(
            f"ledger {where} is broken at seq {scan.error.seq}: {scan.error.reason}",
            scan.error.seq, scan.segment, scan.offset,
        )
    return ReplayResult(
        next_seq=checker.next_seq,
        head_hash=checker.head_hash if checker.next_seq else GENESIS_HASH,
        segment=segments[-1] if segments else None,
        segment_size=scan.end_size,
        recent=recent,
        torn=scan.torn,
        checkpoint_torn_offset=cp_file.torn_offset if cp_file else None,
        last_checkpoint_seq=max((c.seq for c in cp_file.checkpoints), default=None)
        if cp_file else None,
        signed=checker.signed,
        kid=checker.kid,
    )
