"""An engine call's ICE credentials, across ICE restarts (RFC 8445 section 9).

A restart gives the call new local credentials (the relay mints the ufrag,
which carries the routing hint; the password is made here) and the client's
new ones. Until the first check with the new credentials is answered, the
old ones stay valid: the client may not have the answer yet, and its media
keeps flowing on the old pair meanwhile. That first answered check completes
the restart: the new credentials become the call's, the old ones are retired
(their ufrag no longer routes to the call), and the call's own consent checks
use the client's new credentials from then on.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass


def new_password() -> str:
    """A local ICE password: 24 ice-chars, 144 random bits (RFC 8445 asks for >= 128)."""
    return base64.b64encode(os.urandom(18)).decode("ascii")  # 18 bytes: no padding, only ice-chars


@dataclass(frozen=True)
class Credentials:
    """One generation of a call's ICE credentials, both sides."""

    local_ufrag: str
    local_pwd: str
    remote_ufrag: str
    remote_pwd: str

    @property
    def inbound_username(self) -> str:
        """What the client's checks carry in USERNAME (RFC 8445 section 7.2.2)."""
        return f"{self.local_ufrag}:{self.remote_ufrag}"

    @property
    def outbound_username(self) -> str:
        """What our consent checks carry."""
        return f"{self.remote_ufrag}:{self.local_ufrag}"


class IceCredentials:
    """The current credentials and, while a restart is under way, the new ones."""

    def __init__(self, current: Credentials) -> None:
        self.current = current
        self.pending: Credentials | None = None
        self.restarts = 0  # completed

    @property
    def latest(self) -> Credentials:
        """What the client uses from the restart's answer on (what a migration carries)."""
        return self.pending or self.current

    def for_request(self, username: object) -> Credentials | None:
        """The generation a check's USERNAME names, or None (not this call's)."""
        for creds in (self.current, self.pending):
            if creds is not None and username == creds.inbound_username:
                return creds
        return None

    def begin(self, new: Credentials) -> Credentials | None:
        """Start a restart; returns the earlier restart's credentials it replaces, if one was pending."""
        replaced, self.pending = self.pending, new
        return replaced

    def complete(self) -> Credentials:
        """The pending credentials answered a check: they become current. Returns the retired ones."""
        assert self.pending is not None
        retired, self.current, self.pending = self.current, self.pending, None
        self.restarts += 1
        return retired
