from __future__ import annotations

import time
import uuid

import pytest

from peerflow import (
    RefCapacityError,
    RefLifetime,
    RefNotFoundError,
    RefNotSerializableError,
    RefsView,
    SessionRefRegistry,
)

CTX = RefLifetime.UNTIL_CONTEXT_DROP
PARENT = RefLifetime.UNTIL_PARENT_FINISH
EXPLICIT = RefLifetime.UNTIL_EXPLICIT_DROP


@pytest.fixture
def reg() -> SessionRefRegistry:
    return SessionRefRegistry("node-a")


def test_insert_returns_uuid4_and_builds_a_descriptor(reg: SessionRefRegistry) -> None:
    before = time.time_ns() // 1_000_000
    ref_id = reg.insert(b"abc", lifetime=EXPLICIT, owner="o", run_id="r")
    after = time.time_ns() // 1_000_000
    assert uuid.UUID(ref_id).version == 4
    entry = reg.entry(ref_id, owner="o")
    assert entry.value == b"abc"
    assert (entry.owner, entry.run_id, entry.parent_scope) == ("o", "r", None)
    desc = entry.descriptor
    assert desc.origin_node_id == "node-a"
    assert desc.type_tag == "peerflow.bytes"  # bytes are built in as a ref type
    assert desc.lifetime is EXPLICIT
    assert desc.size == 3
    assert desc.serializable is True
    assert before <= desc.created_at_epoch_ms <= after


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (b"12345", 5),
        (bytearray(b"12"), 2),
        (memoryview(b"x" * 16).cast("I"), 16),
        ("a str", None),
        (12, None),
        ([1, 2], None),
    ],
)
def test_size_is_known_for_bytes_like_values_only(
    reg: SessionRefRegistry, value: object, size: int | None
) -> None:
    assert reg.descriptor(reg.insert(value)).size == size


def test_live_only_values_are_tagged_with_their_qualified_type(reg: SessionRefRegistry) -> None:
    class Model:
        pass

    desc = reg.descriptor(reg.insert(Model()))
    assert desc.serializable is False
    assert desc.type_tag == f"{__name__}.{Model.__qualname__}"
    with pytest.raises(RefNotSerializableError) as info:
        reg.serialize(reg.insert(Model()))
    assert info.value.value_type == desc.type_tag


def test_wrong_owner_looks_like_a_missing_ref(reg: SessionRefRegistry) -> None:
    ref_id = reg.insert("secret", owner=("node-b", "alice"))
    for op in (reg.get, reg.entry, reg.descriptor, reg.serialize):
        with pytest.raises(RefNotFoundError) as info:
            op(ref_id, owner=("node-c", "mallory"))
        assert info.value.ref_uuid == ref_id
        assert "secret" not in str(info.value)
        with pytest.raises(RefNotFoundError):
            op(ref_id)  # the local owner is None, not a wildcard
    assert reg.remove(ref_id, owner=("node-c", "mallory")) is False
    assert reg.get(ref_id, owner=("node-b", "alice")) == "secret"


def test_missing_ref(reg: SessionRefRegistry) -> None:
    with pytest.raises(RefNotFoundError):
        reg.get(str(uuid.uuid4()))
    with pytest.raises(LookupError):
        reg.get("not-even-a-uuid")
    assert reg.remove("nope") is False


def test_remove(reg: SessionRefRegistry) -> None:
    ref_id = reg.insert(1, run_id="r", lifetime=PARENT, parent_scope="s")
    assert reg.remove(ref_id) is True
    assert reg.remove(ref_id) is False
    assert len(reg) == 0
    stats = reg.statistics()
    assert (stats.owners, stats.runs, stats.scopes) == (0, 0, 0)


def test_registry_capacity(reg: SessionRefRegistry) -> None:
    small = SessionRefRegistry("n", capacity=2)
    first = small.insert(1)
    small.insert(2)
    with pytest.raises(RefCapacityError) as info:
        small.insert(3)
    assert info.value.capacity == 2
    small.remove(first)
    small.insert(3)
    assert len(small) == 2


def test_per_owner_capacity() -> None:
    reg = SessionRefRegistry("n", capacity=10, per_owner_capacity=2)
    reg.insert(1, owner="a")
    reg.insert(2, owner="a")
    with pytest.raises(RefCapacityError, match="'a'") as info:
        reg.insert(3, owner="a")
    assert info.value.capacity == 2
    reg.insert(3, owner="b")  # another owner still has room
    assert len(reg) == 3


@pytest.mark.parametrize("kwargs", [{"capacity": 0}, {"per_owner_capacity": 0}])
def test_capacities_must_be_positive(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SessionRefRegistry("n", **kwargs)


def test_purge_run_drops_only_context_refs_of_that_run(reg: SessionRefRegistry) -> None:
    mine = {
        lt: reg.insert(lt.value, lifetime=lt, run_id="r1", parent_scope="s") for lt in RefLifetime
    }
    other = reg.insert("other", run_id="r2")
    assert reg.purge_run("r1") == 1
    assert set(reg._entries) == {mine[PARENT], mine[EXPLICIT], other}
    assert reg.purge_run("r1") == 0
    assert reg.purge_run("unknown") == 0


def test_purge_run_all_lifetimes(reg: SessionRefRegistry) -> None:
    for lt in RefLifetime:
        reg.insert(lt.value, lifetime=lt, run_id="r1", parent_scope="s")
    keep = reg.insert("keep", lifetime=EXPLICIT, run_id="r2")
    assert reg.purge_run("r1", all_lifetimes=True) == 3
    assert list(reg._entries) == [keep]
    assert reg.statistics().scopes == 0


def test_list_run_in_creation_order(reg: SessionRefRegistry) -> None:
    ids = [reg.insert(i, run_id="r", lifetime=EXPLICIT) for i in range(5)]
    reg.insert("x", run_id="other")
    reg.remove(ids[2])
    assert [e.ref_uuid for e in reg.list_run("r")] == ids[:2] + ids[3:]
    assert reg.list_run("nobody") == []


def test_drop_scope_drops_parent_finish_refs_bound_to_it(reg: SessionRefRegistry) -> None:
    a1 = reg.insert(1, lifetime=PARENT, parent_scope="a")
    a2 = reg.insert(2, lifetime=PARENT, parent_scope="a", owner="x")
    b = reg.insert(3, lifetime=PARENT, parent_scope="b")
    explicit = reg.insert(4, lifetime=EXPLICIT, parent_scope="a")
    ctx = reg.insert(5, lifetime=CTX, parent_scope="a")
    assert reg.entry(explicit).parent_scope is None  # only PARENT refs bind
    assert reg.drop_scope("a") == 2
    assert a1 not in reg._entries
    assert a2 not in reg._entries
    assert set(reg._entries) == {b, explicit, ctx}
    assert reg.drop_scope("a") == 0


def test_parent_finish_without_a_scope_outlives_everything_but_remove(
    reg: SessionRefRegistry,
) -> None:
    ref_id = reg.insert(1, lifetime=PARENT, run_id="r")
    assert reg.purge_run("r") == 0
    assert reg.drop_scope(None) == 0
    assert reg.get(ref_id) == 1


def test_scope_context_manager_drops_on_exit_even_on_error(reg: SessionRefRegistry) -> None:
    def use_scope() -> None:
        with reg.scope(("conn", 7)) as scope_id:
            assert scope_id == ("conn", 7)
            reg.insert(1, lifetime=PARENT, parent_scope=scope_id)
            assert len(reg) == 1
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        use_scope()
    assert len(reg) == 0


def test_statistics(reg: SessionRefRegistry) -> None:
    reg.insert(1, owner="a", run_id="r1")
    reg.insert(2, owner="b", run_id="r1", lifetime=PARENT, parent_scope="s")
    reg.insert(3, owner="b", lifetime=EXPLICIT)
    stats = reg.statistics()
    assert stats.refs == 3
    assert stats.capacity == reg.capacity
    assert stats.per_owner_capacity is None
    assert stats.by_lifetime == {CTX: 1, PARENT: 1, EXPLICIT: 1}
    assert (stats.owners, stats.runs, stats.scopes) == (2, 1, 1)


def test_default_registry_is_process_wide() -> None:
    assert SessionRefRegistry.default() is SessionRefRegistry.default()
    assert SessionRefRegistry.default().node_id == "local"


def test_view_stamps_its_run(reg: SessionRefRegistry) -> None:
    view = RefsView(reg, owner="o", run_id="r", parent_scope="s")
    ref_id = view.insert(b"v", PARENT)
    entry = reg.entry(ref_id, owner="o")
    assert (entry.owner, entry.run_id, entry.parent_scope) == ("o", "r", "s")
    assert view.get(ref_id) == b"v"
    assert ref_id in view
    assert 42 not in view
    other = RefsView(reg, owner="p", run_id="r2", parent_scope=None)
    assert ref_id not in other
    with pytest.raises(RefNotFoundError):
        other.get(ref_id)
    assert other.remove(ref_id) is False
    assert view.remove(ref_id) is True
