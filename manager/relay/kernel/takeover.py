"""Taking over from a running fast path of another map layout without
dropping a packet.

The running program keeps forwarding on its maps throughout:
  1. the new program is loaded beside it, its maps pinned in a staging
     directory (<pin_dir>_next; bpffs refuses dots in names) and empty;
  2. every entry of the old maps is copied across, through the conversions
     from the old layout (conversions.py); a map the new layout adds starts
     empty;
  3. each pinned XDP link is switched to the new program in one step
     (bpf_link_update): no packet sees neither program;
  4. what the old program changed while 2 ran is caught up: entries it
     added (an SSRC learned), and the packets and bytes it counted;
  5. the new maps and program take the old pins' names, and the old pins
     go (the old maps are freed with the last reference).
A layout with no conversion is refused before anything is loaded. The old
relayd must be stopped first (SIGTERM leaves the fast path running): it
would otherwise go on writing the old maps.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from manager.relay.config import DatapathConfig
from manager.relay.kernel import libbpf
from manager.relay.kernel.attach import attach_one
from manager.relay.kernel.build import compile_and_load
from manager.relay.kernel.conversions import Conversion, convert_entry, path_from
from manager.relay.kernel.layouts import Layout
from manager.relay.kernel.pins import PROG_PIN, pinned_prog_id, unpin_all

log = logging.getLogger("splitrelay.relay")

# Written for the new layout before the switch: not copied. The other
# config maps are (the new program must forward from its first packet);
# configure() rewrites them from the new relayd's config right after.
CONFIG_MAPS = frozenset({"layout"})
# Written by userspace only (the old relayd is stopped): no catch-up.
ARRAY_MAPS = frozenset({"owners", "epochs", "if_roles", "admit_budget", "stats", "relay_cfg", "admit_cfg", "vips"})
COUNTERS = ("packets", "bytes")


def staging_dir(pin_dir: Path) -> Path:
    return pin_dir.with_name(pin_dir.name + "_next")


@dataclass
class Takeover:
    """What a takeover did, for the log."""

    source: str
    target: str
    prog_fd: int
    copied: dict[str, int] = field(default_factory=dict)
    caught_up: int = 0

    def summary(self) -> str:
        moved = ", ".join(f"{n} {c}" for n, c in self.copied.items() if c)
        return (f"took over the fast path from map layout {self.source} to {self.target}: copied {moved or 'nothing'}; "
                f"{self.caught_up} caught up after the switch")


class RawMap:
    """A pinned map as bytes: entries of a layout read and written without
    its ctypes types (they may be another version's)."""

    def __init__(self, path: Path, key_type: type, value_type: type, percpu: bool):
        ks, vs = ctypes.sizeof(key_type), ctypes.sizeof(value_type)
        self.m = libbpf.PinnedMap(str(path), ctypes.c_uint8 * ks, ctypes.c_uint8 * vs, percpu=percpu)
        self.percpu = percpu
        self.vsize = vs
        self.key_buf = ctypes.c_uint8 * ks

    def items(self) -> dict[bytes, list[bytes]]:
        """key → values (one per CPU for a per-CPU map, else one)."""
        return {bytes(k): [bytes(x) for x in v] if self.percpu else [bytes(v)] for k, v in self.m.items()}

    def lookup(self, key: bytes) -> bytes | None:
        v = self.m.lookup(self.key_buf.from_buffer_copy(key))
        return None if v is None or self.percpu else bytes(v)

    def write(self, key: bytes, values: list[bytes], flags: int = libbpf.BPF_ANY) -> bool:
        stride = (self.vsize + 7) & ~7
        buf = (ctypes.c_uint8 * (stride * len(values)))()
        for i, v in enumerate(values):
            ctypes.memmove(ctypes.byref(buf, i * stride), v, self.vsize)
        rc = libbpf.lib().bpf_map_update_elem(self.m.fd, ctypes.byref(self.key_buf.from_buffer_copy(key)), buf,
                                              flags)
        if rc < 0 and flags == libbpf.BPF_NOEXIST:
            return False
        libbpf._check(rc, f"update {self.m.path}")
        return True

    def close(self) -> None:
        self.m.close()


def _open(pin_dir: Path, layout: Layout, names) -> dict[str, RawMap]:
    out = {}
    try:
        for name in names:
            k, v = layout.map_types[name]
            out[name] = RawMap(pin_dir / name, k, v, layout.percpu(name))
    except Exception:
        for m in out.values():
            m.close()
        raise
    return out


def _counter_span(value_type: type, name: str) -> tuple[int, int] | None:
    f = getattr(value_type, name, None)
    return None if f is None else (f.offset, f.size)


def take_over(cfg: DatapathConfig, pinned_hash: int, target: Layout, source_digest: int) -> Takeover:
    """Steps 1-5 of the module's docstring; returns the new program's fd."""
    pin_dir = Path(cfg.pin_dir)
    # An unknown layout is refused here, before anything is loaded.
    steps: list[Conversion] = path_from(pinned_hash, target, f" in {pin_dir}")
    source = steps[0].source
    stage = staging_dir(pin_dir)
    unpin_all(stage)  # a takeover that stopped half-way
    prog_fd = compile_and_load(cfg.model_copy(update={"pin_dir": stage}))
    result = Takeover(source=source.name, target=target.name, prog_fd=prog_fd)
    names = [n for n in source.map_types if (pin_dir / n).exists()]
    carried = [n for n in names if n in target.map_types and n not in CONFIG_MAPS]
    old = new = {}
    try:
        old = _open(pin_dir, source, names)
        new = _open(stage, target, target.map_types)
        new["layout"].write(bytes(4), [target.hash.to_bytes(8, "little")])
        new["layout"].write((1).to_bytes(4, "little"), [source_digest.to_bytes(8, "little")])
        seen: dict[str, dict[bytes, list[bytes]]] = {}
        for name in carried:
            seen[name] = entries = old[name].items()
            for key, values in entries.items():
                converted = [convert_entry(steps, name, key, v) for v in values]
                if converted[0] is not None:
                    new[name].write(converted[0][0], [v for _, v in converted])
            result.copied[name] = len(entries)
        previous = pinned_prog_id(pin_dir)
        # The switch: each link now runs the new program, on the copied maps.
        for ifname in cfg.interfaces:
            attach_one(prog_fd, ifname, pin_dir, cfg.xdp_mode, replace=cfg.xdp_replace, previous=previous)
    except BaseException:
        for m in (*old.values(), *new.values()):
            m.close()
        os.close(prog_fd)
        unpin_all(stage)
        raise
    try:
        result.caught_up = _catch_up(steps, source, target, old, new, seen)
    finally:
        for m in (*old.values(), *new.values()):
            m.close()
    _move_pins(pin_dir, stage, names, target, prog_fd)
    return result


def _catch_up(steps, source: Layout, target: Layout, old, new, seen) -> int:
    """Entries the old program added, and counts it made, between the copy and the switch."""
    n = 0
    for name, before in seen.items():
        if name in ARRAY_MAPS:
            continue
        src_v, dst_v = source.map_types[name][1], target.map_types[name][1]
        spans = [(s, d) for c in COUNTERS if (s := _counter_span(src_v, c)) and (d := _counter_span(dst_v, c))]
        for key, values in old[name].items().items():
            converted = convert_entry(steps, name, key, values[0])
            if converted is None:
                continue
            was = before.get(key)
            if was is None:
                n += new[name].write(converted[0], [converted[1]], libbpf.BPF_NOEXIST)
                continue
            if not spans or was[0] == values[0]:
                continue
            cur = new[name].lookup(converted[0])
            if cur is None:
                continue
            out = bytearray(cur)
            for (so, size), (do, _) in spans:
                now_v, was_v = (int.from_bytes(v[so:so + size], "little") for v in (values[0], was[0]))
                total = int.from_bytes(out[do:do + size], "little") + max(now_v - was_v, 0)
                out[do:do + size] = (total % (1 << (8 * size))).to_bytes(size, "little")
            new[name].write(converted[0], [bytes(out)])
            n += 1
    return n


def _move_pins(pin_dir: Path, stage: Path, old_names: list[str], target: Layout, prog_fd: int) -> None:
    """The new maps and program take the pinned names; the old ones go."""
    for name in target.map_types:
        os.replace(stage / name, pin_dir / name)  # bpffs renames over the old pin in one step
    for name in old_names:
        if name not in target.map_types:
            (pin_dir / name).unlink(missing_ok=True)
    tmp = pin_dir / f"{PROG_PIN}_new"
    tmp.unlink(missing_ok=True)
    libbpf.obj_pin(prog_fd, str(tmp))
    os.replace(tmp, pin_dir / PROG_PIN)
    try:
        stage.rmdir()
    except OSError as exc:
        log.warning("staging directory %s left behind: %s", stage, exc)
