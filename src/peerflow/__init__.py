"""peerflow: event-driven trio workflows that hand sub-workflows to peers.

This module is a thin facade: everything public is re-exported here, and each
object's ``__module__`` is fixed up to ``"peerflow"``.
"""

from __future__ import annotations

import contextlib

from ._engine.context import Context as Context
from ._engine.events import DynamicEvent as DynamicEvent
from ._engine.events import Event as Event
from ._engine.events import StartEvent as StartEvent
from ._engine.events import StopEvent as StopEvent
from ._engine.run import RunResult as RunResult
from ._engine.run import WorkflowHandle as WorkflowHandle
from ._engine.steps import StepRegistry as StepRegistry
from ._engine.steps import StepSpec as StepSpec
from ._engine.workflow import Workflow as Workflow
from ._peer.auth import peer_token_env as peer_token_env
from ._peer.auth import resolve_peer_token as resolve_peer_token
from ._peer.client import PeerClient as PeerClient
from ._peer.client import StreamCall as StreamCall
from ._peer.http_client import HttpPeerClient as HttpPeerClient
from ._peer.limits import Limits as Limits
from ._peer.pool import PeerPool as PeerPool
from ._peer.pool import PoolMember as PoolMember
from ._peer.server import PeerAddress as PeerAddress
from ._peer.server import PeerServer as PeerServer
from ._peer.trace import TraceContext as TraceContext
from ._peer.trace import current_trace_context as current_trace_context
from ._peer.trace import use_trace_context as use_trace_context
from ._peer.ws_client import WebSocketPeerClient as WebSocketPeerClient
from ._refs.descriptor import RefLifetime as RefLifetime
from ._refs.descriptor import RemoteRefDescriptor as RemoteRefDescriptor
from ._refs.registry import RefEntry as RefEntry
from ._refs.registry import RefRegistryStatistics as RefRegistryStatistics
from ._refs.registry import RefsView as RefsView
from ._refs.registry import SessionRefRegistry as SessionRefRegistry
from ._refs.serializers import RefTypeSerializer as RefTypeSerializer
from ._refs.serializers import register_ref_type as register_ref_type
from ._transport.tls import load_client_tls as load_client_tls
from ._transport.tls import load_server_tls as load_server_tls
from ._wire.envelopes import InlineRef as InlineRef
from ._wire.envelopes import SubWorkflowResponse as SubWorkflowResponse
from ._wire.version import peer_envelope_version as peer_envelope_version
from .errors import DuplicateStepError as DuplicateStepError
from .errors import PeerAuthError as PeerAuthError
from .errors import PeerEncodeError as PeerEncodeError
from .errors import PeerEnvelopeVersionError as PeerEnvelopeVersionError
from .errors import PeerError as PeerError
from .errors import PeerflowError as PeerflowError
from .errors import PeerLimitError as PeerLimitError
from .errors import PeerRefNotFoundError as PeerRefNotFoundError
from .errors import PeerRefNotSerializableError as PeerRefNotSerializableError
from .errors import PeerTimeoutError as PeerTimeoutError
from .errors import PeerTlsError as PeerTlsError
from .errors import PeerTransportError as PeerTransportError
from .errors import PeerUnavailableError as PeerUnavailableError
from .errors import PeerUnknownStepError as PeerUnknownStepError
from .errors import PeerWorkflowError as PeerWorkflowError
from .errors import RefCapacityError as RefCapacityError
from .errors import RefError as RefError
from .errors import RefNotFoundError as RefNotFoundError
from .errors import RefNotSerializableError as RefNotSerializableError
from .errors import StepError as StepError
from .errors import StepTimeoutError as StepTimeoutError
from .errors import UnroutableEventError as UnroutableEventError
from .errors import WorkflowError as WorkflowError
from .errors import WorkflowTimeoutError as WorkflowTimeoutError

__version__ = "0.1.0.dev0"

__all__ = [
    "Context",
    "DuplicateStepError",
    "DynamicEvent",
    "Event",
    "HttpPeerClient",
    "InlineRef",
    "Limits",
    "PeerAddress",
    "PeerAuthError",
    "PeerClient",
    "PeerEncodeError",
    "PeerEnvelopeVersionError",
    "PeerError",
    "PeerLimitError",
    "PeerPool",
    "PeerRefNotFoundError",
    "PeerRefNotSerializableError",
    "PeerServer",
    "PeerTimeoutError",
    "PeerTlsError",
    "PeerTransportError",
    "PeerUnavailableError",
    "PeerUnknownStepError",
    "PeerWorkflowError",
    "PeerflowError",
    "PoolMember",
    "RefCapacityError",
    "RefEntry",
    "RefError",
    "RefLifetime",
    "RefNotFoundError",
    "RefNotSerializableError",
    "RefRegistryStatistics",
    "RefTypeSerializer",
    "RefsView",
    "RemoteRefDescriptor",
    "RunResult",
    "SessionRefRegistry",
    "StartEvent",
    "StepError",
    "StepRegistry",
    "StepSpec",
    "StepTimeoutError",
    "StopEvent",
    "StreamCall",
    "SubWorkflowResponse",
    "TraceContext",
    "UnroutableEventError",
    "WebSocketPeerClient",
    "Workflow",
    "WorkflowError",
    "WorkflowHandle",
    "WorkflowTimeoutError",
    "current_trace_context",
    "load_client_tls",
    "load_server_tls",
    "peer_envelope_version",
    "peer_token_env",
    "register_ref_type",
    "resolve_peer_token",
    "use_trace_context",
]


def _fixup_module_names() -> None:
    # Public objects report "peerflow" as their module, as trio and httpcore
    # do, so reprs and docs show the public path rather than a private one.
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("peerflow."):
            with contextlib.suppress(AttributeError, TypeError):
                obj.__module__ = __name__


_fixup_module_names()
