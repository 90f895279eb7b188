"""The access log: one record per response on the ``sbactor.access`` logger.

Every response the client gets is recorded, the application's and the server's own (400, 408,
413, 417, 431, 501, the 500 for a failed application and the 503 at the connection cap), with
the status the client got. What the server could not read of a request is logged as ``-``.
"""

from __future__ import annotations

import logging
import time

access_log = logging.getLogger("sbactor.access")

UNKNOWN = "-"


def log_access(
    method: str,
    path: str,
    status: int,
    sent_bytes: int,
    started: float,
    client: tuple[str, int] | None,
) -> None:
    """``started`` is a ``time.perf_counter()`` value: when the request began to arrive."""
    access_log.info(
        "%s %s %d",
        method,
        path,
        status,
        extra={
            "method": method,
            "path": path,
            "status": status,
            "bytes": sent_bytes,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            "client": client[0] if client else None,
        },
    )


def request_line(data: bytes) -> tuple[str, str]:
    """Method and target from the first bytes of a request that is not parsed (a refusal at
    the connection cap), or ``-`` for what does not look like a request line."""
    parts = data.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) == 3 and parts[0].isalpha() and parts[2].startswith(b"HTTP/"):
        return parts[0].decode("ascii"), parts[1].decode("latin-1")
    return UNKNOWN, UNKNOWN
