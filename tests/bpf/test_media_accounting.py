"""Per-flow media accounting in the loaded XDP program (struct rtp_stats),
read through Datapath.flow_media: packets and bytes both ways, and per
direction the highest RTP sequence, expected vs received, reordering and
the jitter estimate. RTCP, STUN, DTLS and a second SSRC are not counted as
the stream's media."""

from __future__ import annotations

import struct

from manager.lab.xdp_harness import CLIENT4, TX1_4, VIP4, VIP_PORT
from tests.support.xdp_frames import DTLS, STUN, c2r4, o2r4

XDP_REDIRECT = 4
SPORT, FLOW_PORT = 40050, 20050  # a flow of this module's own (conn 7, owner tx1)


def rtp(seq: int, ts: int, ssrc: int = 0x11223344, pt: int = 111) -> bytes:
    return struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + b"a" * 60


def test_each_direction_counts_its_stream(harness):
    dp = harness.dp
    client, vip = (CLIENT4, SPORT), (VIP4, VIP_PORT)
    dp.add_flow(client, vip, 7, FLOW_PORT)

    def up(payload: bytes) -> None:
        assert harness.run(bytes(c2r4(payload, sport=SPORT)))[0] == XDP_REDIRECT

    def down(payload: bytes) -> None:
        assert harness.run(bytes(o2r4(payload, src=TX1_4, flow_port=FLOW_PORT)), "int")[0] == XDP_REDIRECT

    # Up: 1, 2, 4, 3 (one behind the highest), 5, then 8 (6 and 7 lost);
    # STUN, DTLS, an RTCP receiver report and another SSRC are forwarded, not counted.
    for seq in (1, 2, 4, 3, 5, 8):
        up(rtp(seq, seq * 960))
    up(STUN)
    up(DTLS)
    up(bytes([0x81, 201]) + b"\x00\x07" + b"\x00" * 28)  # RTCP RR (packet type 201)
    up(rtp(9, 9 * 960, ssrc=0x55667788))
    # Down: across the sequence wrap, 65534, 65535, 0, 1.
    for i, seq in enumerate((65534, 65535, 0, 1)):
        down(rtp(seq, i * 960, ssrc=0x0A0B0C0D))

    media = dp.flow_media(client, vip)
    assert media is not None
    assert media.up.packets == 10 and media.up.bytes > 0
    assert (media.up.ssrc, media.up.highest_seq, media.up.expected, media.up.received, media.up.lost,
            media.up.reordered) == (0x11223344, 8, 8, 6, 2, 1)
    assert media.down.packets == 4
    assert (media.down.ssrc, media.down.highest_seq, media.down.expected, media.down.received, media.down.lost,
            media.down.reordered) == (0x0A0B0C0D, 65536 + 1, 4, 4, 0, 0)
    # Sent 20 ms of media apart (960 ticks) and run at once: each packet's
    # transit moves by about 20 ms, so the estimate climbs toward 20 ms.
    assert 0 < media.up.jitter_ms < 20 and 0 < media.down.jitter_ms < 20
    assert dp.flow_media((CLIENT4, SPORT + 1), vip) is None
    dp.remove_flow(client, vip)
