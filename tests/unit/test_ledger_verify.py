"""The tamper matrix: each manipulation with its exit code and first broken seq, via the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from sbactor.ledger.chain import GENESIS_HASH, SigningKey, make_entry, rfc3339
from sbactor.ledger.checkpoint import encode_checkpoint, make_checkpoint
from sbactor.ledger.cli import main
from sbactor.ledger.segments import CHECKPOINT_FILE, segment_name

KEY = SigningKey.from_seed_hex("42" * 32)
OTHER = SigningKey.from_seed_hex("43" * 32)
N = 10


def write_ledger(directory: Path, n: int = N, signer: SigningKey | None = KEY,
                 per_segment: int = 0) -> list[bytes]:
    """A valid ledger of n entries with a final checkpoint; returns all lines."""
    directory.mkdir(parents=True, exist_ok=True)
    lines, head = [], GENESIS_HASH
    for seq in range(n):
        entry, line = make_entry(head, seq, rfc3339(1_700_000_000 + seq),
                                 {"request_id": f"r{seq}", "cost_usd": 0.25, "model": "m"}, signer)
        lines.append(line)
        head = entry.entry_hash
    step = per_segment or n
    chunks = [lines[i:i + step] for i in range(0, n, step)]
    for index, chunk in enumerate(chunks):
        (directory / segment_name(index)).write_bytes(b"".join(chunk))
    cp = make_checkpoint(n - 1, head, rfc3339(1_800_000_000), signer)
    (directory / CHECKPOINT_FILE).write_bytes(encode_checkpoint(cp))
    return lines


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    code = main(["ledger", "verify", *argv, "--format", "json"])
    out = capsys.readouterr().out
    return code, (json.loads(out) if out.strip() else {})


def seg(d: Path) -> Path:
    return d / segment_name(0)


def _edit_event(d: Path, lines: list[bytes]) -> None:
    lines[4] = lines[4].replace(b'"cost_usd":0.25', b'"cost_usd":0.01')
    seg(d).write_bytes(b"".join(lines))


def _edit_and_rehash(d: Path, lines: list[bytes]) -> None:
    """An attacker without the key recomputes entry_hash: the signature still catches it."""
    old = json.loads(lines[4])
    event = dict(old["event"], cost_usd=0.01)
    _, line = make_entry(old["prev_hash"], 4, old["recorded_at"], event, None)
    lines[4] = line.replace(b',"event"', f',"kid":"{old["kid"]}","signature":"{old["signature"]}"'
                            ',"event"'.encode(), 1)
    seg(d).write_bytes(b"".join(lines))


def _reorder(d: Path, lines: list[bytes]) -> None:
    lines[3], lines[4] = lines[4], lines[3]
    seg(d).write_bytes(b"".join(lines))


def _delete_middle(d: Path, lines: list[bytes]) -> None:
    del lines[5]
    seg(d).write_bytes(b"".join(lines))


def _delete_tail(d: Path, lines: list[bytes]) -> None:
    seg(d).write_bytes(b"".join(lines[:8]))


def _forge_signature(d: Path, lines: list[bytes]) -> None:
    record = json.loads(lines[6])
    sig = record["signature"]
    flipped = ("0" if sig[10] != "0" else "1")
    lines[6] = lines[6].replace(sig.encode(), (sig[:10] + flipped + sig[11:]).encode())
    seg(d).write_bytes(b"".join(lines))


def _resign_with_other_key(d: Path, lines: list[bytes]) -> None:
    record = json.loads(lines[6])
    _, line = make_entry(record["prev_hash"], 6, record["recorded_at"], record["event"], OTHER)
    lines[6] = line.replace(OTHER.kid.encode(), KEY.kid.encode())
    seg(d).write_bytes(b"".join(lines))


def _unsigned_entry(d: Path, lines: list[bytes]) -> None:
    record = json.loads(lines[7])
    _, lines[7] = make_entry(record["prev_hash"], 7, record["recorded_at"], record["event"], None)
    seg(d).write_bytes(b"".join(lines))


def _torn_tail(d: Path, lines: list[bytes]) -> None:
    seg(d).write_bytes(b"".join(lines) + b'{"seq":10,"recorded_at":"2024')


def _garbage_line(d: Path, lines: list[bytes]) -> None:
    lines.insert(3, b"this is not json\n")
    seg(d).write_bytes(b"".join(lines))


def _extra_field(d: Path, lines: list[bytes]) -> None:
    lines[2] = lines[2][:-2] + b',"note":"x"}\n'
    seg(d).write_bytes(b"".join(lines))


MATRIX: list[tuple[str, Callable[[Path, list[bytes]], None], int, int, str]] = [
    ("edit event field", _edit_event, 1, 4, "entry_hash does not match"),
    ("edit and rehash", _edit_and_rehash, 1, 4, "signature does not verify"),
    ("reorder two lines", _reorder, 1, 3, "expected seq 3, found seq 4"),
    ("delete middle line", _delete_middle, 1, 5, "entries missing"),
    ("delete the tail", _delete_tail, 1, 8, "entries deleted from the end"),
    ("forge a signature", _forge_signature, 1, 6, "signature does not verify"),
    ("re-sign with another key", _resign_with_other_key, 1, 6, "signature does not verify"),
    ("unsigned entry", _unsigned_entry, 1, 7, "unsigned entry in a signed ledger"),
    ("torn last line", _torn_tail, 1, 10, "torn last line"),
    ("garbage line", _garbage_line, 1, 3, "not valid JSON"),
    ("unauthenticated extra field", _extra_field, 1, 2, "unexpected field"),
]


@pytest.mark.parametrize(("name", "tamper", "code", "seq", "reason"), MATRIX,
                         ids=[m[0] for m in MATRIX])
def test_tamper_matrix(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str,
                       tamper: Callable[[Path, list[bytes]], None], code: int, seq: int,
                       reason: str) -> None:
    d = tmp_path / "ledger"
    lines = write_ledger(d)
    assert run(capsys, str(d), "--public-key-hex", KEY.public.hex)[0] == 0
    tamper(d, lines)
    exit_code, report = run(capsys, str(d), "--public-key-hex", KEY.public.hex)
    assert (exit_code, report["broken_seq"], report["ok"]) == (code, seq, False), report
    assert reason in report["reason"]


def test_valid_ledger_json_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "ledger"
    write_ledger(d, per_segment=3)
    code, report = run(capsys, str(d), "--public-key-hex", KEY.public.hex)
    assert code == 0
    assert report == {
        "path": str(d), "entries": N, "ok": True, "broken_seq": None, "reason": None,
        "signatures_checked": N, "checkpoint_checked": True, "checkpoint_seq": N - 1,
        "segments": 4, "kid": KEY.kid, "head_hash": report["head_hash"],
    }
    # the signing seed works too, for convenience
    assert run(capsys, str(d), "--signing-seed-hex", KEY.seed_hex)[0] == 0


def test_wrong_public_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "ledger"
    write_ledger(d)
    code, report = run(capsys, str(d), "--public-key-hex", OTHER.public.hex)
    assert (code, report["broken_seq"]) == (1, 0)
    assert "not by the given key" in report["reason"]


def test_deleted_segment_breaks_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "ledger"
    write_ledger(d, per_segment=3)
    (d / segment_name(1)).unlink()
    code, report = run(capsys, str(d))
    assert (code, report["broken_seq"]) == (1, 3)


def test_forged_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "ledger"
    lines = write_ledger(d)
    (d / segment_name(0)).write_bytes(b"".join(lines[:8]))
    head = json.loads(lines[7])["entry_hash"]
    cp = make_checkpoint(7, head, rfc3339(1.0), OTHER)  # attacker lacks KEY
    (d / CHECKPOINT_FILE).write_bytes(encode_checkpoint(cp))
    code, report = run(capsys, str(d), "--public-key-hex", KEY.public.hex)
    assert code == 1 and "checkpoint at seq 7" in report["reason"]


def test_unsigned_ledger_without_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "ledger"
    write_ledger(d, signer=None)
    code, report = run(capsys, str(d))
    assert code == 0 and report["signatures_checked"] == 0 and report["kid"] is None
    code, report = run(capsys, str(d), "--public-key-hex", KEY.public.hex)
    assert (code, report["broken_seq"]) == (1, 0)


def test_single_file_and_text_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "ledger"
    write_ledger(d)
    assert main(["ledger", "verify", str(seg(d)), "--public-key-hex", KEY.public.hex]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK:") and "checkpoint: seq 9 matches" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing-dir"], "no such file"),
        (["EMPTY"], "no ledger segments"),
        (["LEDGER", "--public-key-hex", "abc"], "64 hex characters"),
        (["LEDGER", "--signing-seed-hex", "zz" * 32], "not valid hex"),
        (["LEDGER", "--checkpoints", "nope.jsonl"], "checkpoint file not found"),
    ],
)
def test_operational_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   argv: list[str], message: str) -> None:
    write_ledger(tmp_path / "LEDGER")
    (tmp_path / "EMPTY").mkdir()
    argv = [str(tmp_path / a) if a in ("missing-dir", "EMPTY", "LEDGER", "nope.jsonl") else a
            for a in argv]
    assert main(["ledger", "verify", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_keygen(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ledger", "keygen", "--format", "json"]) == 0
    keys = json.loads(capsys.readouterr().out)
    key = SigningKey.from_seed_hex(keys["signing_seed_hex"])
    assert key.public.hex == keys["public_key_hex"] and key.kid == keys["kid"]
