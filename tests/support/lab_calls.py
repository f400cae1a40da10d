"""Calls in a lab: run a client call and check that a bystander call is untouched."""

from __future__ import annotations

import asyncio

from manager.lab.client import client_call
from manager.lab.netns import NetnsExecutor


def run_call(lab, **kw):
    with NetnsExecutor(lab.client_ns) as ex:
        return ex.call(asyncio.run, client_call(lab.signaling_url, **kw))


def assert_untouched(rep) -> None:
    """No renegotiation, no ICE restart, never left connected."""
    assert rep.error is None, rep.error
    assert rep.connection_states == ["connecting", "connected", "closed"], rep.connection_states
    first_done = min(i for i, s in enumerate(rep.ice_states) if s in ("completed", "connected"))
    assert all(s in ("completed", "connected") for s in rep.ice_states[first_done:-1]), rep.ice_states
    assert rep.signaling_states == ["have-local-offer", "stable", "closed"], rep.signaling_states
