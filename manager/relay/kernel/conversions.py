"""The conversions of pinned map entries from one shipped layout to the next
(layouts.py), one per layout version, and the path from a pinned layout to
this relayd's.

A conversion names, for each map whose key or value changed, a function of
(key bytes, value bytes) → (key bytes, value bytes). A map of the same
shape in both layouts is copied as it is; a map the target adds starts
empty; a map it drops is left behind. tests/unit/test_upgrade_conversions.py
holds every conversion complete (each changed map has its function) and
checks each function on entries.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field

from manager.relay.kernel.errors import DatapathError
from manager.relay.kernel.layouts import LAYOUTS, V1, V2, FlowInfoV1, Layout, ReverseInfoV1
from manager.relay.kernel.structs import FlowInfo, ReverseInfo, type_shape

Convert = Callable[[bytes, bytes], tuple[bytes, bytes]]


def by_field(src: type, dst: type) -> Convert:
    """Values of src become values of dst field by field: a field both have
    (same name, same size) keeps its bytes, a field dst adds is zero."""
    moves = []
    for name, *_ in dst._fields_:
        if hasattr(src, name):
            s, d = getattr(src, name), getattr(dst, name)
            if s.size != d.size:
                raise TypeError(f"{src.__name__}.{name} and {dst.__name__}.{name} differ in size")
            moves.append((s.offset, d.offset, d.size))
    size = ctypes.sizeof(dst)

    def convert(key: bytes, value: bytes) -> tuple[bytes, bytes]:
        out = bytearray(size)
        for so, do, n in moves:
            out[do:do + n] = value[so:so + n]
        return key, bytes(out)

    return convert


def by_stat_name(src: Layout, dst: Layout) -> Convert:
    """The stats map's entries follow their counter's name to its index in
    dst; a counter dst no longer has is left behind."""
    moves = {i: dst.stat_names.index(name) for i, name in enumerate(src.stat_names) if name in dst.stat_names}

    def convert(key: bytes, value: bytes) -> tuple[bytes, bytes] | None:
        to = moves.get(int.from_bytes(key, "little"))
        return None if to is None else (to.to_bytes(len(key), "little"), value)

    return convert


@dataclass(frozen=True)
class Conversion:
    source: Layout
    target: Layout
    maps: dict[str, Convert] = field(default_factory=dict)

    def changed_maps(self) -> list[str]:
        """Maps in both layouts whose key or value shape differs: each needs a function."""
        changed = [name for name, (k, v) in self.source.map_types.items()
                   if name in self.target.map_types
                   and (type_shape(k), type_shape(v)) != tuple(map(type_shape, self.target.map_types[name]))]
        if self.source.stat_names != self.target.stat_names and "stats" not in changed:
            changed.append("stats")  # same types, other counters at its indexes
        return changed


# From each layout to the next, keyed by the source layout's hash.
CONVERSIONS: dict[int, Conversion] = {
    V1.hash: Conversion(V1, V2, {
        # Per-flow media accounting added: the counts start at zero.
        "flows4": by_field(FlowInfoV1, FlowInfo),
        "flows6": by_field(FlowInfoV1, FlowInfo),
        "reverse": by_field(ReverseInfoV1, ReverseInfo),
        # Two counters added in the middle of enum stat_id.
        "stats": by_stat_name(V1, V2),
    }),
}


def path_from(pinned: int, target: Layout, where: str = "") -> list[Conversion]:
    """The conversions that bring maps of layout `pinned` to `target`; a
    layout without a path is refused in one line (nothing is touched)."""
    steps: list[Conversion] = []
    at = pinned
    while at != target.hash:
        step = CONVERSIONS.get(at)
        if step is None or len(steps) > len(CONVERSIONS):
            known = ", ".join(f"{lay.name} {h:016x}" for h, lay in LAYOUTS.items())
            raise DatapathError(
                f"pinned maps{where} have map layout {pinned:016x}, which this relayd cannot convert to its own "
                f"({target.name} {target.hash:016x}; it knows {known}): refusing to take over, the running "
                f"relay keeps forwarding. Run a relayd that knows that layout")
        steps.append(step)
        at = step.target.hash
    return steps


def convert_entry(steps: list[Conversion], name: str, key: bytes, value: bytes) -> tuple[bytes, bytes] | None:
    """One entry of map `name` through every step; None if a step drops the map or the entry."""
    for step in steps:
        if name not in step.target.map_types:
            return None
        fn = step.maps.get(name)
        if fn is not None:
            out = fn(key, value)
            if out is None:  # the step drops this entry
                return None
            key, value = out
    return key, value
