"""/readyz's parts: each named, the first failing one makes the relay not ready."""

from __future__ import annotations

from manager.relay import readiness as rd


def test_all_parts_ok_is_ready_and_names_each():
    r = rd.Readiness([("started", rd.started(lambda: 1.0)),
                      ("transceivers", rd.transceivers_healthy(lambda: 2))])
    ready, parts = r.evaluate()
    assert ready
    assert rd.Readiness.render_text(parts) == "started: ok (serving)\ntransceivers: ok (2 healthy)\n"


def test_one_failing_part_is_not_ready_and_says_why():
    r = rd.Readiness([("started", rd.started(lambda: 1.0)),
                      ("transceivers", rd.transceivers_healthy(lambda: 0))])
    ready, parts = r.evaluate()
    assert not ready
    assert [p.to_dict() for p in parts][1] == {"name": "transceivers", "ok": False, "detail": "0 healthy"}


def test_a_check_that_raises_is_not_ready_with_its_reason():
    def broken():
        raise OSError("netlink gone")
    ready, parts = rd.Readiness([("xdp", broken)]).evaluate()
    assert not ready and parts[0].detail == "check failed: netlink gone"


def test_xdp_check_wants_our_program_on_every_interface():
    attached = {"pub0": (7, "native"), "tx1": (7, "native"), "tx2": (None, None)}
    ours = [7]
    check = rd.xdp_attached(["pub0", "tx1"], attached.__getitem__, lambda: ours[0])
    assert check() == (True, "attached on pub0, tx1")
    ours[0] = 9  # a foreign program (or an old one) on the interfaces
    assert check() == (False, "not attached on pub0 (program 7, not 9), tx1 (program 7, not 9)")
    assert rd.xdp_attached(["tx2"], attached.__getitem__, lambda: None)() == (False, "not attached on tx2")


def test_not_started_is_not_ready():
    assert rd.started(lambda: None)() == (False, "starting")
