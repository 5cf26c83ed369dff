"""The whole public error hierarchy of peerflow.

Everything peerflow raises on purpose derives from :class:`PeerflowError`.
Engine failures are :class:`WorkflowError` subclasses, transport and protocol
failures are :class:`PeerError` subclasses. Errors carry their data as
attributes (``step_id``, ``got``, ``supported``...), not only in the message.
"""

from __future__ import annotations

__all__ = [
    "DuplicateStepError",
    "PeerAuthError",
    "PeerEncodeError",
    "PeerEnvelopeVersionError",
    "PeerError",
    "PeerLimitError",
    "PeerRefNotFoundError",
    "PeerRefNotSerializableError",
    "PeerTimeoutError",
    "PeerTlsError",
    "PeerTransportError",
    "PeerUnavailableError",
    "PeerUnknownStepError",
    "PeerWorkflowError",
    "PeerflowError",
    "RefCapacityError",
    "RefError",
    "RefNotFoundError",
    "RefNotSerializableError",
    "StepError",
    "StepTimeoutError",
    "UnroutableEventError",
    "WorkflowError",
    "WorkflowTimeoutError",
]


class PeerflowError(Exception):
    """Root of every error peerflow raises on purpose."""


# --------------------------------------------------------------------------
# Workflow engine


class WorkflowError(PeerflowError):
    """A workflow run failed, or a workflow was defined wrongly."""


class DuplicateStepError(WorkflowError):
    """A step id was registered twice with different handlers.

    Attributes:
        step_id: the id that clashed.
    """

    def __init__(self, step_id: str) -> None:
        super().__init__(f"step id {step_id!r} is already registered with another handler")
        self.step_id = step_id


class StepError(WorkflowError):
    """A step raised; the run failed.

    The original exception is kept as ``__cause__``.

    Attributes:
        step_id: the step whose handler raised.
    """

    def __init__(self, step_id: str, cause: BaseException) -> None:
        super().__init__(f"step {step_id!r} failed: {type(cause).__name__}: {cause}")
        self.step_id = step_id
        self.__cause__ = cause


class WorkflowTimeoutError(WorkflowError):
    """The whole run exceeded its timeout; its work was cancelled.

    Attributes:
        timeout: the timeout in seconds that expired.
    """

    def __init__(self, workflow_name: str, timeout: float) -> None:
        super().__init__(f"workflow {workflow_name!r} timed out after {timeout:g}s")
        self.workflow_name = workflow_name
        self.timeout = timeout


class StepTimeoutError(WorkflowTimeoutError):
    """One step exceeded its own timeout; the step was cancelled and the run failed.

    Attributes:
        step_id: the step that timed out.
        timeout: its timeout in seconds.
    """

    def __init__(self, workflow_name: str, step_id: str, timeout: float) -> None:
        WorkflowError.__init__(self, f"step {step_id!r} timed out after {timeout:g}s")
        self.workflow_name = workflow_name
        self.step_id = step_id
        self.timeout = timeout


class UnroutableEventError(WorkflowError):
    """An event was emitted that no step accepts.

    Attributes:
        event_type: the wire name of the event.
    """

    def __init__(self, event_type: str, workflow_name: str | None = None) -> None:
        where = f" in workflow {workflow_name!r}" if workflow_name else ""
        super().__init__(f"no step accepts events of type {event_type!r}{where}")
        self.event_type = event_type
        self.workflow_name = workflow_name


# --------------------------------------------------------------------------
# Session refs (local)


class RefError(PeerflowError):
    """A session-ref operation failed."""


class RefNotFoundError(RefError, LookupError):
    """No ref with this id exists, or it belongs to somebody else.

    Attributes:
        ref_uuid: the id that was looked up.
    """

    def __init__(self, ref_uuid: str, detail: str = "") -> None:
        super().__init__(f"session ref {ref_uuid!r} not found{detail}")
        self.ref_uuid = ref_uuid


class RefCapacityError(RefError):
    """The ref registry (or one caller's share of it) is full.

    Attributes:
        capacity: the limit that was hit.
    """

    def __init__(self, capacity: int, scope: str = "registry") -> None:
        super().__init__(f"session ref {scope} is full ({capacity} refs); release some refs first")
        self.capacity = capacity


class RefNotSerializableError(RefError):
    """A ref's value has no registered serializer, so it cannot leave its node.

    Attributes:
        ref_uuid: the ref.
        value_type: the qualified name of the value's type.
    """

    def __init__(self, ref_uuid: str, value_type: str) -> None:
        super().__init__(
            f"session ref {ref_uuid!r} holds a {value_type} which has no registered "
            "serializer (see peerflow.register_ref_type); it is live-only on its node"
        )
        self.ref_uuid = ref_uuid
        self.value_type = value_type


# --------------------------------------------------------------------------
# Peer transport


class PeerError(PeerflowError):
    """A call to or from a peer failed at the transport or protocol level."""


class PeerUnknownStepError(PeerError):
    """The peer has no step registered under this id. Nothing ran.

    Attributes:
        step_id: the first unknown step id.
    """

    def __init__(self, step_id: str) -> None:
        super().__init__(f"peer has no step registered as {step_id!r}")
        self.step_id = step_id


class PeerEnvelopeVersionError(PeerError):
    """The envelope version is newer than the receiver supports.

    Attributes:
        got: the version that was received.
        supported: the newest version the receiver speaks.
    """

    def __init__(self, got: int, supported: int) -> None:
        super().__init__(f"envelope version {got} is newer than the supported version {supported}")
        self.got = got
        self.supported = supported


class PeerWorkflowError(PeerError):
    """The remote workflow ran and failed.

    Attributes:
        message: the remote error message.
        step_id: the step that failed, when known.
        error_type: the remote exception's type name, when known.
    """

    def __init__(
        self, message: str, *, step_id: str | None = None, error_type: str | None = None
    ) -> None:
        parts = [f"remote workflow failed: {message}"]
        if step_id is not None:
            parts.append(f"(step {step_id!r}")
            parts.append(f"{error_type})" if error_type else ")")
        super().__init__(" ".join(parts).replace(" )", ")"))
        self.message = message
        self.step_id = step_id
        self.error_type = error_type


class PeerTransportError(PeerError):
    """Network failure: refused, reset, GOAWAY, TLS handshake, protocol violation."""


class PeerTimeoutError(PeerTransportError):
    """The call's deadline passed before the peer answered."""


class PeerUnavailableError(PeerTransportError):
    """The call never started on the peer, so it is safe to retry.

    The connection could not be made (refused, unreachable), was already
    closed or going away (GOAWAY), the peer refused the stream (RST_STREAM
    REFUSED_STREAM), or it (or a proxy in front of it) answered gRPC
    UNAVAILABLE. :class:`~peerflow.PeerPool` fails
    such calls over to another peer.
    """


class PeerEncodeError(PeerError, ValueError):
    """A value could not be encoded to, or decoded from, the wire.

    Attributes:
        path: where the offending value sits, e.g. ``input["rows"][3]``
            (empty when the whole message is at fault).
        reason: what is wrong with it.
    """

    def __init__(self, reason: str, path: str = "") -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


class PeerTlsError(PeerError):
    """TLS configuration is wrong: a missing, unparsable or mismatched PEM file.

    Attributes:
        path: the offending file, when one is to blame.
        reason: what is wrong.
    """

    def __init__(self, reason: str, path: str | None = None) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


class PeerAuthError(PeerError):
    """The peer refused the call's credentials (gRPC UNAUTHENTICATED)."""


class PeerLimitError(PeerError):
    """A configured limit was exceeded (gRPC RESOURCE_EXHAUSTED)."""


class PeerRefNotFoundError(PeerError, RefNotFoundError):
    """The peer has no ref with this id that belongs to this caller."""


class PeerRefNotSerializableError(PeerError, RefNotSerializableError):
    """The remote ref's value cannot be sent: it has no serializer on its node."""
