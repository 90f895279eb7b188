"""Listening sockets, bound before anything starts so a busy port is one clear line."""

from __future__ import annotations

import socket


def open_listen_socket(bind: str, *, backlog: int, reuse_port: bool) -> socket.socket:
    """Bind ``HOST:PORT`` (``[v6]:PORT`` too). ``reuse_port`` lets worker processes share it."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    family, kind, proto, _, address = socket.getaddrinfo(
        host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def display_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
