"""Ref lifetimes and ref descriptors: plain values shared by the engine and the wire.

This module is pure data (no trio) so the sans-IO wire layer can use it.
"""

from __future__ import annotations

import enum

import attrs

__all__ = ["RefLifetime", "RemoteRefDescriptor"]


class RefLifetime(enum.Enum):
    """When a session ref is purged automatically.

    The enum values are the wire names.
    """

    #: Purged when the run (its nursery) that created the ref exits. Across a
    #: peer, such a ref travels inline in the response or is dropped.
    UNTIL_CONTEXT_DROP = "until_context_drop"
    #: Lives until the caller's scope ends (a ``PeerClient`` context or a
    #: ``client.ref_scope()`` block), or until its lease expires.
    UNTIL_PARENT_FINISH = "until_parent_finish"
    #: Never purged automatically; only an explicit release frees it.
    UNTIL_EXPLICIT_DROP = "until_explicit_drop"


@attrs.frozen
class RemoteRefDescriptor:
    """Describes a session ref whose value lives on ``origin_node_id``.

    Attributes:
        origin_node_id: the node that owns the value.
        type_tag: the serializer's type tag, or the value's qualified type
            name when it has no serializer (then it is live-only).
        created_at_epoch_ms: wall-clock creation time on the origin node.
        lifetime: the purge policy the value was inserted with.
        size: the serialized size in bytes when known cheaply, else None.
        serializable: False when the value has no serializer, so it can be
            released but not fetched from another node.
    """

    origin_node_id: str
    type_tag: str
    created_at_epoch_ms: int
    lifetime: RefLifetime = RefLifetime.UNTIL_CONTEXT_DROP
    size: int | None = None
    serializable: bool = True
