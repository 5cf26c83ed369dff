"""The driver's lean frame paths behave exactly like stock h2.

The driver cuts DATA and single-frame HEADERS itself and writes HEADERS and
DATA as bytes; everything else is h2's. These properties feed the same
client bytes, split anywhere, to a stock h2 server and to the driver's, and
require the same events and the same answers; and they require the driver's
hand-written frames to parse as stock h2's do.
"""

from __future__ import annotations

import itertools

import h2.config
import h2.connection
import h2.events
from hypothesis import given, settings
from hypothesis import strategies as st

from peerflow._transport.h2conn import _h2_config, _H2Connection

REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/peerflow.test/Echo"),
    (b":authority", b"test"),
    (b"content-type", b"application/grpc+msgpack"),
]


def _stock(client_side: bool) -> h2.connection.H2Connection:
    return h2.connection.H2Connection(_h2_config(client_side))


def _describe(events: list[h2.events.Event]) -> list[str]:
    return [repr(event) for event in events]


# One client action: (kind, size); streams are opened in order.
_actions = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "headers",
                "headers_end",
                "priority_headers",
                "data",
                "padded_data",
                "ping",
                "window",
                "reset",
                "long_headers",
            ]
        ),
        st.integers(0, 3000),
    ),
    min_size=1,
    max_size=25,
)


def _client_bytes(actions: list[tuple[str, int]]) -> bytes:
    """What a stock h2 client sends for ``actions`` (after its preface)."""
    client = _stock(client_side=True)
    client.initiate_connection()
    open_streams: list[int] = []
    for kind, size in actions:
        if kind in ("headers", "headers_end", "priority_headers", "long_headers"):
            stream_id = client.get_next_available_stream_id()
            headers = list(REQUEST)
            if kind == "long_headers":
                headers.append((b"x-long", b"v" * (size * 10)))
            client.send_headers(
                stream_id,
                headers,
                end_stream=kind == "headers_end",
                priority_weight=100 if kind == "priority_headers" else None,
            )
            if kind != "headers_end":
                open_streams.append(stream_id)
        elif kind in ("data", "padded_data") and open_streams:
            stream_id = open_streams[size % len(open_streams)]
            end = size % 3 == 0
            client.send_data(
                stream_id,
                bytes(size % 2000),
                end_stream=end,
                pad_length=size % 200 if kind == "padded_data" else None,
            )
            if end:
                open_streams.remove(stream_id)
        elif kind == "ping":
            client.ping(size.to_bytes(8, "big"))
        elif kind == "window":
            client.increment_flow_control_window(size + 1)
        elif kind == "reset" and open_streams:
            client.reset_stream(open_streams.pop(size % len(open_streams)))
    return client.data_to_send()


@settings(max_examples=150, deadline=None)
@given(actions=_actions, cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_the_driver_sees_what_stock_h2_sees(
    actions: list[tuple[str, int]], cuts: list[int]
) -> None:
    data = _client_bytes(actions)
    stock = _stock(client_side=False)
    stock.initiate_connection()
    driver = _H2Connection(_h2_config(client_side=False))
    driver.initiate_connection()
    stock_out, driver_out = [stock.data_to_send()], [b"".join(driver.take_output())]
    stock_events: list[h2.events.Event] = []
    driver_events: list[h2.events.Event] = []
    bounds = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    for start, end in itertools.pairwise(bounds):
        stock_events += stock.receive_data(data[start:end])
        driver_events += driver.receive_data(data[start:end])
        stock_out.append(stock.data_to_send())
        driver_out.append(b"".join(driver.take_output()))
    assert _describe(driver_events) == _describe(stock_events)
    assert b"".join(driver_out) == b"".join(stock_out)


@settings(max_examples=100, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=3000), min_size=1, max_size=6),
    header_size=st.integers(0, 40_000),
    trailers=st.booleans(),
)
def test_hand_written_frames_parse_as_stock_h2s(
    bodies: list[bytes], header_size: int, trailers: bool
) -> None:
    # The driver answers as a server: a stock client must read its frames
    # (a header block beyond 16 KiB spans CONTINUATION frames) as it would
    # read a stock server's.
    client = _stock(client_side=True)
    client.initiate_connection()
    driver = _H2Connection(_h2_config(client_side=False))
    driver.initiate_connection()
    driver.receive_data(client.data_to_send())
    client.receive_data(b"".join(driver.take_output()))
    driver.receive_data(client.data_to_send())
    client.send_headers(1, REQUEST, end_stream=True)
    driver.receive_data(client.data_to_send())
    response = [(b":status", b"200"), (b"x-pad", b"p" * header_size)]
    driver.send_headers(1, response, end_stream=not bodies and not trailers)
    for index, body in enumerate(bodies):
        last = index == len(bodies) - 1
        driver.send_data(1, body, end_stream=last and not trailers)
    if trailers:
        driver.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
    events = client.receive_data(b"".join(driver.take_output()))
    (received,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert received.headers == response
    assert b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived)) == b"".join(
        bodies
    )
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)
    if trailers:
        (got,) = [e for e in events if isinstance(e, h2.events.TrailersReceived)]
        assert got.headers == [(b"grpc-status", b"0")]
