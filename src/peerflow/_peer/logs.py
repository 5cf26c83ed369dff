"""Log records that name the node, the call, the caller and the trace.

Each peer component logs through its own standard ``logging`` logger
(``peerflow.peer.server``, ``.grpc``, ``.service``, ``.client``, ...), and the
HTTP/2 driver and listener through ``peerflow.transport``. Every record from
them carries ``node_id``, ``call_id``, ``caller_node_id`` and ``trace_id``
attributes (for formatters: ``%(node_id)s``), and its message starts with
``[node call]``, or ``[node call from caller]`` while a peer serves a call,
so plain handlers show them too.

The ids live in context variables: set once where a call (or a
connection's work for a node) begins, they follow every task spawned from
there. Outside a call the call and caller ids are ``"-"``; the trace id is
the W3C trace id of the current trace context (:mod:`.trace`), ``"-"``
without one.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, final

from .trace import current_caller_node_id, current_trace_context

__all__ = [
    "PeerLogger",
    "current_call_id",
    "for_node",
    "set_call_id",
]

_node_id: contextvars.ContextVar[str] = contextvars.ContextVar("peerflow_node_id", default="-")
_call_id: contextvars.ContextVar[str] = contextvars.ContextVar("peerflow_call_id", default="-")


def current_call_id() -> str:
    """The id of the call the current task works for, or ``"-"`` outside calls."""
    return _call_id.get()


def set_call_id(call_id: str) -> None:
    """Mark the current task (and the tasks it starts) as working for ``call_id``."""
    _call_id.set(call_id)


@contextmanager
def for_node(node_id: str) -> Iterator[None]:
    """Within the block, tasks started log for ``node_id`` (the block's own task too).

    Wrap where a server or client starts the tasks that do its work: they
    keep the node id, and the caller's task gets its own back on exit.
    """
    token = _node_id.set(node_id)
    try:
        yield
    finally:
        _node_id.reset(token)


@final
class _Stamper(logging.Filter):
    """Stamps a record with the ids and prefixes its message with them."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        node_id = fields.setdefault("node_id", _node_id.get())
        call_id = fields["call_id"] = _call_id.get()
        caller = fields["caller_node_id"] = current_caller_node_id()
        trace = current_trace_context()
        fields["trace_id"] = "-" if trace is None else trace.trace_id
        prefix = (
            f"[{node_id} {call_id}] " if caller == "-" else f"[{node_id} {call_id} from {caller}] "
        )
        if record.args:
            # A caller picks its own call id: a % in it must not format.
            prefix = prefix.replace("%", "%%")
        record.msg = prefix + str(record.msg)
        return True


_STAMPER = _Stamper()


@final
class PeerLogger(logging.LoggerAdapter):  # type: ignore[type-arg]  # generic only on 3.11+
    """A component's logger bound to the node id it speaks for."""

    def __init__(self, component: str, node_id: str) -> None:
        logger = logging.getLogger(f"peerflow.peer.{component}")
        logger.addFilter(_STAMPER)  # once: a logger keeps one of each filter
        super().__init__(logger, {"node_id": node_id})

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        """Add this logger's node id to the record; the filter stamps the rest."""
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


# The transport layer knows nothing of peers and logs through a plain logger,
# and so does the CLI: their records take the node id of the tasks that log.
logging.getLogger("peerflow.transport").addFilter(_STAMPER)
logging.getLogger("peerflow.cli").addFilter(_STAMPER)
