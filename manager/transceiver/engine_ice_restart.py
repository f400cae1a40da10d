"""ICE restart on an engine call (RFC 8445 9, RFC 9725's PATCH).

The relay mints the new ufrag (it carries the call's routing hint) and asks
the owner for a password; the new credentials route to the call beside the
current ones until the first check with them, which retires the old ones.
Media, DTLS, SRTP and the agent go on untouched.

A mixin of :class:`~manager.transceiver.imported_call.ImportedCall`: it uses
the call's ports, credentials (``ice``), check table and stats.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .errors import CallStateConflict, DuplicateCall
from .ice_credentials import Credentials, new_password

if TYPE_CHECKING:
    from .ice_credentials import IceCredentials
    from .ice_mux import CallPort

logger = logging.getLogger("manager.transceiver.imported_call")


class EngineIceRestart:
    """New ICE credentials for a live engine call."""

    conn_id: int
    ufrag: str
    ports: list[CallPort]
    ice: IceCredentials
    _frozen_at: float | None
    _ufrags_used: set[str]
    _checks: dict
    stats: Any  # MigrationStats

    def restart_ice(self, ufrag: str, remote_ufrag: str, remote_pwd: str) -> str:
        """New credentials beside the current ones: checks for `ufrag` (minted
        by the relay) now reach the call; returns the new local password.
        The media, DTLS and SRTP sessions and the agent go on untouched."""
        if self._frozen_at is not None:
            raise CallStateConflict(f"call {self.conn_id} is frozen for a migration; restart ICE after it")
        if ufrag in self._ufrags_used:
            raise DuplicateCall(f"ufrag {ufrag!r} was this call's already")
        new = Credentials(local_ufrag=ufrag, local_pwd=new_password(), remote_ufrag=remote_ufrag,
                          remote_pwd=remote_pwd)
        added: list[CallPort] = []
        try:
            for port in self.ports:
                port.mux.add_ufrag(ufrag, port)
                added.append(port)
        except DuplicateCall:
            for port in added:
                port.mux.remove_ufrag(ufrag, port)
            raise
        replaced = self.ice.begin(new)
        if replaced is not None:  # a restart that never completed: its ufrag routes nowhere now
            self._unroute(replaced.local_ufrag)
        self._ufrags_used.add(ufrag)
        self.stats.ice_restarts_asked += 1
        logger.info("call %d: ICE restart asked (ufrag %s)", self.conn_id, ufrag)
        return new.local_pwd

    def _restart_completed(self) -> None:
        retired = self.ice.complete()
        self._unroute(retired.local_ufrag)
        self.ufrag = self.ice.current.local_ufrag
        self._checks.clear()  # answers to checks with the old credentials no longer count
        logger.info("call %d: ICE restart completed (ufrag %s)", self.conn_id, self.ufrag)

    def _unroute(self, ufrag: str) -> None:
        for port in self.ports:
            port.mux.remove_ufrag(ufrag, port)

    def all_ufrags(self) -> set[str]:
        return set(self._ufrags_used)
