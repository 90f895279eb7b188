"""Long-lived actors that own the gateway's mutable state."""

from sbactor.actors.runtime import (
    Actor,
    ActorCallTimeout,
    ActorClosed,
    ActorCrashed,
    ActorError,
    ActorStatistics,
    ActorSystem,
    Supervision,
)

__all__ = [
    "Actor",
    "ActorCallTimeout",
    "ActorClosed",
    "ActorCrashed",
    "ActorError",
    "ActorStatistics",
    "ActorSystem",
    "Supervision",
]
