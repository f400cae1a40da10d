"""The registry of map layouts and of conversions between them: past layouts
stay what their relayd pinned, every conversion covers every map that
changed, each conversion keeps every field and zeroes the new ones, and an
unknown layout has no path."""

from __future__ import annotations

import ctypes

import pytest

from manager.relay.kernel.conversions import CONVERSIONS, Conversion, by_field, convert_entry, path_from
from manager.relay.kernel.errors import DatapathError
from manager.relay.kernel.layouts import CURRENT, LAYOUTS, SHIPPED, V1, V2, FlowInfoV1, Layout, ReverseInfoV1
from manager.relay.kernel.structs import LAYOUT_HASH, STAT_INDEX, STAT_NAMES, FlowInfo, ReverseInfo, flow_key


def test_past_layouts_are_frozen_at_what_their_relayd_wrote():
    for name, value in SHIPPED.items():
        assert {lay.name: h for h, lay in LAYOUTS.items()}[name] == value
    assert CURRENT.hash == LAYOUT_HASH


def test_every_conversion_covers_the_maps_that_changed():
    for source_hash, conv in CONVERSIONS.items():
        assert conv.source.hash == source_hash
        assert conv.target.hash in LAYOUTS
        missing = set(conv.changed_maps()) - set(conv.maps)
        assert not missing, f"{conv.source.name} → {conv.target.name} has no conversion for {missing}"
    # Every shipped layout reaches the current one.
    for h in LAYOUTS:
        path_from(h, CURRENT)


def _filled(t: type, seed: int) -> ctypes.Structure:
    raw = bytes((seed + i * 7) % 251 for i in range(ctypes.sizeof(t)))
    return t.from_buffer_copy(raw)


@pytest.mark.parametrize(("name", "src", "dst"), [("flows4", FlowInfoV1, FlowInfo), ("flows6", FlowInfoV1, FlowInfo),
                                                  ("reverse", ReverseInfoV1, ReverseInfo)])
def test_v1_to_v2_keeps_every_field_and_starts_media_at_zero(name, src, dst):
    old = _filled(src, 3)
    key = bytes(ctypes.sizeof(V1.map_types[name][0]))
    k, v = convert_entry(path_from(V1.hash, V2), name, key, bytes(old))
    new = dst.from_buffer_copy(v)
    assert k == key
    for field, *_ in src._fields_:
        a, b = getattr(old, field), getattr(new, field)
        assert (bytes(a) if isinstance(a, ctypes.Structure) else a) == (bytes(b) if isinstance(b, ctypes.Structure)
                                                                        else b), field
    assert bytes(new.rtp) == bytes(ctypes.sizeof(new.rtp))


def test_unchanged_maps_pass_as_they_are_and_a_dropped_map_is_left_behind():
    steps = path_from(V1.hash, V2)
    key, value = bytes(flow_key(("10.0.0.1", 1), ("10.0.0.2", 2))), b"\x01" * 48
    assert convert_entry(steps, "ssrcs", b"abcd", key) == (b"abcd", key)
    smaller = Layout("test", {n: t for n, t in V2.map_types.items() if n != "ssrcs"},
                     {n: k for n, k in V2.map_kinds.items() if n != "ssrcs"})
    assert convert_entry([Conversion(V2, smaller)], "ssrcs", b"abcd", value) is None


def test_an_added_map_needs_no_conversion():
    bigger = Layout("test", {**V2.map_types, "syn_limit": (ctypes.c_uint32, ctypes.c_uint64)},
                    {**V2.map_kinds, "syn_limit": 1}, V2.stat_names)
    assert Conversion(V2, bigger).changed_maps() == []


def test_by_field_refuses_a_field_that_changed_size():
    class A(ctypes.Structure):
        _fields_ = [("x", ctypes.c_uint32)]

    class B(ctypes.Structure):
        _fields_ = [("x", ctypes.c_uint64)]

    with pytest.raises(TypeError, match="differ in size"):
        by_field(A, B)


def test_an_unknown_layout_is_refused_in_one_line():
    with pytest.raises(DatapathError, match=r"^pinned maps in /x have map layout 00000000deadbeef, which this relayd "
                                            r"cannot convert") as exc:
        path_from(0xDEADBEEF, CURRENT, " in /x")
    assert "\n" not in str(exc.value)
    assert path_from(CURRENT.hash, CURRENT) == []


def test_v1_counters_keep_their_names_across_the_counters_v2_added():
    steps = path_from(V1.hash, V2)
    assert V2.stat_names == tuple(STAT_NAMES) and set(V1.stat_names) < set(V2.stat_names)
    for i, name in enumerate(V1.stat_names):
        value = (i + 1).to_bytes(16, "little")
        key, out = convert_entry(steps, "stats", i.to_bytes(4, "little"), value)
        assert int.from_bytes(key, "little") == STAT_INDEX[name] and out == value, name
    # Past the v1 counters: nothing to carry.
    assert convert_entry(steps, "stats", len(V1.stat_names).to_bytes(4, "little"), bytes(16)) is None


def test_other_counters_at_the_same_indexes_need_a_conversion():
    renamed = Layout("test", V2.map_types, V2.map_kinds, tuple(reversed(V2.stat_names)))
    assert Conversion(V2, renamed).changed_maps() == ["stats"]
    assert Conversion(V2, V2).changed_maps() == []
