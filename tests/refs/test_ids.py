from __future__ import annotations

import uuid

from peerflow._refs.ids import new_uuid4


def test_new_uuid4_is_a_canonical_random_uuid4() -> None:
    made = [new_uuid4() for _ in range(2000)]
    assert len(set(made)) == len(made)
    for text in made:
        parsed = uuid.UUID(text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text
    # Every bit outside the version and variant varies.
    fixed = ~((0xF << 76) | (0x3 << 62)) & (2**128 - 1)
    assert all(
        any(uuid.UUID(text).int >> bit & 1 for text in made)
        for bit in range(128)
        if fixed >> bit & 1
    )
