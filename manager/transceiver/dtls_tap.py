"""What a migration must carry of a placed call's DTLS session, captured as
the call runs: the session's master secret and randoms (the record keys
follow from them, manager.protocol.dtls_record), the epoch and the highest
sequence number we sealed, and the replay window of the records we received
and authenticated; and the migration freeze of the data channels.

aiortc's DTLS transport hands OpenSSL whole datagrams and keeps no record
numbers, so a per-instance tap on its ICE transport (aiortc_hooks.
tap_dtls_datagrams) reads the record headers going out, and authenticates
the records coming in with the same keys OpenSSL uses: a forged header
cannot move the window a new owner continues.

While frozen, DTLS datagrams are dropped both ways: the SCTP association
stays exactly as exported (nothing it receives changes it, nothing it sends
reaches the client), and the client retransmits what it sent meanwhile to
the new owner.
"""

from __future__ import annotations

import logging

from aiortc.rtcdtlstransport import RTCDtlsTransport

from manager.protocol import dtls_record as dr
from manager.protocol.callstate import DtlsRecordState

from . import aiortc_hooks as hooks

logger = logging.getLogger(__name__)

DTLS_1_2 = "DTLSv1.2"


class DtlsTap:
    """Observes one DTLS transport (see the module docstring)."""

    def __init__(self) -> None:
        self._dtls: RTCDtlsTransport | None = None
        self.tx_epoch = 0
        self.tx_highest = -1  # highest sequence number seen going out in tx_epoch
        self.rx_epoch = 0
        self.window = dr.ReplayWindow()
        self._rx: dr.RecordProtection | None = None
        self._keys_failed: str | None = None
        self.frozen = False
        self.frozen_dropped = 0  # DTLS datagrams dropped while frozen, both ways
        self.rx_unauthenticated = 0  # records the tap could not authenticate (OpenSSL drops them too)

    def install(self, dtls: RTCDtlsTransport) -> None:
        self._dtls = dtls
        hooks.tap_dtls_datagrams(dtls, sending=self._sending, receiving=self._receiving)

    def freeze(self) -> None:
        self.frozen = True

    def unfreeze(self) -> None:
        self.frozen = False

    # -- the tap --------------------------------------------------------------------------

    def _sending(self, data: bytes) -> bool:
        try:
            records = dr.parse_records(data)
        except dr.DtlsRecordError:
            records = []  # OpenSSL's own output: cannot happen, and must not stop the call
        for r in records:
            if r.epoch > self.tx_epoch:
                self.tx_epoch, self.tx_highest = r.epoch, r.seq
            elif r.epoch == self.tx_epoch:
                self.tx_highest = max(self.tx_highest, r.seq)
        if self.frozen:
            self.frozen_dropped += 1
            return False
        return True

    def _receiving(self, data: bytes) -> bool:
        if self.frozen:
            self.frozen_dropped += 1
            return False
        try:
            records = dr.parse_records(data)
        except dr.DtlsRecordError:
            return True  # OpenSSL judges it (and drops it)
        for r in records:
            if r.epoch == 0 or r.type not in (dr.APPLICATION_DATA, dr.ALERT):
                continue  # the handshake's own records
            rx = self._rx_protection()
            if rx is None:
                continue
            if r.epoch != self.rx_epoch:
                if r.epoch < self.rx_epoch:
                    continue
                self.rx_epoch, self.window = r.epoch, dr.ReplayWindow()
            try:
                rx.open(r)
            except dr.DtlsRecordError:
                self.rx_unauthenticated += 1
                continue
            self.window.mark(r.seq)
        return True

    def _rx_protection(self) -> dr.RecordProtection | None:
        if self._rx is None and self._keys_failed is None and self._dtls is not None:
            secrets = hooks.dtls_session_secrets(self._dtls)
            if secrets is None:
                return None
            try:
                suite = dr.suite(secrets.cipher)
                keys = dr.KeyBlock.derive(suite, secrets.master_secret, secrets.client_random,
                                          secrets.server_random)
            except dr.DtlsRecordError as exc:
                self._keys_failed = str(exc)
                return None
            # We receive what the peer seals: the client's keys if we are the server.
            server = hooks.dtls_role(self._dtls) == "server"
            self._rx = dr.RecordProtection(suite, keys.client_key if server else keys.server_key,
                                           keys.client_iv if server else keys.server_iv)
        return self._rx

    # -- export ---------------------------------------------------------------------------

    def export(self, *, include_secrets: bool) -> tuple[DtlsRecordState | None, str | None]:
        """(the record layer's state, None), or (None, why it cannot be carried)."""
        if self._dtls is None:
            return None, "no DTLS transport"
        secrets = hooks.dtls_session_secrets(self._dtls)
        if secrets is None:
            return None, "the DTLS handshake has not finished"
        if secrets.version != DTLS_1_2:
            return None, (f"the session is {secrets.version}: only DTLS 1.2 record keys follow from "
                          "the master secret")
        try:
            dr.suite(secrets.cipher)
        except dr.DtlsRecordError as exc:
            return None, str(exc)
        if self._keys_failed is not None:
            return None, self._keys_failed
        if self.tx_epoch == 0:
            return None, "no record of the session's epoch went out yet"
        return DtlsRecordState(
            epoch=self.tx_epoch, tx_seq=self.tx_highest + 1,
            rx_highest=self.window.highest if self.rx_epoch == self.tx_epoch else -1,
            rx_window=self.window.bits if self.rx_epoch == self.tx_epoch else 0,
            client_random=secrets.client_random.hex(), server_random=secrets.server_random.hex(),
            master_secret=secrets.master_secret.hex() if include_secrets else None,
        ), None
