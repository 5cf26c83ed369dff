"""Fresh random ids for runs and refs: uuid4 strings, made without a uuid.UUID."""

from __future__ import annotations

import os

__all__ = ["new_uuid4"]


def new_uuid4() -> str:
    """Return a random uuid4 in its canonical form, as ``str(uuid.uuid4())`` does.

    One is made per run, so it skips building a :class:`uuid.UUID` (and its
    128-bit int) only to format it: this costs less than half as much.
    """
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # the RFC 4122 variant
    hexed = raw.hex()
    return f"{hexed[:8]}-{hexed[8:12]}-{hexed[12:16]}-{hexed[16:20]}-{hexed[20:]}"
