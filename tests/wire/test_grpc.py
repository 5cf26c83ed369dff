"""gRPC headers, method table and the error <-> status mapping."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerflow import (
    PeerAuthError,
    PeerEncodeError,
    PeerEnvelopeVersionError,
    PeerError,
    PeerLimitError,
    PeerRefNotFoundError,
    PeerRefNotSerializableError,
    PeerTimeoutError,
    PeerTransportError,
    PeerUnavailableError,
    PeerUnknownStepError,
    RefCapacityError,
    RefNotFoundError,
    RefNotSerializableError,
)
from peerflow._wire.codec import decode_message, encode_message
from peerflow._wire.envelopes import ErrorDetails
from peerflow._wire.grpc import (
    METHODS,
    Status,
    decode_bin_header,
    decode_grpc_message,
    decode_grpc_timeout,
    encode_bin_header,
    encode_grpc_message,
    encode_grpc_timeout,
    error_for_status,
    http_status_for,
    is_grpc_content_type,
    status_for_error,
)

# --------------------------------------------------------------------------
# grpc-timeout


@pytest.mark.parametrize(
    ("seconds", "header"),
    [
        (0.0, "0n"),
        (-3.0, "0n"),
        (1e-9, "1n"),
        (0.05, "50000000n"),
        (0.5, "500000u"),
        (1.0, "1000000u"),
        (30.0, "30000000u"),
        (1000.0, "1000000m"),
        (100_000.0, "100000S"),
        (10**9, "16666667M"),
        (10**10, "2777778H"),
        (10**15, "99999999H"),
    ],
)
def test_timeout_encoding_picks_the_finest_unit_that_fits(seconds: float, header: str) -> None:
    assert encode_grpc_timeout(seconds) == header


@given(st.floats(min_value=1e-9, max_value=99_999_999 * 3600))
def test_timeout_encoding_never_shortens_and_fits_8_digits(seconds: float) -> None:
    header = encode_grpc_timeout(seconds)
    assert len(header) <= 9
    decoded = decode_grpc_timeout(header)
    assert decoded >= seconds * (1 - 1e-12)
    # The finest unit that fits leaves at least 5 significant digits.
    assert decoded <= seconds * (1 + 1e-5) + 1e-9


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("1H", 3600), ("2M", 120), ("3S", 3), ("4m", 0.004), ("5u", 5e-6), ("6n", 6e-9)],
)
def test_timeout_decoding_knows_every_unit(header: str, seconds: float) -> None:
    assert decode_grpc_timeout(header) == pytest.approx(seconds)


@pytest.mark.parametrize("header", ["", "S", "1", "123456789S", "1s", "-1S", "1.5S", " 1S"])
def test_malformed_timeouts_are_refused(header: str) -> None:
    with pytest.raises(PeerEncodeError) as info:
        decode_grpc_timeout(header)
    assert info.value.path == "grpc-timeout"


# --------------------------------------------------------------------------
# grpc-message


def test_message_percent_encoding_follows_the_grpc_spec() -> None:
    assert encode_grpc_message("step 'a' failed: 50%") == "step 'a' failed: 50%25"
    assert encode_grpc_message("é\n") == "%C3%A9%0A"
    assert decode_grpc_message("%C3%A9%0A 50%25") == "é\n 50%"
    assert encode_grpc_message(" spaced out ") == "%20spaced out%20"


def test_message_decoding_keeps_malformed_escapes() -> None:
    assert decode_grpc_message("100%") == "100%"
    assert decode_grpc_message("%zz%4") == "%zz%4"
    assert decode_grpc_message(b"%FF") == "\ufffd"


@given(st.text())
def test_message_encoding_round_trips_and_is_printable_ascii(text: str) -> None:
    encoded = encode_grpc_message(text)
    assert all(0x20 <= ord(c) < 0x7F for c in encoded)
    assert encoded == encoded.strip()  # HTTP/2 field values neither start nor end with space
    expected = text.encode("utf-8", "backslashreplace").decode("utf-8")
    assert decode_grpc_message(encoded) == expected


# --------------------------------------------------------------------------
# Binary headers, content types, methods


@given(st.binary())
def test_bin_headers_round_trip_padded_or_not(value: bytes) -> None:
    encoded = encode_bin_header(value)
    assert "=" not in encoded
    assert decode_bin_header(encoded) == value
    assert decode_bin_header(encoded + "=" * (-len(encoded) % 4)) == value


def test_bad_bin_header_is_an_encode_error() -> None:
    with pytest.raises(PeerEncodeError):
        decode_bin_header("not base64!")


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("application/grpc", True),
        ("application/grpc+msgpack", True),
        ("application/grpc+proto", True),
        ("Application/GRPC+msgpack; charset=utf-8", True),
        ("application/json", False),
        ("application/grpcx", False),
        ("application/grpc-web", False),
    ],
)
def test_content_type_acceptance(value: str, ok: bool) -> None:
    assert is_grpc_content_type(value) is ok


def test_method_paths() -> None:
    assert sorted(METHODS) == [
        "/peerflow.peer.v1.Peer/DerefSessionRef",
        "/peerflow.peer.v1.Peer/InvokeSubWorkflow",
        "/peerflow.peer.v1.Peer/Lease",
        "/peerflow.peer.v1.Peer/ReleaseSessionRef",
        "/peerflow.peer.v1.Peer/StreamSubWorkflow",
    ]
    streaming = {m.name for m in METHODS.values() if m.server_streaming}
    assert streaming == {"StreamSubWorkflow", "DerefSessionRef"}
    assert [m.name for m in METHODS.values() if m.optional] == ["Lease"]


# --------------------------------------------------------------------------
# The mapping table, both directions


SERVER_ERRORS = [
    (PeerUnknownStepError("s9"), Status.NOT_FOUND, PeerUnknownStepError, {"step_id": "s9"}),
    (
        PeerEnvelopeVersionError(3, 1),
        Status.FAILED_PRECONDITION,
        PeerEnvelopeVersionError,
        {"got": 3, "supported": 1},
    ),
    (
        PeerEncodeError("expected str, got int", "step_ids[2]"),
        Status.INVALID_ARGUMENT,
        PeerEncodeError,
        {"path": "step_ids[2]", "reason": "expected str, got int"},
    ),
    (RefNotFoundError("u1"), Status.NOT_FOUND, PeerRefNotFoundError, {"ref_uuid": "u1"}),
    (PeerRefNotFoundError("u2"), Status.NOT_FOUND, PeerRefNotFoundError, {"ref_uuid": "u2"}),
    (
        RefNotSerializableError("u3", "mod.Model"),
        Status.FAILED_PRECONDITION,
        PeerRefNotSerializableError,
        {"ref_uuid": "u3", "value_type": "mod.Model"},
    ),
    (PeerAuthError("bad token"), Status.UNAUTHENTICATED, PeerAuthError, {}),
    (PeerLimitError("too big"), Status.RESOURCE_EXHAUSTED, PeerLimitError, {}),
    (RefCapacityError(10), Status.RESOURCE_EXHAUSTED, PeerLimitError, {}),
    (PeerTimeoutError("late"), Status.DEADLINE_EXCEEDED, PeerTimeoutError, {}),
]


@pytest.mark.parametrize(("error", "status", "client_error", "attributes"), SERVER_ERRORS)
def test_errors_map_to_a_status_and_back(
    error: Exception,
    status: Status,
    client_error: type[PeerError],
    attributes: dict[str, object],
) -> None:
    sent_status, message, details = status_for_error(error)
    assert sent_status is status
    assert message == str(error)
    rebuilt = error_for_status(sent_status, message, details)
    assert type(rebuilt) is client_error
    for name, value in attributes.items():
        assert getattr(rebuilt, name) == value


def test_an_error_whose_details_cannot_travel_still_gets_its_status() -> None:
    # A message or field built from the caller's input may hold a lone
    # surrogate: the call is still answered, with its kind.
    status, message, details = status_for_error(PeerRefNotFoundError("ref-\ud800"))
    assert status is Status.NOT_FOUND
    assert "ref-\\ud800" in message
    rebuilt = error_for_status(status, message, details)
    assert type(rebuilt) is PeerRefNotFoundError
    assert rebuilt.ref_uuid == "ref-\\ud800"


def test_unexpected_errors_become_internal_without_leaking() -> None:
    status, message, details = status_for_error(RuntimeError("db password is hunter2"))
    assert status is Status.INTERNAL
    assert "hunter2" not in message
    assert decode_message(ErrorDetails, details).code == "internal"
    assert type(error_for_status(status, message, details)) is PeerTransportError


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (Status.UNAUTHENTICATED, PeerAuthError),
        (Status.RESOURCE_EXHAUSTED, PeerLimitError),
        (Status.DEADLINE_EXCEEDED, PeerTimeoutError),
        (Status.UNAVAILABLE, PeerUnavailableError),
        (Status.CANCELLED, PeerTransportError),
        (Status.INTERNAL, PeerTransportError),
        (Status.UNIMPLEMENTED, PeerTransportError),
        (Status.NOT_FOUND, PeerTransportError),
        (Status.UNKNOWN, PeerTransportError),
        (99, PeerTransportError),
    ],
)
def test_statuses_without_details(status: int, error: type[PeerError]) -> None:
    raised = error_for_status(status, "why")
    assert type(raised) is error
    assert "why" in str(raised)


@pytest.mark.parametrize(
    "details",
    [b"garbage", msgpack.packb({"v": 1, "code": "martian", "message": "?"}), b""],
)
def test_unusable_details_fall_back_on_the_status(details: bytes) -> None:
    assert type(error_for_status(Status.UNAUTHENTICATED, "no", details)) is PeerAuthError


def test_details_wire_shape() -> None:
    _, _, details = status_for_error(PeerEnvelopeVersionError(2, 1))
    assert msgpack.unpackb(details) == {
        "v": 1,
        "code": "envelope_version",
        "message": str(PeerEnvelopeVersionError(2, 1)),
        "got": 2,
        "supported": 1,
    }
    assert encode_message(decode_message(ErrorDetails, details)) == details


def test_every_status_has_an_http_status() -> None:
    assert {http_status_for(s) for s in Status} <= set(range(200, 600))
    assert http_status_for(Status.NOT_FOUND) == 404
    assert http_status_for(Status.UNAUTHENTICATED) == 401
