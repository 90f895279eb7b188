"""The gateway's HTTP/1.1 server: httptools parsing, trio I/O, ASGI to the application."""

from sbactor.http_server._listen import display_address, open_listen_socket
from sbactor.http_server._parse import (
    ProtocolViolation,
    Refusal,
    Request,
    RequestReader,
    request_id_of,
)
from sbactor.http_server._server import HttpServer, ServerLimits, ServerStatistics

__all__ = [
    "HttpServer",
    "ProtocolViolation",
    "Refusal",
    "Request",
    "RequestReader",
    "ServerLimits",
    "ServerStatistics",
    "display_address",
    "open_listen_socket",
    "request_id_of",
]
