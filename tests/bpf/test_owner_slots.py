"""The owners array: each call holds a slot, flows and return entries carry
it, and XDP follows a slot only while it names the entry's connection id.
Real program and maps (the XDP harness), frames built by scapy."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from manager.lab import xdp_harness as hx
from manager.lab.xdp_harness import CLIENT4, INT4, MAC, TX1_4, TX2_4, VIP4, VIP_PORT, XDP_DROP, XDP_REDIRECT
from manager.protocol.addresses import OwnerAddr
from manager.relay.kernel import libbpf
from manager.relay.kernel.datapath import Datapath, DatapathError

pytestmark = pytest.mark.netns

RTP = bytes([0x80, 111]) + b"\x00\x01" + b"\x00" * 8 + b"r" * 40
VIP = (VIP4, VIP_PORT)
#: Owner flips the seqlock test wants frames to run through, at the least.
MIN_FLIPS = 200
TX1 = OwnerAddr(addr4=TX1_4, port4=5000)


@pytest.fixture
def h():
    harness = hx.build(max_flows=16)  # 64 owner slots
    try:
        yield harness
    finally:
        hx.teardown(harness)


def from_client(port: int) -> bytes:
    return bytes(Ether(src=MAC["client"], dst=MAC["pub"]) / IP(src=CLIENT4, dst=VIP4)
                 / UDP(sport=port, dport=VIP_PORT) / Raw(RTP))


def from_owner(owner: tuple[str, int], flow_port: int) -> bytes:
    return bytes(Ether(src=MAC["tx1"], dst=MAC["int"]) / IP(src=owner[0], dst=INT4)
                 / UDP(sport=owner[1], dport=flow_port) / Raw(RTP))


def test_a_freed_slot_given_to_another_call_is_not_followed_by_the_old_calls_entries(h):
    """Call 1 ends while its flow is still in the kernel; call 2, owned by
    the same transceiver, gets the freed slot. The stale flow and return entry
    still carry that slot but name call 1: neither direction forwards (without
    the connection-id check both would, into call 2's owner and from it)."""
    dp = h.dp
    dp.set_owner(1, TX1)
    dp.add_flow((CLIENT4, 41000), VIP, 1, 20100)
    assert h.run(from_client(41000))[0] == XDP_REDIRECT
    assert h.run(from_owner((TX1_4, 5000), 20100), "int")[0] == XDP_REDIRECT
    slot = dp.slot_of(1)
    assert dp.remove_owner(1) is True
    dp.set_owner(2, TX1)
    assert dp.slot_of(2) == slot  # the freed slot is the next one handed out
    before = dp.counters()
    assert h.run(from_client(41000))[0] == XDP_DROP
    assert h.run(from_owner((TX1_4, 5000), 20100), "int")[0] == XDP_DROP
    after = dp.counters()
    moved = {k: after[k][0] - before[k][0] for k in after if after[k] != before[k]}
    assert moved == {"drop_no_owner": 2}
    # call 2's own flow through the same slot forwards
    dp.add_flow((CLIENT4, 41001), VIP, 2, 20101)
    verdict, out, _ = h.run(from_client(41001))
    assert verdict == XDP_REDIRECT and Ether(out)[IP].dst == TX1_4


def test_slots_survive_a_restart_and_are_not_handed_out_twice(h):
    """A relayd opening the pinned maps finds each call's slot in the array:
    its calls keep their slots, and a new call takes a free one."""
    dp = h.dp
    dp.set_owner(11, TX1)
    dp.set_owner(12, OwnerAddr(addr4=TX2_4, port4=6000))
    dp.add_flow((CLIENT4, 41011), VIP, 11, 20111)
    held = {11: dp.slot_of(11), 12: dp.slot_of(12)}
    again = Datapath(dp.cfg)
    try:
        again.open_maps()
        assert {c: again.slot_of(c) for c in held} == held
        assert again.get_owner(12) == (OwnerAddr(addr4=TX2_4, port4=6000), 1)
        again.set_owner(13, TX1)
        assert again.slot_of(13) not in held.values()
        gen = again.set_owner(11, OwnerAddr(addr4=TX2_4, port4=6000))  # a move keeps the slot
        assert gen == 2 and again.slot_of(11) == held[11]
        verdict, out, _ = h.run(from_client(41011))
        assert verdict == XDP_REDIRECT and Ether(out)[IP].dst == TX2_4
    finally:
        again.close()


def test_a_full_owners_array_refuses_a_new_call_clearly(h):
    """max_owners calls hold every slot: the next call is refused with the
    setting to raise, and a call that ends frees its slot for it."""
    dp = h.dp
    capacity = dp.cfg.max_owners
    for conn in range(100, 100 + capacity):
        dp.set_owner(conn, TX1)
    with pytest.raises(DatapathError, match=rf"no free owner slot for connection id 999: all {capacity} slots "
                                            r"hold calls \(datapath.max_owners\)"):
        dp.set_owner(999, TX1)
    assert dp.get_owner(999) is None
    dp.set_owner(100, OwnerAddr(addr4=TX2_4, port4=6000))  # a call already holding a slot still moves
    assert dp.remove_owner(101) is True
    dp.set_owner(999, TX1)
    assert dp.get_owner(999) == (TX1, 1)


def test_a_return_entry_staged_before_the_owner_reserves_an_inert_slot(h):
    """A return entry installed before its call has an owner (the fleet can
    stage one) takes the call's slot with no owner in it: nothing forwards
    until set_owner fills it, as with no owner entry at all."""
    dp = h.dp
    dp.add_reverse((TX1_4, 5000), 20120, (CLIENT4, 41020), VIP, 20)
    assert dp.slot_of(20) is not None and dp.get_owner(20) is None
    assert h.run(from_owner((TX1_4, 5000), 20120), "int")[0] == XDP_DROP
    assert dp.set_owner(20, TX1) == 1
    assert h.run(from_owner((TX1_4, 5000), 20120), "int")[0] == XDP_REDIRECT


def test_connection_ids_out_of_range_are_refused(h):
    for bad in (0, -1, 1 << 32):
        with pytest.raises(DatapathError, match=rf"connection id {bad} is out of range"):
            h.dp.set_owner(bad, TX1)


def test_frames_go_to_one_whole_owner_while_the_owner_flips(h):
    """The owner read as a seqlock, as behaviour: one thread flips a call
    between two owners (entry, then epoch) as fast as it can, while frames
    of the call's flow run through the program on another CPU. Every frame
    forwarded goes to one owner whole (its address, port and next hop's
    MAC together), never a mix of the two, and both owners are seen. (On
    x86, whose stores are seen in order, a mix is not expected even
    without the re-check; weakly ordered CPUs are what the re-check is for.)"""
    import os
    import threading
    import time

    dp = h.dp
    tx2 = OwnerAddr(addr4=TX2_4, port4=6000)
    whole = {(TX1_4, 5000, MAC["tx1"]), (TX2_4, 6000, MAC["tx2"])}
    dp.set_owner(41, TX1)
    dp.add_flow((CLIENT4, 40041), VIP, 41, 20041)
    frame = from_client(40041)
    stop = threading.Event()
    flips = 0

    def flip() -> None:
        nonlocal flips
        while not stop.is_set():
            dp.set_owner(41, tx2 if flips % 2 == 0 else TX1)
            flips += 1

    def run_frames() -> list[tuple[str, int, str]]:
        # On a CPU of its own, if the machine has two: the flipper runs beside it.
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) > 1:
            os.sched_setaffinity(0, {cpus[-1]})
        seen = []
        deadline = time.monotonic() + 60
        # Frames run until the owner has flipped often and both were seen (the
        # flipper shares the GIL with this loop: how often it runs is the
        # scheduler's business), at least 5,000 of them.
        while len(seen) < 5000 or flips < MIN_FLIPS or len({s[0] for s in seen}) < 2:
            if time.monotonic() > deadline:
                break  # the assertions below say what was missing
            verdict, out, _ = libbpf.prog_test_run_xdp(dp.prog_fd, frame, ingress_ifindex=h.ifindex["pub"])
            assert verdict == XDP_REDIRECT, hx.VERDICTS[verdict]
            pkt = Ether(out)
            seen.append((pkt[IP].dst, pkt[UDP].dport, pkt.dst))
        return seen

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    try:
        seen = h.ex.call(run_frames)
    finally:
        stop.set()
        flipper.join()
        dp.remove_flow((CLIENT4, 40041), VIP)
        dp.remove_owner(41)
    mixed = [s for s in seen if s not in whole]
    assert not mixed, mixed[:5]
    assert {s[0] for s in seen} == {TX1_4, TX2_4}, f"both owners were not seen in {flips} flips"
    assert flips >= MIN_FLIPS, f"{flips} flips in {len(seen)} frames"
