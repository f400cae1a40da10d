"""The data channels of an imported call: the DTLS session and the SCTP
association continued at a new owner, with no handshake and nothing the
client can notice.

* **DTLS**: the record keys are derived from the exported master secret and
  randoms (RFC 5246 6.3, manager.protocol.dtls_record). We seal from the
  exported next sequence number, above any the old owner sealed, and open
  the client's records behind the exported replay window. Only application
  data and alerts are expected in the session's epoch; anything else is
  dropped and counted.
* **SCTP**: a fresh aiortc RTCSctpTransport over a DtlsStandIn, given the
  exported association (aiortc_hooks.sctp_restore): tags, TSNs, stream
  sequence numbers, the peer's window, chunks outstanding, queued and in
  reassembly, and the open channels. It starts (:meth:`activate`) with a
  SACK when one is owed and a retransmission of what was in flight, since
  the old owner's last transmissions may have been dropped by its freeze.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiortc.rtcdatachannel import RTCDataChannel
from aiortc.rtcsctptransport import RTCSctpTransport

from manager.protocol import dtls_record as dr
from manager.protocol.callstate import DtlsRecordState, SctpAssociation, SctpState

from . import aiortc_hooks as hooks

logger = logging.getLogger(__name__)

ALERT_WARNING, ALERT_FATAL = 1, 2
CLOSE_NOTIFY = 0
MAX_INBOX = 1000  # SCTP packets authenticated but not yet handled (the peer's window bounds it anyway)


@dataclass
class DataStats:
    rx_records: int = 0  # authenticated application data
    rx_replayed: int = 0  # outside or already in the replay window
    rx_unauthenticated: int = 0
    rx_unexpected: int = 0  # handshake records, other epochs, malformed datagrams
    rx_inbox_full: int = 0
    tx_records: int = 0
    tx_held: int = 0  # SCTP packets not sent: not active yet, or frozen


class ImportedDataChannels:
    """DTLS record layer + restored SCTP association of one imported call."""

    def __init__(self, *, role: str, cipher: str, record: DtlsRecordState, sctp: SctpState,
                 send: Callable[[bytes], None], on_closed: Callable[[str], Awaitable[None]]) -> None:
        """ValueError if the state cannot be continued (suite, secrets, association)."""
        if record.master_secret is None:
            raise ValueError("dtls.record.master_secret: missing (an export without secrets cannot be imported)")
        if sctp.association is None:
            raise ValueError("sctp.association: missing")
        try:
            suite = dr.suite(cipher)
            keys = dr.KeyBlock.derive(suite, bytes.fromhex(record.master_secret), bytes.fromhex(record.client_random),
                                      bytes.fromhex(record.server_random))
        except dr.DtlsRecordError as exc:
            raise ValueError(f"dtls.record: {exc}") from None
        server = role == "server"
        self._tx = dr.RecordProtection(suite, keys.server_key if server else keys.client_key,
                                       keys.server_iv if server else keys.client_iv)
        self._rx = dr.RecordProtection(suite, keys.client_key if server else keys.server_key,
                                       keys.client_iv if server else keys.server_iv)
        self.role = role
        self.cipher = cipher
        self.epoch = record.epoch
        self.tx_seq = record.tx_seq
        self.window = dr.ReplayWindow(record.rx_highest, bits=record.rx_window)
        self.client_random, self.server_random = record.client_random, record.server_random
        self._master_secret = record.master_secret
        self._send_datagram = send
        self._on_closed = on_closed
        self.stats = DataStats()
        self.active = False
        self.frozen = False
        self.closed = False
        self.peer_closed = False  # the client's close_notify or fatal alert came
        self._inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._resume: asyncio.Future[None] | None = None
        self.transport = hooks.DtlsStandIn(role, self._send_sctp)
        self.sctp = RTCSctpTransport(self.transport, port=sctp.port)  # type: ignore[arg-type]
        self.sctp.mid = sctp.mid
        try:
            self.channels: list[RTCDataChannel] = hooks.sctp_restore(self.sctp, sctp.association)
        except (ValueError, KeyError) as exc:
            raise ValueError(f"sctp.association: {exc}") from None

    # -- lifecycle ------------------------------------------------------------------------

    async def activate(self) -> None:
        """The call's packets now reach us: start the association."""
        if self.active or self.closed:
            return
        self.active = True
        self._task = asyncio.ensure_future(self._handle_inbox())
        await hooks.sctp_resume(self.sctp)

    def freeze(self) -> None:
        self.frozen = True

    def unfreeze(self) -> None:
        self.frozen = False
        if self.active and not self.closed:
            # What SCTP sent while frozen was held: send it now, not at its next timeout.
            self._resume = asyncio.ensure_future(hooks.sctp_resume(self.sctp))

    async def close(self, *, quiet: bool) -> None:
        """Stop; unless `quiet`, tell the client (SCTP ABORT, then DTLS close_notify)."""
        if self.closed:
            return
        if not quiet and self.active and not self.frozen and not self.peer_closed:
            await hooks.sctp_abort(self.sctp)
            self._seal_and_send(dr.ALERT, bytes([ALERT_WARNING, CLOSE_NOTIFY]))
        self.closed = True
        if self._task is not None:
            self._task.cancel()
        try:
            # Closed first, so its own ABORT is held: this stops the timers and closes the channels.
            await self.sctp.stop()
        except Exception:
            logger.debug("stopping a restored SCTP association", exc_info=True)

    # -- inbound --------------------------------------------------------------------------

    def datagram_received(self, data: bytes) -> bool:
        """One DTLS datagram from the client; True if a record in it
        authenticated (proof that the client's packets reach us)."""
        if self.closed:
            return False
        try:
            records = dr.parse_records(data)
        except dr.DtlsRecordError:
            self.stats.rx_unexpected += 1
            return False
        authentic = False
        for r in records:
            if r.epoch != self.epoch or r.type not in (dr.APPLICATION_DATA, dr.ALERT):
                self.stats.rx_unexpected += 1
                continue
            if not self.window.check(r.seq):
                self.stats.rx_replayed += 1
                continue
            try:
                plain = self._rx.open(r)
            except dr.DtlsRecordError:
                self.stats.rx_unauthenticated += 1
                continue
            self.window.mark(r.seq)
            authentic = True
            # Taken in while frozen too, as aiortc's call does: what SCTP answers
            # is held until an unfreeze; after a migration the next owner gets
            # the data again by retransmission (this association never acked it).
            if r.type == dr.ALERT:
                self._alert(plain)
            elif self._inbox.qsize() >= MAX_INBOX:
                self.stats.rx_inbox_full += 1
            else:
                self.stats.rx_records += 1
                self._inbox.put_nowait(plain)
        return authentic

    def _alert(self, plain: bytes) -> None:
        level, description = (plain[0], plain[1]) if len(plain) >= 2 else (ALERT_FATAL, -1)
        if (description == CLOSE_NOTIFY or level == ALERT_FATAL) and not self.peer_closed:
            self.peer_closed = True
            reason = "client hung up" if description == CLOSE_NOTIFY else f"DTLS alert {description} from the client"
            asyncio.ensure_future(self._on_closed(reason))

    async def _handle_inbox(self) -> None:
        # One consumer: SCTP sees the packets in the order they arrived.
        while True:
            data = await self._inbox.get()
            try:
                await hooks.sctp_receive(self.sctp, data)
            except Exception:
                logger.exception("restored SCTP association: a packet failed")

    # -- outbound -------------------------------------------------------------------------

    async def _send_sctp(self, data: bytes) -> None:
        if not self.active or self.frozen or self.closed or self.peer_closed:
            self.stats.tx_held += 1  # SCTP retransmits it, at the next owner if need be
            return
        self._seal_and_send(dr.APPLICATION_DATA, data)

    def _seal_and_send(self, rtype: int, data: bytes) -> None:
        record = self._tx.seal(rtype, self.epoch, self.tx_seq, data)
        self.tx_seq += 1
        self.stats.tx_records += 1
        self._send_datagram(record.serialise())

    # -- export ---------------------------------------------------------------------------

    def export(self, *, include_secrets: bool) -> tuple[DtlsRecordState, SctpAssociation | None, str | None]:
        """The record layer and the association as they stand now, for the next owner."""
        record = DtlsRecordState(
            epoch=self.epoch, tx_seq=self.tx_seq, rx_highest=self.window.highest, rx_window=self.window.bits,
            client_random=self.client_random, server_random=self.server_random,
            master_secret=self._master_secret if include_secrets else None)
        try:
            return record, hooks.sctp_export(self.sctp), None
        except ValueError as exc:
            return record, None, str(exc)

    def info(self) -> dict[str, object]:
        return {"active": self.active, "frozen": self.frozen, "closed": self.closed, "tx_seq": self.tx_seq,
                "rx_highest": self.window.highest, "channels": [c.id for c in self.channels], **vars(self.stats)}
