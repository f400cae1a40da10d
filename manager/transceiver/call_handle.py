"""What the transceiver does with a call, whatever kind it is: a call placed
here (WebRtcCall, on aiortc) or a call imported by a migration
(ImportedCall). The transceiver's call table holds CallHandles and never asks
which kind it has."""

from __future__ import annotations

import abc
import weakref
from collections.abc import Awaitable
from typing import Any

from manager.protocol.callstate import CallState
from manager.protocol.tasks import TaskSet

from .errors import Unsupported


class CallHandle(abc.ABC):
    #: The call's views of the shared ICE sockets (ice_mux.CallPort), one per bind address.
    ports: list[Any]

    """One live call on this transceiver."""

    conn_id: int
    ufrag: str
    created_at: float
    connected_at: float | None
    quality: Any  # rtcp_stats.CallQuality: the call's RTCP figures
    ending: bool = False

    def __init__(self) -> None:
        # A weak reference: a closure over self would make every call a
        # reference cycle, left for the cyclic collector when it ends.
        me = weakref.ref(self)
        self._tasks = TaskSet(lambda: f"call {getattr(me(), 'conn_id', '?')}")

    def _spawn(self, coro: Awaitable[None]) -> None:
        """Run `coro` for this call, kept until done."""
        self._tasks.spawn(coro)

    def _cancel_tasks(self) -> None:
        """Cancel the call's tasks, except the one running this (it may be ending the call)."""
        self._tasks.cancel()

    @property
    @abc.abstractmethod
    def frozen_at(self) -> float | None:
        """Wall clock of the migration freeze, None while sending."""

    @abc.abstractmethod
    def check_exportable(self) -> None:
        """Raise CallStateConflict if the call cannot be exported now."""

    @abc.abstractmethod
    def export_state(self, transceiver_id: int, owner: dict[str, Any], *, include_secrets: bool) -> CallState:
        """The call's state in the one schema (manager.protocol.callstate)."""

    @abc.abstractmethod
    def freeze(self) -> None:
        """Stop sending media (keep receiving and answering ICE) for a migration."""

    @abc.abstractmethod
    def unfreeze(self) -> None:
        """Resume sending after a failed migration (no-op when not frozen)."""

    @abc.abstractmethod
    def activate(self, by: str) -> None:
        """The relay flipped ownership to us: start sending (imported calls);
        CallStateConflict for a call that sends already."""

    @abc.abstractmethod
    async def deliver_srtp(self, data: bytes) -> bool:
        """Take an SRTP/SRTCP packet the relay holds from a client's new address
        (a NAT rebinding): True if it authenticates with the call's keys, and
        then it is the call's media like any other."""

    @abc.abstractmethod
    def repoint(self, old: tuple[str, int], new: tuple[str, int]) -> bool:
        """Send to `new` what went to `old` (the client's path moved to
        another relay's flow source); False if the call does not send to `old`."""

    @abc.abstractmethod
    def replies_to(self) -> tuple[str, int] | None:
        """Where the call's replies go now (its selected remote address), if anywhere."""

    @abc.abstractmethod
    async def close(self, *, quiet: bool) -> None:
        """End the call; `quiet`: send the client nothing (it moved away)."""

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """Live state for the control API, without secrets."""

    def restart_ice(self, ufrag: str, remote_ufrag: str, remote_pwd: str) -> str:
        """New local credentials (`ufrag` from the relay, a new password, returned)
        and the client's new ones, for an ICE restart; CallStateConflict if the
        call cannot restart now, Unsupported if it never can."""
        # aioice (a call kept on aiortc, e.g. --no-media-engine) has no ICE restart.
        raise Unsupported(f"call {self.conn_id} runs on aiortc, whose ICE agent (aioice) cannot restart ICE; "
                                "only calls on the media engine can")

    def all_ufrags(self) -> set[str]:
        """Every local ufrag the call has had (freed when it ends)."""
        return {self.ufrag}

    def migration_info(self) -> dict[str, Any] | None:
        """What /health shows of an imported call's migration, None for others."""
        return None
