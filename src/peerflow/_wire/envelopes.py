"""The message classes of the peer protocol: one frozen attrs class per envelope.

Each class is one msgpack map on the wire (see protocol/README.md for the
exact keys). The ``v`` key is not an attribute: the codec writes the current
version on encode and checks it on decode. Attributes whose metadata says
``optional`` are left out of the encoded map while they hold their default,
so adding such a field never needs a version bump.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import attrs

from .._refs.descriptor import RemoteRefDescriptor
from ..errors import PeerWorkflowError
from .values import WireValue

__all__ = [
    "DerefChunk",
    "DerefSessionRefRequest",
    "ErrorDetails",
    "InlineRef",
    "InvokeSubWorkflowRequest",
    "LeaseRequest",
    "LeaseResponse",
    "Message",
    "ReleaseSessionRefRequest",
    "ReleaseSessionRefResponse",
    "StreamEvent",
    "SubWorkflowResponse",
]

#: Field metadata marking a key that is omitted from the wire while it holds
#: its default value.
OPTIONAL = {"optional": True}


def _optional(default: Any) -> Any:
    return attrs.field(default=default, metadata=OPTIONAL, kw_only=True)


def _str_tuple(value: Any) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class InvokeSubWorkflowRequest:
    """Request of ``InvokeSubWorkflow`` and ``StreamSubWorkflow``.

    Attributes:
        workflow_name: the sub-workflow's name, for the peer's logs and runs.
        step_ids: the ordered step ids the peer must run; all must be
            registered there.
        input: the wire value handed to the run's ``StartEvent``.
        timeout_ms: the caller's own timeout in milliseconds, if any; the peer
            applies the earlier of this and ``grpc-timeout``.
        lease_id: binds ``UNTIL_PARENT_FINISH`` refs created by this call to
            the caller's lease (see :class:`LeaseRequest`).
    """

    workflow_name: str
    step_ids: tuple[str, ...] = attrs.field(converter=_str_tuple)
    input: WireValue = None
    timeout_ms: int | None = _optional(None)
    lease_id: str | None = _optional(None)


@attrs.frozen
class InlineRef:
    """A session ref that travelled inside the response, value and all.

    ``UNTIL_CONTEXT_DROP`` refs with a registered serializer die with the
    remote run, so their bytes are shipped back instead of a handle.

    Attributes:
        descriptor: what the ref was on its origin node.
        payload: the serializer's bytes; decode them with the ref type
            registered under ``descriptor.type_tag``.
    """

    descriptor: RemoteRefDescriptor
    payload: bytes


@attrs.frozen
class SubWorkflowResponse:
    """The outcome of a remote sub-workflow run.

    A remote *workflow* failure is not raised by the call: it arrives here
    with ``error`` set, and :meth:`raise_for_error` raises it.

    Attributes:
        result: the ``StopEvent`` result (None when the run failed).
        state: the run's exported ``ctx.state``.
        remote_refs: refs that outlive the call (``UNTIL_PARENT_FINISH``,
            ``UNTIL_EXPLICIT_DROP``), by uuid; fetch or release them on
            ``origin_node_id``.
        error: the remote error message, or None if the run succeeded.
        error_step_id: the step that failed, when known.
        error_type: the remote exception's type name, when known.
        inline_refs: ``UNTIL_CONTEXT_DROP`` refs shipped with their bytes.
        dropped_refs: uuids of ``UNTIL_CONTEXT_DROP`` refs that had no
            serializer and died with the run.
    """

    result: WireValue = None
    state: dict[str, WireValue] = attrs.field(factory=dict)
    remote_refs: dict[str, RemoteRefDescriptor] = attrs.field(factory=dict)
    error: str | None = None
    error_step_id: str | None = None
    error_type: str | None = None
    inline_refs: dict[str, InlineRef] = attrs.field(factory=dict, metadata=OPTIONAL)
    dropped_refs: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple, metadata=OPTIONAL)

    def raise_for_error(self) -> None:
        """Raise the remote failure, if there was one.

        Raises:
            PeerWorkflowError: ``error`` is set; it carries ``step_id`` and
                ``error_type`` from the peer.
        """
        if self.error is not None:
            raise PeerWorkflowError(
                self.error, step_id=self.error_step_id, error_type=self.error_type
            )


@attrs.frozen
class StreamEvent:
    """One event streamed by ``StreamSubWorkflow`` before its final response.

    Attributes:
        event_type: the event's wire name.
        data: the event's fields as wire values.
    """

    event_type: str
    data: dict[str, WireValue] = attrs.field(factory=dict)


@attrs.frozen
class DerefSessionRefRequest:
    """Request of ``DerefSessionRef``: fetch a ref's serialized bytes.

    Attributes:
        ref_uuid: the ref to fetch; it must belong to the caller.
    """

    ref_uuid: str


@attrs.frozen
class DerefChunk:
    """One message of the ``DerefSessionRef`` response stream.

    The value's bytes are the concatenation of every chunk's ``payload``.

    Attributes:
        payload: the next slice of the serialized value.
        type_tag: the ref type's tag; sent on the first chunk only.
        total_size: the full length in bytes; sent on the first chunk only.
    """

    type_tag: str | None = _optional(None)
    total_size: int | None = _optional(None)
    payload: bytes = b""


@attrs.frozen
class ReleaseSessionRefRequest:
    """Request of ``ReleaseSessionRef``: drop a ref on its origin node.

    Attributes:
        ref_uuid: the ref to drop; it must belong to the caller.
    """

    ref_uuid: str


@attrs.frozen
class ReleaseSessionRefResponse:
    """Response of ``ReleaseSessionRef``.

    Attributes:
        released: True if the ref existed and was dropped, False if it was
            already gone.
    """

    released: bool


@attrs.frozen
class LeaseRequest:
    """Request of the optional ``Lease`` method: open, renew or close a lease.

    A lease is the caller's scope on the peer. ``UNTIL_PARENT_FINISH`` refs
    created by calls that name the lease live until it is closed, or until it
    expires because the caller stopped renewing it.

    Attributes:
        lease_id: chosen by the caller (a uuid4 string); unique per caller.
        ttl_ms: the lease expires this long after the peer receives this
            request unless renewed. Ignored when closing.
        close: close the lease now and release its refs.
    """

    lease_id: str
    ttl_ms: int
    close: bool = _optional(False)


@attrs.frozen
class LeaseResponse:
    """Response of ``Lease``.

    Attributes:
        lease_id: echoes the request.
        ttl_ms: the TTL the peer granted (it may clamp the request); renew
            well before it runs out. 0 after a close.
        released: how many refs a close released.
    """

    lease_id: str
    ttl_ms: int
    released: int = _optional(0)


@attrs.frozen
class ErrorDetails:
    """Machine-readable detail of a failed call, sent as ``peerflow-error-bin``.

    Attributes:
        code: the peerflow error kind, e.g. ``"unknown_step"`` (the table is
            in :mod:`peerflow._wire.grpc`).
        message: human-readable text.
        step_id: for ``unknown_step``.
        got: for ``envelope_version``: the version received.
        supported: for ``envelope_version``: the newest version spoken.
        path: for ``encode``: where the offending value sits.
        ref_uuid: for ``ref_not_found`` and ``ref_not_serializable``.
        value_type: for ``ref_not_serializable``.
    """

    code: str
    message: str
    step_id: str | None = _optional(None)
    got: int | None = _optional(None)
    supported: int | None = _optional(None)
    path: str | None = _optional(None)
    ref_uuid: str | None = _optional(None)
    value_type: str | None = _optional(None)


#: Every message class the codec knows.
Message: TypeAlias = (
    InvokeSubWorkflowRequest
    | SubWorkflowResponse
    | StreamEvent
    | DerefSessionRefRequest
    | DerefChunk
    | ReleaseSessionRefRequest
    | ReleaseSessionRefResponse
    | LeaseRequest
    | LeaseResponse
    | ErrorDetails
)

# The public facade re-homes these classes to ``peerflow``, where names such as
# WireValue do not exist; resolve the string annotations while they still can
# be, so cattrs never has to.
for _cls in (RemoteRefDescriptor, InlineRef, *Message.__args__):
    attrs.resolve_types(_cls)
