"""The actor runtime: a bounded mailbox, cast/call, statistics and supervision.

An actor owns its state exclusively and is driven by one task that pulls messages off a bounded
trio memory channel. Other tasks talk to it only by message:

* ``cast`` awaits room in the mailbox (backpressure); ``cast_nowait`` raises ``trio.WouldBlock``
  so a caller can shed load instead of queueing without bound.
* ``call`` sends a message with a one-slot reply channel and awaits the answer under a timeout.
  The actor replies with ``send_nowait`` and tolerates a caller that has gone away.
  When the actor is idle (waiting on an empty mailbox) and has a synchronous ``handle_now`` for
  the message, ``call`` runs that at once instead: on one trio thread this is the same order and
  the same exclusive access as a message, without two task switches and a reply channel (the
  budget pre-flight's round trip cost more than the pre-flight itself).

Supervision is explicit: when a handler raises, a ``RESTART`` actor backs off, resets itself with
``on_restart`` and goes on; an ``ESCALATE`` actor re-raises, which fails the whole gateway closed.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Sequence
from typing import Any

import attrs
import trio

log = logging.getLogger("sbactor.actors")


class Supervision(enum.Enum):
    RESTART = "restart"
    ESCALATE = "escalate"


class ActorClosed(trio.ClosedResourceError):
    """The actor no longer accepts messages (shutting down or crashed)."""


class ActorCallTimeout(trio.TooSlowError):
    """A ``call`` got no answer in time."""


class ActorError(RuntimeError):
    """The actor's handler raised while answering a ``call``."""


class ActorCrashed(RuntimeError):
    """An ``ESCALATE`` actor's handler raised: the gateway must stop."""


class NotInline(Exception):
    """Raised by ``handle_now``: this message must go through the mailbox."""


@attrs.frozen
class ActorStatistics:
    name: str
    capacity: int
    depth: int
    peak_depth: int
    blocked_senders: int
    processed: int
    errors: int
    last_error: str | None
    restarts: int
    uptime_s: float
    running: bool
    supervision: str
    state: dict[str, Any]
    inlined: int = 0  # calls answered by ``handle_now`` in the caller (counted in processed)


@attrs.frozen
class _Envelope:
    message: Any
    reply: trio.MemorySendChannel[Any] | None


@attrs.frozen
class _Failure:
    error: BaseException


@attrs.define(eq=False)
class Actor:
    """Base class. Subclasses override ``handle`` (or ``handle_batch``) and ``state_summary``."""

    name: str
    capacity: int = 1024
    supervision: Supervision = Supervision.RESTART
    batch_size: int = 1
    batch_window_s: float = 0.0  # wait this long after a batch's first message to gather more
    restart_backoff_s: float = 0.05
    restart_backoff_max_s: float = 5.0

    _send: trio.MemorySendChannel[_Envelope] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[_Envelope] = attrs.field(init=False)
    _peak_depth: int = attrs.field(init=False, default=0)
    _processed: int = attrs.field(init=False, default=0)
    _errors: int = attrs.field(init=False, default=0)
    _last_error: str | None = attrs.field(init=False, default=None)
    _restarts: int = attrs.field(init=False, default=0)
    _started_at: float | None = attrs.field(init=False, default=None)
    _running: bool = attrs.field(init=False, default=False)
    _idle: bool = attrs.field(init=False, default=False)  # awaiting an empty mailbox
    _closed: bool = attrs.field(init=False, default=False)
    _inlined: int = attrs.field(init=False, default=0)
    _stopped: trio.Event = attrs.field(init=False, factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"actor {self.name}: mailbox capacity must be >= 1")
        self._send, self._receive = trio.open_memory_channel(self.capacity)

    # ---- hooks for subclasses -------------------------------------------------------------

    async def on_start(self) -> None:
        """Runs before the actor reports ready (load state, open files)."""

    async def on_stop(self) -> None:
        """Runs once the mailbox is drained and closed (flush, fsync, checkpoint)."""

    async def on_restart(self) -> None:
        """Runs after a handler error under ``RESTART`` supervision: reset to a sane state."""

    async def handle(self, message: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not handle {message!r}")

    async def handle_batch(self, messages: Sequence[Any]) -> list[Any]:
        """Handle several messages at once (group commit); one result per message."""
        return [await self.handle(m) for m in messages]

    def handle_now(self, message: Any) -> Any:
        """A synchronous handler for ``call`` on an idle actor, for messages that need no await;
        raise ``NotInline`` for the others. Only for ``RESTART`` actors (an error here is the
        caller's ``ActorError``, it cannot crash the gateway)."""
        raise NotInline

    def state_summary(self) -> dict[str, Any]:
        return {}

    # ---- the client side -----------------------------------------------------------------

    async def cast(self, message: Any) -> None:
        """Send without waiting for an answer; waits for mailbox room (backpressure)."""
        try:
            await self._send.send(_Envelope(message, None))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ActorClosed(f"actor {self.name} is not accepting messages") from None
        self._idle = False
        self._note_depth()

    async def post(self, message: Any) -> None:
        """``cast`` that does not yield when there is room, so the sender's own work (sending a
        response) runs before the actor's; it still waits for room when the mailbox is full."""
        try:
            self.cast_nowait(message)
        except trio.WouldBlock:
            await self.cast(message)

    def cast_nowait(self, message: Any) -> None:
        """Like ``cast`` but raises ``trio.WouldBlock`` when the mailbox is full. An idle actor
        with a ``handle_now`` for the message handles it at once (see ``call``); an error there
        is counted and logged, as supervision would, never raised to the sender."""
        if self._idle and not self._closed and self.supervision is Supervision.RESTART:
            try:
                self.handle_now(message)
            except NotInline:
                pass
            except Exception as exc:
                self._errors += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.exception("actor %s failed handling a message inline", self.name)
                return
            else:
                self._processed += 1
                self._inlined += 1
                return
        try:
            self._send.send_nowait(_Envelope(message, None))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ActorClosed(f"actor {self.name} is not accepting messages") from None
        self._idle = False
        self._note_depth()

    async def call(self, message: Any, *, timeout: float = 5.0) -> Any:  # noqa: ASYNC109
        """Send a message and wait for the actor's answer (at most ``timeout`` seconds)."""
        if self._idle and not self._closed and self.supervision is Supervision.RESTART:
            # a cancelled caller must not act (reserve budget, say); this does not yield, so
            # nothing can slip in between the idle check and the handler
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                answer = self.handle_now(message)
            except NotInline:
                pass
            except Exception as exc:
                self._errors += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.exception("actor %s failed answering inline", self.name)
                raise ActorError(f"actor {self.name} failed: {exc!r}") from exc
            else:
                self._processed += 1
                self._inlined += 1
                return answer
        reply_send, reply_receive = trio.open_memory_channel[Any](1)
        try:
            with trio.fail_after(timeout):
                try:
                    await self._send.send(_Envelope(message, reply_send))
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    raise ActorClosed(f"actor {self.name} is not accepting messages") from None
                self._idle = False
                self._note_depth()
                try:
                    answer = await reply_receive.receive()
                except trio.EndOfChannel:
                    raise ActorClosed(f"actor {self.name} stopped before answering") from None
        except trio.TooSlowError:
            raise ActorCallTimeout(f"actor {self.name} did not answer within {timeout}s") from None
        finally:
            reply_receive.close()
        if isinstance(answer, _Failure):
            raise ActorError(f"actor {self.name} failed: {answer.error!r}") from answer.error
        return answer

    def close(self) -> None:
        """Stop accepting messages; those already in the mailbox are still processed."""
        self._closed = True
        self._send.close()

    async def stop(self) -> None:
        """Close the mailbox and wait until everything accepted has been processed."""
        self.close()
        if self._started_at is not None:
            await self._stopped.wait()

    def statistics(self) -> ActorStatistics:
        stats = self._send.statistics()
        uptime = 0.0 if self._started_at is None else time.monotonic() - self._started_at
        return ActorStatistics(
            name=self.name,
            capacity=self.capacity,
            depth=stats.current_buffer_used,
            peak_depth=self._peak_depth,
            blocked_senders=stats.tasks_waiting_send,
            processed=self._processed,
            errors=self._errors,
            last_error=self._last_error,
            restarts=self._restarts,
            uptime_s=round(uptime, 3),
            running=self._running,
            supervision=self.supervision.value,
            state=self.state_summary(),
            inlined=self._inlined,
        )

    def _note_depth(self) -> None:
        depth = self._send.statistics().current_buffer_used
        if depth > self._peak_depth:
            self._peak_depth = depth

    # ---- the actor's own task ------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Actor] = trio.TASK_STATUS_IGNORED) -> None:
        await self.on_start()
        self._started_at = time.monotonic()
        self._running = True
        task_status.started(self)
        backoff = self.restart_backoff_s
        try:
            async with self._receive:
                while True:
                    batch = await self._next_batch()
                    if batch is None:
                        break
                    try:
                        results = await self._dispatch(batch)
                    except Exception as exc:
                        self._errors += 1
                        self._last_error = f"{type(exc).__name__}: {exc}"
                        for envelope in batch:
                            _reply(envelope, _Failure(exc))
                        if self.supervision is Supervision.ESCALATE:
                            self._send.close()
                            raise ActorCrashed(f"actor {self.name} crashed: {exc!r}") from exc
                        self._restarts += 1
                        await trio.sleep(backoff)
                        backoff = min(backoff * 2, self.restart_backoff_max_s)
                        await self.on_restart()
                    else:
                        backoff = self.restart_backoff_s
                        self._processed += len(batch)
                        for envelope, result in zip(batch, results, strict=True):
                            _reply(envelope, result)
        finally:
            self._running = False
            try:
                with trio.move_on_after(30, shield=True):
                    await self.on_stop()
            finally:
                self._stopped.set()

    async def _next_batch(self) -> list[_Envelope] | None:
        try:
            try:
                first = self._receive.receive_nowait()
            except trio.WouldBlock:
                # only while blocked on an empty mailbox may ``call`` run ``handle_now`` in the
                # caller; every send clears this, so nothing can overtake a message
                self._idle = True
                try:
                    first = await self._receive.receive()
                finally:
                    self._idle = False
            else:  # as ``receive`` does: yield, but a cancel must not lose the message taken
                await trio.lowlevel.cancel_shielded_checkpoint()
        except trio.EndOfChannel:
            return None
        batch = [first]
        waiting = self._receive.statistics().current_buffer_used
        if self.batch_window_s > 0 and 0 < self.batch_size - 1 - waiting:
            await trio.sleep(self.batch_window_s)  # group commit: let a short batch fill up
        while len(batch) < self.batch_size:
            try:
                batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return batch

    async def _dispatch(self, batch: list[_Envelope]) -> list[Any]:
        if self.batch_size == 1:
            return [await self.handle(batch[0].message)]
        return await self.handle_batch([e.message for e in batch])


def _reply(envelope: _Envelope, result: Any) -> None:
    if envelope.reply is None:
        return
    try:
        envelope.reply.send_nowait(result)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
        pass  # the caller was cancelled or timed out; nobody is listening
    finally:
        envelope.reply.close()


@attrs.define(eq=False)
class ActorSystem:
    """The gateway's actors, started in order and closed in reverse (dependency) order."""

    actors: list[Actor] = attrs.field(factory=list)

    def add(self, actor: Actor) -> Actor:
        self.actors.append(actor)
        return actor

    async def start_all(self, nursery: trio.Nursery) -> None:
        for actor in self.actors:
            await nursery.start(actor.run)

    async def stop_all(self) -> None:
        """Stop actors in reverse start order, each drained before the next is closed."""
        for actor in reversed(self.actors):
            await actor.stop()

    def statistics(self) -> list[ActorStatistics]:
        return [a.statistics() for a in self.actors]

    @property
    def running(self) -> bool:
        return all(a.statistics().running for a in self.actors)
