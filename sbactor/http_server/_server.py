"""The HTTP/1.1 server: trio sockets around the sans-I/O core in ``_parse``, speaking ASGI.

Why not hypercorn (which we used first): on this 2-core machine hypercorn spent ~590 µs of CPU per
request on a trivial reply at concurrency 1, this server ~140 µs (h11 alone: ~290 µs) — about a
third of the gateway's whole added latency (benchmarks/README.md). A gateway also needs two
things hypercorn does not give: a cap on open connections that answers 503 cheaply instead of
parsing every request of a connection storm (after closing the longest-idle keep-alive
connection, when one is idle, to make room), and a shutdown that closes idle keep-alive
connections at once instead of waiting out the grace period.

One task per connection (``_connection``); requests on a connection are served in order
(pipelining is queued). While the application runs, a second ``receive()`` watches the socket
for the client leaving, as ASGI's ``http.disconnect`` (``_exchange``).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from collections.abc import Awaitable, Callable

import attrs
import trio

from sbactor.http_server._access import log_access, request_line
from sbactor.http_server._connection import Connection, address
from sbactor.http_server._exchange import READ_SIZE, ASGIApp
from sbactor.http_server._parse import Refusal, Request, error_response

log = logging.getLogger("sbactor.http")

_ACCEPT_BURST = 256  # connections taken per wake-up of the accept loop
# over-cap connections waiting for their request; beyond: closed unanswered. Each costs a file
# descriptor and a few KiB of kernel memory, nothing on our heap to speak of. 4,096 was too few
# at 4x saturation on this machine (an overloaded load generator connects long before it
# writes): the overflow was exactly the connection errors its clients saw.
_MAX_PENDING_REFUSALS = 16384
_MACOS_OPEN_MAX = 10240  # the most setrlimit accepts there when the hard limit is "unlimited"
_REFUSAL_WAIT_S = 5.0  # an over-cap connection that sends nothing in this long is closed
_SWEEP_INTERVAL_S = 0.01
_LINGER_LIMIT = 1 << 20  # request bytes read and dropped after an early error answer


@attrs.frozen
class ServerLimits:
    max_connections: int = 2048
    max_body_bytes: int = 4 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    keep_alive_s: float = 75.0  # idle time between requests before we close
    request_read_s: float = 30.0  # from a request's first byte to its last
    write_timeout_s: float = 30.0  # for each ≤ 64 KiB of a response to be taken by the client
    evict_idle_after_s: float = 2.0  # at the cap, only a connection idle this long makes room
    #: descriptors the rest of the process may need (upstream pools, ledger, logs, listeners):
    #: pending refusals never take these
    reserved_fds: int = 1024


@attrs.frozen
class ServerStatistics:
    connections: int  # open now
    refused_connections: int  # over the connection cap, since the start
    requests: int  # passed to the application, since the start
    evicted_connections: int = 0  # idle ones closed to make room at the cap, since the start
    # over the cap and closed without the 503: no request within _REFUSAL_WAIT_S, or more
    # waiting than the descriptors allow (the client sees the connection close unanswered)
    unanswered_refusals: int = 0


def _cap_refusal() -> bytes:
    """The 503 at the connection cap (a fresh request id each time)."""
    message = "the gateway is at its connection limit; retry shortly"
    return error_response(503, message, extra=[(b"retry-after", b"1")])


@attrs.define(eq=False)
class HttpServer:
    """Serve ``app`` on listeners until ``shutdown`` is called, then drain within ``grace_s``."""

    app: ASGIApp
    limits: ServerLimits = attrs.field(factory=ServerLimits)
    access_log: bool = False
    #: called with each parsed request before the app: a ``Refusal`` is answered at once
    #: (load shedding that costs no application work), None lets the request through
    admission: Callable[[Request], Refusal | None] | None = None
    _connections: set[Connection] = attrs.field(factory=set, init=False)
    # idle connections (``Connection``'s doc), the longest idle first: closed to make room
    _idle: dict[Connection, None] = attrs.field(factory=dict, init=False)
    _evicting: int = attrs.field(default=0, init=False)  # closed to make room, not yet gone
    _refused: int = attrs.field(default=0, init=False)
    _evicted: int = attrs.field(default=0, init=False)
    _unanswered: int = attrs.field(default=0, init=False)
    # over-cap connections whose request has not arrived yet: fd -> (socket, give-up time)
    _pending_refusals: dict[int, tuple[socket.socket, float]] = attrs.field(
        factory=dict, init=False
    )
    # the pending refusals' sockets, registered while they wait: one poll() per sweep, not one
    # registration per socket per sweep (that was ~20 % of a core with thousands waiting)
    _refusal_poller: select.poll = attrs.field(factory=select.poll, init=False)
    _refusals_waiting: trio.Event = attrs.field(factory=trio.Event, init=False)
    _max_pending: int = attrs.field(default=_MAX_PENDING_REFUSALS, init=False)
    _requests: int = attrs.field(default=0, init=False)
    _draining: bool = attrs.field(default=False, init=False)
    _all_closed: trio.Event = attrs.field(factory=trio.Event, init=False)

    def _refuse_at_once(self, sock: socket.socket) -> bool:
        """Over the cap, when the request is already in the socket (the usual case in a storm:
        clients send right after connecting): read it, write the 503, close — no task, no
        scheduling round. Reading first matters: closing with unread bytes makes the kernel
        send RST, which can make the client drop the answer. False: nothing to read yet."""
        started = time.perf_counter()
        sock.setblocking(False)
        try:
            request = sock.recv(READ_SIZE)
        except BlockingIOError:
            return False
        except OSError:
            sock.close()
            return True
        sent = 0
        if request:
            try:
                sent = sock.send(_cap_refusal())
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if self.access_log:
                method, path = request_line(request)
                log_access(method, path, 503, sent, started, address(sock.getpeername))
        sock.close()
        return True

    def _refuse_later(self, sock: socket.socket) -> None:
        """Over the cap, with the request not in the socket yet: one sweeper task answers it
        when it arrives (a task per refusal piled up by the thousand in a storm)."""
        pending = self._pending_refusals
        if len(pending) >= self._max_pending:  # a storm beyond even that: spend nothing
            self._unpend(next(iter(pending))).close()
            self._unanswered += 1
        pending[sock.fileno()] = (sock, trio.current_time() + _REFUSAL_WAIT_S)
        self._refusal_poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        self._refusals_waiting.set()

    def _unpend(self, fd: int) -> socket.socket:
        """Take a pending refusal out, unregistered before anyone closes it (a closed fd left
        registered would report whatever socket reuses its number)."""
        sock, _deadline = self._pending_refusals.pop(fd)
        self._refusal_poller.unregister(fd)
        return sock

    async def _sweep_refusals(self) -> None:
        """Answer pending refusals whose request has arrived; close those that sent nothing."""
        pending = self._pending_refusals
        while True:
            if not pending:
                self._refusals_waiting = trio.Event()
                await self._refusals_waiting.wait()
            await trio.sleep(_SWEEP_INTERVAL_S)
            for fd, _events in self._refusal_poller.poll(0):
                sock = self._unpend(fd)
                if not self._refuse_at_once(sock):
                    sock.close()
            now = trio.current_time()
            while pending:
                fd, (_sock, deadline) = next(iter(pending.items()))
                if deadline > now:
                    break  # insertion order is deadline order
                self._unpend(fd).close()
                self._unanswered += 1

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            len(self._connections),
            self._refused,
            self._requests,
            self._evicted,
            self._unanswered,
        )

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        shutdown_trigger: Callable[[], Awaitable[object]],
        grace_s: float,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._size_for_open_files()
        try:
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        acceptors.start_soon(self._accept_loop, listener, connections)
                    acceptors.start_soon(self._sweep_refusals)
                    task_status.started()
                    await shutdown_trigger()
                    acceptors.cancel_scope.cancel()  # stop accepting; open connections go on
                self._close_pending_refusals()
                for listener in listeners:
                    await listener.aclose()
                await self._drain(grace_s)
                connections.cancel_scope.cancel()
        finally:  # also when cancelled from outside: no socket left open
            self._close_pending_refusals()

    def _close_pending_refusals(self) -> None:
        for fd in list(self._pending_refusals):
            self._unpend(fd).close()

    def _size_for_open_files(self) -> None:
        """Every connection and pending refusal is a file descriptor: raise the soft limit
        toward the hard one if the cap needs it (the common soft default, 1,024, is below
        ``max_connections``' default), and size the pending refusals to what is left."""
        cap, spare = self.limits.max_connections, self.limits.reserved_fds
        limit = raise_open_files_limit(cap + _MAX_PENDING_REFUSALS + spare)
        self._max_pending = max(64, min(_MAX_PENDING_REFUSALS, limit - cap - spare))
        if limit < cap + spare:
            log.warning(
                f"open files limit {limit} is below max_connections {cap} + {spare} spare:"
                " accepts will fail before the cap (raise it: ulimit -n, systemd LimitNOFILE=)",
                extra={"open_files_limit": limit, "max_connections": cap},
            )

    async def _drain(self, grace_s: float) -> None:
        """Idle connections close now; busy ones after their current response, and one with a
        request half received after that request's response."""
        self._draining = True
        for connection in list(self._idle):
            connection.close_if_idle()
        if self._connections:
            with trio.move_on_after(grace_s):
                await self._all_closed.wait()
            if self._connections:
                log.warning("shutdown grace over", extra={"connections": len(self._connections)})

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """Accept in bursts: ``listener.accept()`` yields to the scheduler after every
        connection, so with hundreds of busy connection tasks the gateway accepted one
        connection per scheduler pass — a storm then waited in the kernel's backlog until
        clients timed out, instead of getting its quick 503. Here every wake-up takes all that
        is waiting (up to a bound), from a duplicate of the listening socket's descriptor."""
        raw = socket.socket(fileno=os.dup(listener.socket.fileno()))
        raw.setblocking(False)
        try:
            while True:
                await trio.lowlevel.wait_readable(raw)
                for _ in range(_ACCEPT_BURST):
                    try:
                        sock, _address = raw.accept()
                    except BlockingIOError:
                        break
                    except OSError as exc:  # EMFILE and friends: back off instead of spinning
                        log.warning("accept failed", extra={"error": str(exc)})
                        await trio.sleep(0.1)
                        break
                    self._admit(sock, nursery)
        finally:
            raw.close()

    def _admit(self, sock: socket.socket, nursery: trio.Nursery) -> None:
        open_ = len(self._connections) - self._evicting
        if open_ >= self.limits.max_connections and not self._evict_idle():
            self._refused += 1
            if not self._refuse_at_once(sock):
                self._refuse_later(sock)
            return
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        connection = Connection(self, stream, raw=sock)
        self._connections.add(connection)
        nursery.start_soon(self._run_connection, connection)

    def _evict_idle(self) -> bool:
        """Close the longest-idle connection to make room for a new one; False if none has
        been idle for ``evict_idle_after_s``. Under a storm every keep-alive connection is idle
        for a moment between its requests: evicting those would close connections that are
        about to be used (the client's next request then meets a closed socket), so a storm's
        new connections get the cheap 503 instead, and the clients already in keep their
        connections."""
        oldest_allowed = trio.current_time() - self.limits.evict_idle_after_s
        for connection in self._idle:  # the longest idle first
            if connection.idle_since > oldest_allowed:
                return False
            if connection.has_unread_bytes():
                # its next request is in the socket, not yet read (the loop is busy): closing
                # now would drop a request the client already sent — it is not idle
                continue
            connection.evicted = True
            self._evicting += 1
            self._evicted += 1
            return connection.close_if_idle()
        return False

    async def _run_connection(self, connection: Connection) -> None:
        try:
            await connection.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away mid-write
        except Exception:
            log.exception("connection failed")
        finally:
            self._connections.discard(connection)
            if connection.evicted:
                self._evicting -= 1
            if connection.linger:
                with trio.CancelScope(shield=True):
                    await linger_close(connection.stream)
            else:
                await _close(connection.stream)
            if self._draining and not self._connections:
                self._all_closed.set()


async def _close(stream: trio.SocketStream) -> None:
    with trio.CancelScope(shield=True):
        await stream.aclose()


async def linger_close(stream: trio.SocketStream, *, seconds: float = 1.0) -> None:
    """Close after an early answer without resetting the connection: closing with unread
    request bytes makes the kernel send RST, and some clients then drop the answer they were
    sent. So: FIN our side, read and discard what the client still sends (bounded), close."""
    try:
        await stream.send_eof()
        discarded = 0
        with trio.move_on_after(seconds):
            while discarded < _LINGER_LIMIT:
                data = await stream.receive_some(READ_SIZE)
                if not data:
                    break
                discarded += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await _close(stream)


def raise_open_files_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE to ``wanted`` (at most the hard limit); the soft limit now."""
    try:
        import resource
    except ImportError:  # not a Unix: nothing to raise, nothing we can tell
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return wanted if soft == resource.RLIM_INFINITY else soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    # macOS reports an unlimited hard limit but refuses more than OPEN_MAX: try that next
    for attempt in (target, min(target, _MACOS_OPEN_MAX)):
        if attempt <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (attempt, hard))
        except (ValueError, OSError):
            continue
        return attempt
    return soft
