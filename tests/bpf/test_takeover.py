"""A relayd takes over the pinned maps of the previous release's layout:
the release's own code (from git) pins its program and calls' flows, this
relayd loads beside them, converts every entry and replaces the pins. An
unknown layout is refused before anything is loaded, the old pins left as
they were. (tests/netns/test_upgrade.py does it under live traffic.)"""

from __future__ import annotations

import ctypes
import os
import uuid
from pathlib import Path

import pytest

from manager.relay.config import DatapathConfig
from manager.relay.kernel import libbpf
from manager.relay.kernel.datapath import Datapath, DatapathError, OwnerAddr
from manager.relay.kernel.layouts import V1
from manager.relay.kernel.structs import LAYOUT_HASH, FlowInfo
from tests.support import previous_release

VIP = ("10.9.9.9", 3478)
UFRAG = "u" * 24
FLOWS = [
    {"conn_id": 0x21, "owner": {"addr4": "10.9.8.1", "port4": 5000}, "client": ["198.51.100.7", 41000],
     "vip": list(VIP), "flow_port": 20001},
    {"conn_id": 0x22, "owner": {"addr4": "10.9.8.2", "port4": 5002, "addr6": "fd00::8:2", "port6": 5002},
     "client": ["198.51.100.8", 41002], "vip": list(VIP), "flow_port": 20002},
    {"conn_id": 0x22, "owner": {"addr4": "10.9.8.2", "port4": 5002, "addr6": "fd00::8:2", "port6": 5002},
     "client": ["2001:db8::8", 41002], "vip": ["fd00::9", 3478], "flow_port": 20003},
]


@pytest.fixture(scope="module")
def release_tree(tmp_path_factory):
    return previous_release.extract("v1", tmp_path_factory.mktemp("release") / "v1")


@pytest.fixture
def base():
    pin = f"/sys/fs/bpf/srtake-{uuid.uuid4().hex[:8]}"
    cfg = dict(pin_dir=pin, vips=[{"addr": VIP[0], "port": VIP[1]}, {"addr": "fd00::9", "port": 3478}],
               internal_addr4="10.9.9.1", internal_addr6="fd00::1", max_flows=1024, max_reverse=1024,
               max_owners=256)
    yield cfg
    Datapath(DatapathConfig(**cfg)).detach(purge=True)


def test_takeover_from_v1_carries_every_call(release_tree, base):
    previous_release.install(release_tree, base, FLOWS, [UFRAG])
    with libbpf.PinnedMap(f"{base['pin_dir']}/layout", ctypes.c_uint32, ctypes.c_uint64) as m:
        assert m.lookup(ctypes.c_uint32(0)).value == V1.hash  # what that release really pinned
    old_prog = os.stat(f"{base['pin_dir']}/prog").st_ino

    dp = Datapath(DatapathConfig(**base))
    try:
        assert dp.load() is False
        assert dp.takeover is not None and dp.takeover.source == "v1"
        assert dp.takeover.copied["flows4"] == 2 and dp.takeover.copied["flows6"] == 1
        assert dp.takeover.copied["reverse"] == 3 and dp.takeover.copied["live_ufrags"] == 1
        assert os.stat(f"{base['pin_dir']}/prog").st_ino != old_prog
        assert not Path(f"{base['pin_dir']}_next").exists()
        assert dp.maps.layout.lookup(ctypes.c_uint32(0)).value == LAYOUT_HASH
        assert libbpf.map_info(dp.maps.flows4.fd).value_size == ctypes.sizeof(FlowInfo)
        got = {(f.client, f.vip): f for f in dp.flows()}
        for spec in FLOWS:
            flow = got[(tuple(spec["client"]), tuple(spec["vip"]))]
            assert (flow.conn_id, flow.flow_port) == (spec["conn_id"], spec["flow_port"])
            owner, _ = dp.get_owner(spec["conn_id"])
            assert owner == OwnerAddr(**spec["owner"])
            media = dp.flow_media(tuple(spec["client"]), tuple(spec["vip"]))
            assert media.up.received == 0 and media.down.received == 0  # counted from the switch on
        assert dp.forget_ufrag(UFRAG) is True
    finally:
        dp.close()
    # The next restart adopts what the takeover pinned: same layout, same source.
    again = Datapath(DatapathConfig(**base))
    try:
        assert again.load() is True and again.takeover is None
    finally:
        again.close()


def test_an_unknown_layout_is_refused_and_left_running(release_tree, base):
    previous_release.install(release_tree, base, FLOWS[:1])
    with libbpf.PinnedMap(f"{base['pin_dir']}/layout", ctypes.c_uint32, ctypes.c_uint64) as m:
        m.update(ctypes.c_uint32(0), ctypes.c_uint64(0x0123456789ABCDEF))  # a layout nobody shipped
    old_prog = os.stat(f"{base['pin_dir']}/prog").st_ino
    with pytest.raises(DatapathError, match=r"^pinned maps in \S+ have map layout 0123456789abcdef, which this "
                                            r"relayd cannot convert .* the running relay keeps forwarding") as exc:
        Datapath(DatapathConfig(**base)).load()
    assert "\n" not in str(exc.value)
    assert os.stat(f"{base['pin_dir']}/prog").st_ino == old_prog
    assert not Path(f"{base['pin_dir']}_next").exists()
    fd = libbpf.obj_get(f"{base['pin_dir']}/flows4")
    try:
        assert libbpf.map_info(fd).value_size == ctypes.sizeof(V1.map_types["flows4"][1])  # the old map, kept
    finally:
        os.close(fd)
