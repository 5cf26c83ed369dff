"""Fuzzing a PeerServer in process: random bytes, random frames, random calls.

Each example serves one connection with ``server.serve_stream`` over a
memory stream pair, throws the generated input at it, hangs up, and then
checks the property: the connection ended without an untyped exception, the
server logged no error, and a good call on a fresh connection succeeds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import hyperframe.frame
import trio
import trio.testing
from hardening_raw import (
    H2_PREFACE,
    PATHS,
    RawH2Client,
    build_steps,
    capture_errors,
    grpc_headers,
    grpc_message,
    header_block,
    raw_frame,
    read_until_eof,
    settings_frame,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from peerflow import PeerServer
from peerflow._wire.codec import encode_message
from peerflow._wire.framing import encode_frame
from peerflow._wire.grpc import Status
from peerflow.testing import open_memory_peer
from strategies import messages, wire_values

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


async def _survives(attack: Callable[[trio.abc.Stream], Awaitable[None]]) -> None:
    """Run ``attack`` against a fresh server's connection, then check the server is fine."""
    server = PeerServer("node-fuzz", registry=build_steps(), token=None)
    with capture_errors() as errors, trio.fail_after(20):
        async with server.running():
            client, server_side = trio.testing.memory_stream_pair()
            async with trio.open_nursery() as nursery:
                # An exception that escapes serve_stream fails the example here.
                nursery.start_soon(server.serve_stream, server_side)
                # The server may hang up on the attacker at any point.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await attack(client)
                    await client.send_eof()
                await read_until_eof(client)
            async with open_memory_peer(server, "node-good") as good:
                response = await good.invoke_sub_workflow("fuzz", ["echo"], {"ok": True})
            assert response.result == {"ok": True}
    assert errors.texts() == []


# --- (a) arbitrary bytes after a valid preface and SETTINGS -------------------------


@FUZZ
@given(chunks=st.lists(st.binary(max_size=400), max_size=6))
async def test_arbitrary_bytes_after_the_handshake(chunks: list[bytes]) -> None:
    async def attack(stream: trio.abc.Stream) -> None:
        await stream.send_all(H2_PREFACE + settings_frame())
        for chunk in chunks:
            await stream.send_all(chunk)

    await _survives(attack)


# --- (b) arbitrary frame sequences ---------------------------------------------------

_stream_ids = st.sampled_from([0, 1, 3, 5, 2, 2**31 - 1]) | st.integers(0, 2**32 - 1)
_small = st.binary(max_size=64)
_u31 = st.integers(0, 2**31 - 1)


def _typed_frames(stream_id: int) -> st.SearchStrategy[hyperframe.frame.Frame]:
    """Frames with well-formed bodies and random fields: they get past the framing layer."""
    sid = (stream_id & 0x7FFFFFFF) or 1  # hyperframe refuses 0 here; raw frames cover it
    return st.one_of(
        st.builds(
            hyperframe.frame.HeadersFrame,
            st.just(sid),
            data=st.sampled_from(PATHS).map(lambda p: header_block(grpc_headers(p))) | _small,
            flags=st.sets(st.sampled_from(["END_STREAM", "END_HEADERS"])),
        ),
        st.builds(
            hyperframe.frame.DataFrame,
            st.just(sid),
            data=_small.map(encode_frame) | _small,
            flags=st.sets(st.just("END_STREAM")),
        ),
        st.builds(
            hyperframe.frame.RstStreamFrame, st.just(sid), error_code=st.integers(0, 2**32 - 1)
        ),
        st.builds(hyperframe.frame.WindowUpdateFrame, st.just(sid), window_increment=_u31),
        st.builds(
            hyperframe.frame.PriorityFrame,
            st.just(sid),
            depends_on=_u31,
            stream_weight=st.integers(0, 255),
            exclusive=st.booleans(),
        ),
        st.builds(
            hyperframe.frame.SettingsFrame,
            st.just(0),
            settings=st.dictionaries(st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1), max_size=4),
        ),
        st.builds(
            hyperframe.frame.PingFrame, st.just(0), opaque_data=st.binary(min_size=8, max_size=8)
        ),
        st.builds(
            hyperframe.frame.GoAwayFrame,
            st.just(0),
            last_stream_id=_u31,
            error_code=st.integers(0, 2**32 - 1),
            additional_data=_small,
        ),
        st.builds(
            hyperframe.frame.ContinuationFrame,
            st.just(sid),
            data=_small,
            flags=st.sets(st.just("END_HEADERS")),
        ),
    )


@st.composite
def _frames(draw: st.DrawFn) -> bytes:
    stream_id = draw(_stream_ids)
    if draw(st.booleans()):
        return bytes(draw(_typed_frames(stream_id)).serialize())
    # Anything at all, unknown types included: only the 9-byte header is right.
    frame_type = draw(st.integers(0, 10) | st.integers(0, 255))
    return raw_frame(frame_type, draw(st.integers(0, 255)), stream_id, draw(_small))


@FUZZ
@given(frames=st.lists(_frames(), max_size=12))
async def test_arbitrary_frame_sequences(frames: list[bytes]) -> None:
    async def attack(stream: trio.abc.Stream) -> None:
        await stream.send_all(H2_PREFACE + settings_frame())
        for frame in frames:
            await stream.send_all(frame)

    await _survives(attack)


# --- (c) valid HTTP/2, random gRPC messages to every method ---------------------------

_step_ids = st.lists(st.sampled_from(["echo", "missing"]) | st.text(max_size=6), max_size=3)

#: Maps with the request fields of every method, each valid or of a random type.
_envelopes = st.fixed_dictionaries(
    {},
    optional={
        "v": st.integers(0, 3) | wire_values,
        "workflow_name": st.text(max_size=8) | wire_values,
        "step_ids": _step_ids | wire_values,
        "input": wire_values,
        "timeout_ms": st.integers(-5, 10**12) | wire_values,
        "lease_id": st.uuids().map(str) | wire_values,
        "ref_uuid": st.uuids().map(str) | wire_values,
        "ttl_ms": st.integers(-5, 10**12) | wire_values,
        "close": st.booleans() | wire_values,
    },
)

_bodies = st.one_of(
    _envelopes.map(grpc_message),
    messages().map(lambda m: encode_frame(encode_message(m))),
    st.binary(max_size=200).map(encode_frame),
    st.binary(max_size=200),
)

_extra_headers = st.lists(
    st.sampled_from(
        [
            (b"grpc-timeout", b"1S"),
            (b"grpc-timeout", b"0n"),
            (b"grpc-timeout", b"99999999H"),
            (b"grpc-timeout", b"-1S"),
            (b"grpc-encoding", b"gzip"),
            (b"authorization", b"Bearer nope"),
            (b"x-peerflow-peer-node-id", b"\xff\x00"),
            (b"content-type", b"application/grpc+json"),
            (b"content-type", b"text/plain"),
            (b":method", b"GET"),
            (b"te", b"gzip"),
        ]
    ),
    max_size=3,
    unique=True,
).map(tuple)

_calls = st.tuples(
    st.sampled_from([*PATHS, b"/peerflow.peer.v1.Peer/Nope"]), _bodies, _extra_headers
)


@FUZZ
@given(calls=st.lists(_calls, min_size=1, max_size=4))
async def test_random_messages_to_every_method(
    calls: list[tuple[bytes, bytes, tuple[tuple[bytes, bytes], ...]]],
) -> None:
    answers: list[Any] = []

    async def attack(stream: trio.abc.Stream) -> None:
        raw = RawH2Client(stream)
        await raw.handshake()
        ids = [
            await raw.request(body, headers=grpc_headers(path, extra=extra))
            for path, body, extra in calls
        ]
        for stream_id in ids:
            answers.append(await raw.wait_done(stream_id))

    await _survives(attack)
    assert len(answers) == len(calls)  # valid HTTP/2 never costs the connection
    for response in answers:
        # Every call was answered, and never with "the server broke".
        assert response.done
        assert response.grpc_status != Status.INTERNAL
        assert response.grpc_status is not None or response.http_status in (405, 415, None)
        event(f"grpc-status {response.grpc_status}, HTTP {response.http_status}")
