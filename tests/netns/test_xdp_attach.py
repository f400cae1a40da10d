"""Attaching XDP through pinned links: a foreign program is never replaced
silently, two relayds with their own pin directories cannot displace each
other, and the attachment outlives the process that made it."""

from __future__ import annotations

import pytest

from manager.lab import xdp_harness as hx
from manager.relay.kernel.datapath import Datapath, DatapathError, xdp_attachment

pytestmark = pytest.mark.netns


@pytest.fixture
def harness():
    h = hx.build()
    try:
        yield h
    finally:
        hx.teardown(h)


def _other(h: hx.Harness, **update) -> Datapath:
    """A second relayd's datapath: the same program, its own pin directory."""
    dp = Datapath(h.dp.cfg.model_copy(update={"pin_dir": h.dp.pin_dir.with_name(h.dp.pin_dir.name + "-b"),
                                              **update}))
    dp.load(upgrade=True)
    return dp


def test_two_relays_with_their_own_pin_dirs_do_not_displace_each_other(harness):
    h = harness
    first = h.ex.call(h.dp.attach, ["pub"])
    assert not first[0].adopted
    ours, _ = h.ex.call(xdp_attachment, "pub")
    other = _other(h)
    try:
        with pytest.raises(DatapathError, match="refusing to replace it"):
            h.ex.call(other.attach, ["pub"])
        assert h.ex.call(xdp_attachment, "pub")[0] == ours
        # Asked to replace: a program attached through another's link still
        # cannot be taken (the kernel refuses), and the first stays.
        forced = Datapath(other.cfg.model_copy(update={"xdp_replace": True}))
        forced.load()
        try:
            with pytest.raises(DatapathError):
                h.ex.call(forced.attach, ["pub"])
        finally:
            forced.close()
        assert h.ex.call(xdp_attachment, "pub")[0] == ours
    finally:
        other.detach(purge=True)
        other.close()


def test_a_foreign_program_is_replaced_only_when_the_config_says_so(harness):
    """A program attached without a link (another tool's, through netlink)
    is refused, and replaced with datapath.xdp_replace."""
    from bcc.libbcc import lib as bcclib

    from manager.relay.kernel.attach import XDP_FLAGS_DRV_MODE

    h = harness
    foreign = _other(h)
    try:
        assert h.ex.call(bcclib.bpf_attach_xdp, b"pub", foreign.prog_fd, XDP_FLAGS_DRV_MODE) >= 0
        foreign_id, _ = h.ex.call(xdp_attachment, "pub")
        with pytest.raises(DatapathError, match=f"id {foreign_id}"):
            h.ex.call(h.dp.attach, ["pub"])
        assert h.ex.call(xdp_attachment, "pub")[0] == foreign_id
        replacing = Datapath(h.dp.cfg.model_copy(update={"xdp_replace": True}))
        replacing.load()
        try:
            assert not h.ex.call(replacing.attach, ["pub"])[0].adopted
            assert h.ex.call(xdp_attachment, "pub")[0] not in (None, foreign_id)
        finally:
            replacing.close()
    finally:
        foreign.detach(purge=True)
        foreign.close()


def test_the_link_outlives_its_process_and_is_adopted(harness):
    """The pinned link keeps the program attached with no fd open (relayd
    gone); the next relayd adopts it; detach removes it."""
    h = harness
    h.ex.call(h.dp.attach, ["pub"])
    prog_id, _ = h.ex.call(xdp_attachment, "pub")
    cfg = h.dp.cfg.model_copy(update={"interfaces": ["pub"]})
    h.dp.close()
    assert h.ex.call(xdp_attachment, "pub")[0] == prog_id
    again = Datapath(cfg)
    try:
        assert again.load() is True
        assert h.ex.call(again.attach)[0].adopted
        assert h.ex.call(again.detach) == ["pub"]
        assert h.ex.call(xdp_attachment, "pub") == (None, None)
    finally:
        again.close()
    h.dp.load()  # for the teardown's purge


def test_an_upgrade_swaps_our_previous_program_attached_without_a_link(harness):
    """The program an upgrade replaced in our pin directory, attached by an
    older relayd through netlink, is ours: swapped in place, not refused."""
    from bcc.libbcc import lib as bcclib

    from manager.relay.kernel.attach import XDP_FLAGS_DRV_MODE
    from manager.relay.kernel.libbpf import prog_info

    h = harness
    older = _other(h)
    try:
        assert h.ex.call(bcclib.bpf_attach_xdp, b"pub", older.prog_fd, XDP_FLAGS_DRV_MODE) >= 0
        h.dp._previous_prog_id = prog_info(older.prog_fd).id  # as load(upgrade=True) records it
        assert not h.ex.call(h.dp.attach, ["pub"])[0].adopted
        assert h.ex.call(xdp_attachment, "pub")[0] == prog_info(h.dp.prog_fd).id
    finally:
        h.dp._previous_prog_id = None
        h.ex.call(h.dp.detach)
        older.detach(purge=True)
        older.close()
