"""Live migration, the transceiver's side: export (and freeze) a call, the
freeze lease, import a call another transceiver exported, activate and
release. A mixin of :class:`~manager.transceiver.transceiver.Transceiver`:
it works on the transceiver's call table and checks (docs/migration.md)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from manager.observability import tracing
from manager.observability.logs import bind_call
from manager.protocol.callstate import parse_call_state

from .agent import AgentSession
from .call_handle import CallHandle
from .errors import CallStateConflict, CapacityExceeded, DuplicateCall, InvalidRequest
from .import_plan import ImportPlan
from .rtp_streams import migration_blocker

logger = logging.getLogger(__name__)
RELEASED = "released after migration"  # the reason a call that moved away ends with here
U32_MAX = 0xFFFFFFFF


def check_conn_id(conn_id: object) -> int:
    # 0 is the relay registry's "no call": it never names one.
    if isinstance(conn_id, bool) or not isinstance(conn_id, int) or not 1 <= conn_id <= U32_MAX:
        raise InvalidRequest(f"conn_id must be an integer in 1..{U32_MAX}")
    return conn_id


class CallMigration:
    """Export, freeze lease, import, activate and release (mixed into Transceiver).

    It uses the transceiver's call table (``_calls``, ``_reserved``,
    ``_ufrags``), its checks (``_get``, ``_check_hint``, ``_check_room``),
    its engine (``_engine_call``) and its end of a call (``_end_call``)."""

    _calls: dict[int, CallHandle]
    _leases: dict[int, asyncio.Task]
    freeze_lease: float
    leases_expired: int

    def export_call(self, conn_id: int, *, freeze: bool = False) -> dict[str, Any]:
        """State for a new owner (with secrets); with ``freeze``, stop sending RTP/RTCP now.

        A frozen call keeps receiving and answering ICE checks; its state
        carries the last sequence number/timestamp sent and the freeze time.
        Raises :class:`UnknownCall`, or :class:`CallStateConflict` when the
        call is not connected or cannot be migrated (rtp_streams.migration_blocker).
        """
        call = self._get(conn_id)
        call.check_exportable()
        state = call.export_state(self.id, self.owner, include_secrets=True)
        problem = migration_blocker(state.srtp, state.rtp)
        if problem is not None:
            raise CallStateConflict(f"call {conn_id} cannot be migrated: {problem}")
        if freeze:
            with tracing.span("transceiver.freeze", conn_id=conn_id, transceiver_id=self.id):
                call.freeze()
            self._start_lease(call)
            logger.info("call %d frozen for migration (lease %g s)", conn_id, self.freeze_lease)
        return self.export_call_state(conn_id)

    def _start_lease(self, call: CallHandle) -> None:
        frozen_at = call.frozen_at

        async def expire() -> None:
            await asyncio.sleep(self.freeze_lease)
            if self._calls.get(call.conn_id) is call and call.frozen_at == frozen_at:
                call.unfreeze()
                self.leases_expired += 1
                logger.warning("call %d: migration freeze lease expired after %g s; sending again",
                               call.conn_id, self.freeze_lease)

        self._stop_lease(call.conn_id)
        task = asyncio.get_running_loop().create_task(expire())
        self._leases[call.conn_id] = task
        task.add_done_callback(lambda t, c=call.conn_id: self._leases.pop(c, None) if self._leases.get(c) is t
                               else None)

    def _stop_lease(self, conn_id: int) -> None:
        task = self._leases.pop(conn_id, None)
        if task is not None:
            task.cancel()

    def unfreeze_call(self, conn_id: int) -> None:
        """Resume sending after a failed migration (no-op if not frozen)."""
        self._get(conn_id).unfreeze()
        self._stop_lease(conn_id)
        logger.info("call %d unfrozen", conn_id)

    async def release_call(self, conn_id: int) -> None:
        """Drop a call that now belongs to another transceiver, sending nothing to the client."""
        await self._end_call(self._get(conn_id), RELEASED, quiet=True)

    async def import_call(self, conn_id: int, state: Any) -> dict[str, Any]:
        """Take over a call exported by another transceiver; returns the owner address.

        Afterwards the call answers the client's consent checks and decrypts
        its media, but sends no media until :meth:`activate_call` or the first
        authenticated packet from the client. Raises :class:`InvalidRequest`
        (bad state), :class:`DuplicateCall` or :class:`CapacityExceeded`.
        """
        check_conn_id(conn_id)
        bind_call(conn_id=conn_id)
        if self._stopping or self.draining:
            raise CapacityExceeded(f"transceiver is {'stopping' if self._stopping else 'draining'}")
        await self.start()
        if conn_id in self._calls or conn_id in self._reserved:
            raise DuplicateCall(f"conn_id {conn_id} already has a call")
        try:
            plan = ImportPlan.from_state(parse_call_state(state))
        except ValueError as exc:
            raise InvalidRequest(f"state rejected: {exc}") from None
        if plan.state.conn_id != conn_id:
            raise InvalidRequest(f"state is for conn_id {plan.state.conn_id}, not {conn_id}")
        # The call keeps the ufrag minted for its first owner: its MAC and
        # connection id must hold, the transceiver id names the first owner.
        self._check_hint(plan.ice.local_ufrag, conn_id, placed_here=False)
        self._check_room(conn_id, plan.ice.local_ufrag)

        session = AgentSession(conn_id)
        try:
            session.import_state(plan.state.agent.session)
        except ValueError as exc:
            session.close()
            raise InvalidRequest(f"state rejected: {exc}") from None
        agent = self.agent_factory()
        try:
            agent.import_state(plan.state.agent.state)
        except Exception as exc:
            session.close()
            raise InvalidRequest(f"agent state rejected: {exc}") from None

        try:
            call = self._engine_call(plan, session, agent)
        except ValueError as exc:
            session.close()
            raise InvalidRequest(f"state rejected: {exc}") from None
        self._calls[conn_id] = call
        self._ufrags.add(call.ufrag)
        call.start()
        logger.info("call %d imported (from transceiver %s)", conn_id, plan.state.transceiver_id)
        return self.owner

    def activate_call(self, conn_id: int) -> None:
        """The relay flipped ownership: an imported call starts sending (idempotent)."""
        self._get(conn_id).activate("api")

    def export_call_state(self, conn_id: int, *, include_secrets: bool = True) -> dict[str, Any]:
        """JSON-serialisable state a new owner needs to take the call over
        (manager.protocol.callstate); ``include_secrets=False`` leaves the
        ICE passwords, exporter output and SRTP keys out."""
        return self._get(conn_id).export_state(self.id, self.owner, include_secrets=include_secrets).to_json()
