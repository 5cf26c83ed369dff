"""Component loggers that stamp every record with the node id and the call id.

Each peer component logs through its own standard ``logging`` logger
(``peerflow.peer.server``, ``.grpc``, ``.service``, ``.client``). Records carry
``node_id``, ``call_id`` and ``trace_id`` attributes (for formatters:
``%(node_id)s``) and the message starts with ``[node call]`` so plain
handlers show the first two too. The call id lives in a context variable: set
once per call, it follows every task the call spawns. The trace id is the
W3C trace id of the current trace context (:mod:`.trace`), ``"-"`` without one.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import MutableMapping
from typing import Any, final

from .trace import current_trace_context

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
        """Stamp the record with node, call and trace ids; prefix the message with the first two."""
        node_id = self.extra["node_id"] if self.extra else "-"
        call_id = _call_id.get()
        trace = current_trace_context()
        kwargs["extra"] = {
            "node_id": node_id,
            "call_id": call_id,
            "trace_id": "-" if trace is None else trace.trace_id,
            **kwargs.get("extra", {}),
        }
        return f"[{node_id} {call_id}] {msg}", kwargs
