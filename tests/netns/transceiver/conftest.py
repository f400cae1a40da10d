"""Fixtures of the loopback transceiver tests: the client pinned to loopback, RFC 7675 timing shrunk."""

import aioice.ice
import pytest


@pytest.fixture(autouse=True)
def loopback_client(monkeypatch: pytest.MonkeyPatch) -> None:
    # The aiortc *client* gathers host candidates from the interfaces (loopback
    # excluded); pin it to 127.0.0.1 so the test needs no network. The
    # transceiver does not use this function (it gathers on its shared socket).
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


@pytest.fixture
def fast_consent(monkeypatch: pytest.MonkeyPatch) -> None:
    # RFC 7675 timing shrunk (aioice reads these module globals at run time):
    # the client checks every ~0.5 s and gives up after 3 unanswered checks
    # (~0.5 s each), i.e. within ~3 s if nobody answers after the switch.
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.5)
    monkeypatch.setattr(aioice.ice, "CONSENT_FAILURES", 3)
