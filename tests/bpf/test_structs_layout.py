"""Holds manager/relay/kernel/structs.py against the C structs, as bcc sees them in the
compiled program: for every map, key and value must agree in size and in
every field's name, offset and size (recursively)."""

from __future__ import annotations

import ctypes
import re
import uuid
from pathlib import Path

import pytest

from manager.relay.config import DatapathConfig
from manager.relay.kernel.datapath import PROG_SOURCE, Datapath, ensure_kernel_headers
from manager.relay.kernel.structs import BPF_DIR, MAP_TYPES, PERCPU_MAPS, STAT_NAMES, UNPINNED_MAP_TYPES


def layout(t) -> list:
    """(name, offset, size, sub-layout) for a ctypes type; scalars and arrays by size."""
    if isinstance(t, type) and issubclass(t, ctypes.Structure):
        return [(name, getattr(t, name).offset, getattr(t, name).size, layout(ft)) for name, ft, *_ in t._fields_]
    if isinstance(t, type) and issubclass(t, ctypes.Array):
        return [("[]", t._length_, ctypes.sizeof(t), layout(t._type_))]
    return [("scalar", 0, ctypes.sizeof(t), [])]


@pytest.fixture(scope="module")
def bcc_tables():
    ensure_kernel_headers()
    from bcc import BPF

    pin = Path(f"/sys/fs/bpf/srlayout-{uuid.uuid4().hex[:8]}")
    dp = Datapath(DatapathConfig(pin_dir=pin, max_flows=64, max_reverse=64, max_owners=64))
    pin.mkdir(parents=True)
    bpf = BPF(src_file=str(PROG_SOURCE).encode(), cflags=dp.cflags())
    try:
        yield bpf
    finally:
        bpf.cleanup()
        for p in pin.iterdir():
            p.unlink()
        pin.rmdir()


@pytest.mark.parametrize("name", [*MAP_TYPES, *UNPINNED_MAP_TYPES])
def test_map_layout_matches_bcc(bcc_tables, name):
    table = bcc_tables[name.encode()]
    key_t, value_t = {**MAP_TYPES, **UNPINNED_MAP_TYPES}[name]
    bcc_leaf = table.Leaf
    if name in PERCPU_MAPS:
        # bcc types a per-CPU value as an array over CPUs of the C struct.
        assert issubclass(bcc_leaf, ctypes.Array)
        bcc_leaf = bcc_leaf._type_
    assert ctypes.sizeof(table.Key) == ctypes.sizeof(key_t)
    assert ctypes.sizeof(bcc_leaf) == ctypes.sizeof(value_t)
    assert layout(table.Key) == layout(key_t)
    assert layout(bcc_leaf) == layout(value_t)


def test_stat_names_cover_the_stats_map(bcc_tables):
    """STAT_NAMES is read from enum stat_id; the map is sized by STAT_MAX."""
    assert bcc_tables[b"stats"].max_entries == len(STAT_NAMES)
    assert len(set(STAT_NAMES)) == len(STAT_NAMES)


def test_every_struct_is_padded_explicitly():
    """No implicit holes: the sum of field sizes equals the struct size."""
    text = (BPF_DIR / "structs.h").read_text()
    for _name in re.findall(r"^struct (\w+) \{", text, re.M):
        for _, (k, v) in MAP_TYPES.items():
            for t in (k, v):
                if isinstance(t, type) and issubclass(t, ctypes.Structure):
                    assert sum(getattr(t, f).size for f, *_ in t._fields_) == ctypes.sizeof(t), t.__name__


def test_ufrag_shape_constants_match_the_python_side():
    """bpf/stun.h admits USERNAMEs of the server ufrag's shape: the C constants
    must be manager/protocol/ufrag.py's."""
    from manager.protocol import ufrag
    from manager.relay.kernel import structs

    text = (BPF_DIR / "consts.h").read_text()
    consts = dict(re.findall(r"^#define (UFRAG_LEN|UFRAG_VERSION) (\d+)", text, re.M))
    assert int(consts["UFRAG_LEN"]) == ufrag.UFRAG_LENGTH == structs.UFRAG_LEN
    assert int(consts["UFRAG_VERSION"]) == ufrag.VERSION


def test_adoption_refuses_pinned_maps_that_do_not_fit():
    """A relayd whose config or struct layout differs from the pinned maps'
    refuses them before touching anything (the old program stays pinned)."""
    import os as _os

    from manager.relay.kernel.datapath import DatapathError

    pin = f"/sys/fs/bpf/sradopt-{uuid.uuid4().hex[:8]}"
    base = dict(pin_dir=pin, vips=[{"addr": "10.9.9.9", "port": 3478}], internal_addr4="10.9.9.1",
                max_flows=1024, max_reverse=1024, max_owners=256)
    first = Datapath(DatapathConfig(**base))
    try:
        first.load()
        prog_before = _os.stat(f"{pin}/prog").st_ino
        first.close()
        bigger = Datapath(DatapathConfig(**{**base, "max_flows": 2048}))
        with pytest.raises(DatapathError, match=r"pinned map .*/flows4 does not fit this relayd: max_entries 1024, "
                                                r"not 2048\. Restore the config"):
            bigger.load(upgrade=True)
        assert _os.stat(f"{pin}/prog").st_ino == prog_before  # nothing was unpinned
        same = Datapath(DatapathConfig(**base))
        assert same.load() is True  # the matching config adopts it
        same.close()
    finally:
        Datapath(DatapathConfig(**base)).detach(purge=True)


def test_adoption_refuses_pinned_maps_of_another_layout():
    """Same sizes, other meaning (a pad that became a field): the layout hash
    the maps carry decides, before anything is touched."""
    import ctypes as _ct
    import os as _os

    from manager.relay.kernel import libbpf
    from manager.relay.kernel.datapath import DatapathError
    from manager.relay.kernel.structs import LAYOUT_HASH

    pin = f"/sys/fs/bpf/sradopt-{uuid.uuid4().hex[:8]}"
    base = dict(pin_dir=pin, vips=[{"addr": "10.9.9.9", "port": 3478}], internal_addr4="10.9.9.1",
                max_flows=1024, max_reverse=1024, max_owners=256)
    first = Datapath(DatapathConfig(**base))
    try:
        first.load()
        assert first.maps.layout.lookup(_ct.c_uint32(0)).value == LAYOUT_HASH
        first.maps.layout.update(_ct.c_uint32(0), _ct.c_uint64(LAYOUT_HASH ^ 1))  # as another version wrote it
        first.close()
        prog_before = _os.stat(f"{pin}/prog").st_ino
        with pytest.raises(DatapathError, match=r"have map layout [0-9a-f]{16}, which this relayd cannot convert"):
            Datapath(DatapathConfig(**base)).load(upgrade=True)
        assert _os.stat(f"{pin}/prog").st_ino == prog_before
        assert not _os.path.exists(f"{pin}_next")  # nothing was loaded beside it
        # Pins from before the layout map existed are refused too.
        _os.unlink(f"{pin}/layout")
        with pytest.raises(DatapathError, match="carry no layout hash"):
            Datapath(DatapathConfig(**base)).load()
        assert libbpf.obj_get(f"{pin}/flows4") >= 0
    finally:
        Datapath(DatapathConfig(**base)).detach(purge=True)
