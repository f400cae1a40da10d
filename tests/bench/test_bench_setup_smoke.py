"""The set-up benchmark measures what it says: every leg it offers goes the
whole way (admitted, forwarded to the owner, answered, installed in the
kernel) and its counters and the kernel's flows map agree. Tiny counts;
never a timing."""

from __future__ import annotations

import pytest

from tests.bench import bench_setup as bs

pytestmark = pytest.mark.netns


def test_every_offered_leg_is_installed_in_the_kernel():
    res = bs.run([(400.0, 60), (400.0, 40)])
    first, second = res["steps"]
    assert first["installed"] == 60 and second["installed"] == 40
    # each step's legs are new tuples: the kernel holds both steps' flows
    assert first["kernel_flows"] == 60 and second["kernel_flows"] == 100
    for step in (first, second):
        n = step["legs"]
        assert step["stats"] == {"legs_opened": n, "forward_in": n, "forward_out": n, "flows_installed": n}
        assert step["ok"] and step["legs_per_s"] > 0 and step["cpu_us_per_leg"] > 0
        assert set(step["setup_ms"]) == {"p50", "p99", "max"}
    assert "highest set-up rate with every leg installed" in bs.table(res)


def test_checks_look_like_a_browsers():
    from aioice import stun

    pkt = bs.check_packet("a" * 24, ("10.98.0.7", bs.CLIENT_PORT))
    assert pkt[9] == 17 and pkt[12:16] == bytes([10, 98, 0, 7])  # UDP from the leg's own address
    msg = stun.parse_message(pkt[28:])
    assert msg.attributes["USERNAME"] == "a" * 24 + ":" + bs.CLIENT_UFRAG
    assert {"PRIORITY", "ICE-CONTROLLING", "FINGERPRINT"} <= set(msg.attributes)
    # MESSAGE-INTEGRITY is the one an agent with the call's password computes
    again = stun.Message(message_method=msg.message_method, message_class=msg.message_class,
                         transaction_id=msg.transaction_id)
    for name in ("USERNAME", "PRIORITY", "ICE-CONTROLLING"):
        again.attributes[name] = msg.attributes[name]
    again.add_message_integrity(bs.ICE_PWD.encode())
    assert again.attributes["MESSAGE-INTEGRITY"] == msg.attributes["MESSAGE-INTEGRITY"]
