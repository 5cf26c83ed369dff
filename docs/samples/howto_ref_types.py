"""How-to: make a value type fetchable from another node (docs/how-to/ref-types.md).

Run: python3 docs/samples/howto_ref_types.py
"""

from __future__ import annotations

import array
import hashlib
import json

import attrs
import trio

from peerflow import (
    Context,
    PeerRefNotSerializableError,
    PeerServer,
    RefLifetime,
    StartEvent,
    StepRegistry,
    StopEvent,
    Workflow,
    register_ref_type,
)
from peerflow.testing import open_memory_peer


# --8<-- [start:protocol]
class Vector:
    """A value that knows how to cross machines: the class protocol."""

    __peerflow_type_tag__ = "my_app.Vector"

    def __init__(self, values: list[float]) -> None:
        self.values = array.array("d", values)

    def __peerflow_to_bytes__(self) -> memoryview:
        return memoryview(self.values).cast("B")  # streamed without a copy

    @classmethod
    def __peerflow_from_bytes__(cls, data: bytes) -> Vector:
        vector = cls([])
        vector.values.frombytes(data)
        return vector


# --8<-- [end:protocol]


# --8<-- [start:register]
@attrs.frozen
class Document:
    """A class you cannot (or would rather not) change."""

    title: str
    body: str


def document_to_bytes(doc: Document) -> bytes:
    return json.dumps(attrs.asdict(doc)).encode()


def document_from_bytes(data: bytes) -> Document:
    return Document(**json.loads(data))


register_ref_type(Document, "my_app.Document", document_to_bytes, document_from_bytes)
# --8<-- [end:register]


class Model:
    """No serializer: such a value is live-only on its node."""


steps = StepRegistry()
wf = Workflow("ref-types", registry=steps)


@wf.step("make", accepts=[StartEvent])
async def make(event: StartEvent, ctx: Context) -> StopEvent:
    keep = RefLifetime.UNTIL_EXPLICIT_DROP
    return StopEvent(
        result={
            "vector": ctx.refs.insert(Vector([1.0, 2.5]), lifetime=keep),
            "document": ctx.refs.insert(Document("Notes", "..."), lifetime=keep),
            "model": ctx.refs.insert(Model(), lifetime=keep),
        }
    )


async def main() -> None:
    server = PeerServer("node-b", registry=steps, token=None)
    async with open_memory_peer(server, "node-a") as client:
        # --8<-- [start:fetch]
        response = await client.invoke_sub_workflow("ref-types", ["make"], None)
        refs = response.result
        for name in ("vector", "document", "model"):
            print(name, "->", response.remote_refs[refs[name]].type_tag)

        vector = Vector.__peerflow_from_bytes__(await client.deref_session_ref(refs["vector"]))
        document = document_from_bytes(await client.deref_session_ref(refs["document"]))
        print(list(vector.values), document)
        try:
            await client.deref_session_ref(refs["model"])
        except PeerRefNotSerializableError as exc:
            print("live-only:", exc.value_type)
        # --8<-- [end:fetch]
        # --8<-- [start:chunks]
        digest = hashlib.sha256()
        async with client.open_session_ref(refs["vector"]) as chunks:
            async for chunk in chunks:  # at most Limits.max_deref_chunk bytes each
                digest.update(chunk)
        # --8<-- [end:chunks]
        assert digest.digest() == hashlib.sha256(vector.values.tobytes()).digest()
        assert list(vector.values) == [1.0, 2.5]
        assert not response.remote_refs[refs["model"]].serializable
        for ref_uuid in refs.values():
            assert await client.release_session_ref(ref_uuid)
    assert len(server.refs) == 0


if __name__ == "__main__":
    trio.run(main)
