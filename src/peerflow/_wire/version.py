"""Envelope version rules: the one place that decides which versions we accept."""

from __future__ import annotations

from ..errors import PeerEncodeError, PeerEnvelopeVersionError

__all__ = ["ENVELOPE_VERSION", "check_envelope_version", "peer_envelope_version"]

#: The envelope version this build writes. Adding an optional field does not
#: change it; renaming, retyping or removing a field does.
ENVELOPE_VERSION = 1

# The largest version a wire int can hold.
_MAX_VERSION = 2**64 - 1


def peer_envelope_version() -> int:
    """Return the envelope version this build of peerflow speaks (currently 1).

    Every message on the wire carries it as ``v``. A peer accepts messages of
    its own version and every older one, and rejects newer ones.
    """
    return ENVELOPE_VERSION


def check_envelope_version(v: object) -> int:
    """Validate a received ``v`` field and return it.

    Raises:
        PeerEncodeError: ``v`` is missing (pass ``None``), not an integer,
            below 1 or beyond 64 bits; the path is ``v``.
        PeerEnvelopeVersionError: ``v`` is newer than :data:`ENVELOPE_VERSION`.
    """
    if type(v) is not int:
        if v is None:
            raise PeerEncodeError("missing envelope version", "v")
        raise PeerEncodeError(f"envelope version must be an integer, got {type(v).__name__}", "v")
    if v > _MAX_VERSION:
        # Only JSON can say this; the answer could not carry it back.
        raise PeerEncodeError("envelope version does not fit in 64 bits", "v")
    if v > ENVELOPE_VERSION:
        raise PeerEnvelopeVersionError(v, ENVELOPE_VERSION)
    if v < 1:
        raise PeerEncodeError(f"envelope version must be at least 1, got {v}", "v")
    return v
