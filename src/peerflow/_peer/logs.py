"""Component loggers that stamp every record with the node id and the call id.

Each peer component logs through its own standard ``logging`` logger
(``peerflow.peer.server``, ``.grpc``, ``.service``, ``.client``). Records carry
``node_id`` and ``call_id`` attributes (for formatters: ``%(node_id)s``) and
the message starts with ``[node call]`` so plain handlers show them too. The
call id lives in a context variable: set once per call, it follows every task
the call spawns.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import MutableMapping
from typing import Any, final

__all__ = ["PeerLogger", "current_call_id", "set_call_id"]

_call_id: contextvars.ContextVar[str] = contextvars.ContextVar("peerflow_call_id", default="-")


def current_call_id() -> str:
    """The id of the call the current task works for, or ``"-"`` outside calls."""
    return _call_id.get()


def set_call_id(call_id: str) -> None:
    """Mark the current task (and the tasks it starts) as working for ``call_id``."""
    _call_id.set(call_id)


@final
class PeerLogger(logging.LoggerAdapter):  # type: ignore[type-arg]  # generic only on 3.11+
    """A component's logger bound to the node id it speaks for."""

    def __init__(self, component: str, node_id: str) -> None:
        super().__init__(logging.getLogger(f"peerflow.peer.{component}"), {"node_id": node_id})

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        """Add ``node_id`` and ``call_id`` to the record and to the message."""
        node_id = self.extra["node_id"] if self.extra else "-"
        call_id = _call_id.get()
        kwargs["extra"] = {"node_id": node_id, "call_id": call_id, **kwargs.get("extra", {})}
        return f"[{node_id} {call_id}] {msg}", kwargs
