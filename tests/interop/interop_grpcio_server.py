"""A second peer implementation, written from protocol/README.md alone: grpcio and plain msgpack.

It shares no code with peerflow, so our client talking to it proves that the
written spec, not our codec's habits, is what the two sides agree on. It is
deliberately small: a handful of fixed steps, refs in a dict, and leases
that can be switched off to play a minimal four-method peer.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import attrs
import grpc
from interop_peer import ERROR_DETAILS_TRAILER, NODE_ID_HEADER, pack, unpack

SERVICE_NAME = "peerflow.peer.v1.Peer"
VERSION = 1
#: Bounds every wait inside a handler, so a stuck test cannot pin a worker thread.
HANDLER_WAIT = 10.0


class Abort(Exception):
    """Raised by a step to end the call with a status (and optional ErrorDetails)."""

    def __init__(self, code: grpc.StatusCode, message: str, details: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


@attrs.define
class StoredRef:
    owner: str
    payload: bytes
    descriptor: dict[str, Any]
    lease_id: str | None


@attrs.define
class Seen:
    """One call as the reference peer received it."""

    method: str
    metadata: dict[str, str | bytes]
    request: dict[str, Any]
    time_remaining: float | None


@attrs.define(eq=False)
class ReferencePeer:
    """A grpcio server implementing the ``peerflow.peer.v1.Peer`` service by the book.

    Steps: ``echo`` (result is the input, state names the node), ``refs``
    (input: lifetimes; ``"dropped"`` makes a dropped ref), ``big`` (one
    ``until_explicit_drop`` ref of ``input`` bytes), ``fail`` (a workflow
    failure), ``future`` (answers with envelope version 99), ``unavailable``
    and ``not-found-plain`` (bare statuses), ``progress`` (streams two events
    around ``gate``), ``gated`` (answers once ``gate`` is set), ``hang``
    (waits until the caller gives up).
    """

    node_id: str = "grpcio-peer"
    leases: bool = True
    chunk_size: int = 1000
    #: grpcio's own limit on request messages (its default is 4 MiB).
    max_receive_message_length: int | None = None
    seen: list[Seen] = attrs.field(factory=list)
    refs: dict[str, StoredRef] = attrs.field(factory=dict)
    open_leases: dict[tuple[str, str], int] = attrs.field(factory=dict)
    gate: threading.Event = attrs.field(factory=threading.Event)
    hang_ended: threading.Event = attrs.field(factory=threading.Event)
    port: int = 0
    _lock: threading.Lock = attrs.field(factory=threading.Lock)
    _server: grpc.Server | None = None

    @property
    def url(self) -> str:
        """The endpoint a PeerClient connects to, once started."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Serve on an ephemeral loopback port (see :attr:`port`)."""
        handlers: dict[str, grpc.RpcMethodHandler] = {
            "InvokeSubWorkflow": grpc.unary_unary_rpc_method_handler(self._invoke),
            "StreamSubWorkflow": grpc.unary_stream_rpc_method_handler(self._stream),
            "DerefSessionRef": grpc.unary_stream_rpc_method_handler(self._deref),
            "ReleaseSessionRef": grpc.unary_unary_rpc_method_handler(self._release),
        }
        if self.leases:
            handlers["Lease"] = grpc.unary_unary_rpc_method_handler(self._lease)
        options = []
        if self.max_receive_message_length is not None:
            options.append(("grpc.max_receive_message_length", self.max_receive_message_length))
        server = grpc.server(
            ThreadPoolExecutor(max_workers=16),
            handlers=[grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)],
            options=options,
        )
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server

    def stop(self) -> None:
        """Stop at once, cancelling calls in flight."""
        if self._server is not None:
            self._server.stop(grace=None).wait(HANDLER_WAIT)

    def begin_graceful_stop(self, grace: float) -> None:
        """Start grpcio's graceful shutdown (GOAWAY) and return at once.

        Calls in flight may run on for ``grace`` seconds; new ones are refused.
        """
        assert self._server is not None
        self._server.stop(grace=grace)

    def requests(self, method: str) -> list[Seen]:
        """The calls of one method received so far, oldest first."""
        with self._lock:
            return [s for s in self.seen if s.method == method]

    # -- method handlers ---------------------------------------------------------

    def _invoke(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        return self._guard(
            context, lambda: pack(self._run(self._accept("Invoke", raw, context), context))
        )

    def _stream(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        request = self._guard(context, lambda: self._accept("Stream", raw, context))
        if request["step_ids"] == ["progress"]:
            yield pack(_event(1))
            self.gate.wait(HANDLER_WAIT)
            yield pack(_event(2))
            response: dict[str, Any] = _response("done")
        else:
            response = self._guard(context, lambda: self._run(request, context))
        yield pack({"kind": "response", **response})

    def _deref(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        def lookup() -> StoredRef:
            request = self._accept("Deref", raw, context)
            return self._owned(request["ref_uuid"], context)

        ref = self._guard(context, lookup)
        payload = ref.payload
        first = {"v": VERSION, "type_tag": ref.descriptor["type_tag"], "total_size": len(payload)}
        yield pack({**first, "payload": payload[: self.chunk_size]})
        for offset in range(self.chunk_size, len(payload), self.chunk_size):
            yield pack({"v": VERSION, "payload": payload[offset : offset + self.chunk_size]})

    def _release(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        def release() -> bytes:
            request = self._accept("Release", raw, context)
            owner = _node_id(context)
            with self._lock:
                ref = self.refs.get(request["ref_uuid"])
                released = ref is not None and ref.owner == owner
                if released:
                    del self.refs[request["ref_uuid"]]
            return pack({"v": VERSION, "released": released})

        return self._guard(context, release)

    def _lease(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        def lease() -> bytes:
            request = self._accept("Lease", raw, context)
            key = (_node_id(context), request["lease_id"])
            if not request.get("close", False):
                with self._lock:
                    self.open_leases[key] = request["ttl_ms"]
                return pack({"v": VERSION, "lease_id": key[1], "ttl_ms": request["ttl_ms"]})
            with self._lock:
                self.open_leases.pop(key, None)
                bound = [u for u, r in self.refs.items() if (r.owner, r.lease_id) == key]
                for ref_uuid in bound:
                    del self.refs[ref_uuid]
            return pack({"v": VERSION, "lease_id": key[1], "ttl_ms": 0, "released": len(bound)})

        return self._guard(context, lease)

    # -- the service ---------------------------------------------------------------

    def _run(self, request: dict[str, Any], context: grpc.ServicerContext) -> dict[str, Any]:
        step_ids = request["step_ids"]
        for step_id in step_ids:
            if step_id not in _STEPS:
                raise Abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"no step {step_id!r}",
                    {"code": "unknown_step", "message": f"no step {step_id!r}", "step_id": step_id},
                )
        (step_id,) = step_ids
        return _STEPS[step_id](self, request, context)

    def _accept(self, method: str, raw: bytes, context: grpc.ServicerContext) -> dict[str, Any]:
        try:
            request = unpack(raw)
        except (ValueError, AssertionError) as exc:
            message = "the request is not a msgpack map"
            details = {"code": "encode", "message": message}
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, message, details) from exc
        version = request.get("v")
        if isinstance(version, int) and version > VERSION:
            raise Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"envelope version {version} is newer than {VERSION}",
                {
                    "code": "envelope_version",
                    "message": f"envelope version {version} is newer than {VERSION}",
                    "got": version,
                    "supported": VERSION,
                },
            )
        metadata = {m.key: m.value for m in context.invocation_metadata()}
        with self._lock:
            self.seen.append(Seen(method, metadata, request, context.time_remaining()))
        return request

    def _owned(self, ref_uuid: str, context: grpc.ServicerContext) -> StoredRef:
        with self._lock:
            ref = self.refs.get(ref_uuid)
        if ref is None or ref.owner != _node_id(context):
            message = f"no ref {ref_uuid}"
            details = {"code": "ref_not_found", "message": message, "ref_uuid": ref_uuid}
            raise Abort(grpc.StatusCode.NOT_FOUND, message, details)
        return ref

    def _store(
        self,
        request: dict[str, Any],
        context: grpc.ServicerContext,
        payload: bytes,
        lifetime: str,
    ) -> str:
        ref_uuid = str(uuid.uuid4())
        descriptor = self.describe(payload, lifetime)
        lease_id = request.get("lease_id") if lifetime == "until_parent_finish" else None
        owner = _node_id(context)
        with self._lock:
            self.refs[ref_uuid] = StoredRef(owner, payload, descriptor, lease_id)
        return ref_uuid

    def describe(self, payload: bytes, lifetime: str) -> dict[str, Any]:
        """A RefDescriptor map for a bytes value held here."""
        return {
            "origin_node_id": self.node_id,
            "type_tag": "peerflow.bytes",
            "created_at_epoch_ms": int(time.time() * 1000),
            "lifetime": lifetime,
            "size": len(payload),
        }

    def _guard(self, context: grpc.ServicerContext, work: Callable[[], Any]) -> Any:
        try:
            return work()
        except Abort as exc:
            _abort(context, exc)


def _abort(context: grpc.ServicerContext, exc: Abort) -> NoReturn:
    if exc.details is not None:
        details = pack({"v": VERSION, **exc.details})
        context.set_trailing_metadata(((ERROR_DETAILS_TRAILER, details),))
    context.abort(exc.code, exc.message)


def _node_id(context: grpc.ServicerContext) -> str:
    for m in context.invocation_metadata():
        if m.key == NODE_ID_HEADER:
            return str(m.value)
    return ""


def _event(n: int) -> dict[str, Any]:
    return {
        "v": VERSION,
        "kind": "event",
        "event": {"event_type": "tests.Progress", "data": {"n": n}},
    }


def _response(result: Any, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "result": result, "state": {}, "remote_refs": {}, "error": None, **fields}


# -- steps -------------------------------------------------------------------------


def _echo(
    peer: ReferencePeer, request: dict[str, Any], context: grpc.ServicerContext
) -> dict[str, Any]:
    # "added_later" plays a key from a future minor revision: receivers ignore it.
    state = {"node": peer.node_id, "seen": request["input"]}
    return _response(request["input"], state=state, added_later=[1, 2])


def _refs(
    peer: ReferencePeer, request: dict[str, Any], context: grpc.ServicerContext
) -> dict[str, Any]:
    ids, remote, inline, dropped = [], {}, {}, []
    for i, lifetime in enumerate(request["input"]):
        payload = f"value-{i}".encode()
        if lifetime == "dropped":
            ref_uuid = str(uuid.uuid4())
            dropped.append(ref_uuid)
        elif lifetime == "until_context_drop":
            # Such a ref dies with the run: only its bytes travel.
            ref_uuid = str(uuid.uuid4())
            inline[ref_uuid] = {**peer.describe(payload, lifetime), "payload": payload}
        else:
            ref_uuid = peer._store(request, context, payload, lifetime)
            remote[ref_uuid] = peer.refs[ref_uuid].descriptor
        ids.append(ref_uuid)
    return _response(ids, remote_refs=remote, inline_refs=inline, dropped_refs=dropped)


def _big(
    peer: ReferencePeer, request: dict[str, Any], context: grpc.ServicerContext
) -> dict[str, Any]:
    payload = bytes(range(256)) * (request["input"] // 256)
    ref_uuid = peer._store(request, context, payload, "until_explicit_drop")
    return _response(ref_uuid, remote_refs={ref_uuid: peer.refs[ref_uuid].descriptor})


def _fail(
    peer: ReferencePeer, request: dict[str, Any], context: grpc.ServicerContext
) -> dict[str, Any]:
    error = {"message": "ValueError: kaput", "step_id": "fail", "error_type": "ValueError"}
    return _response(None, error=error)


def _future(
    peer: ReferencePeer, request: dict[str, Any], context: grpc.ServicerContext
) -> dict[str, Any]:
    return {**_response("from the future"), "v": 99}


def _unavailable(
    peer: ReferencePeer, request: dict[str, Any], context: grpc.ServicerContext
) -> NoReturn:
    raise Abort(grpc.StatusCode.UNAVAILABLE, "going away", None)


def _not_found_plain(
    peer: ReferencePeer, request: dict[str, Any], context: grpc.ServicerContext
) -> NoReturn:
    raise Abort(grpc.StatusCode.NOT_FOUND, "no such thing", None)


def _gated(
    peer: ReferencePeer, request: dict[str, Any], context: grpc.ServicerContext
) -> dict[str, Any]:
    peer.gate.wait(HANDLER_WAIT)
    return _response("through the gate")


def _hang(peer: ReferencePeer, request: dict[str, Any], context: grpc.ServicerContext) -> NoReturn:
    # The callback runs when the call ends for any reason: here, the caller giving up.
    ended = threading.Event()
    if not context.add_callback(ended.set):
        ended.set()  # the call had already ended
    if ended.wait(HANDLER_WAIT):
        peer.hang_ended.set()
    raise Abort(grpc.StatusCode.CANCELLED, "the caller left", None)


Step = Callable[[ReferencePeer, dict[str, Any], grpc.ServicerContext], dict[str, Any]]
_STEPS: dict[str, Step] = {
    "echo": _echo,
    "refs": _refs,
    "big": _big,
    "fail": _fail,
    "future": _future,
    "unavailable": _unavailable,
    "not-found-plain": _not_found_plain,
    "hang": _hang,
    "gated": _gated,
}
