"""What a migration must carry of a call placed here, captured from aiortc's
DTLS transport as it runs: the SRTP keys, and per-SSRC RTP/RTCP counters; and
the migration freeze of outgoing media."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiortc.rtcdtlstransport import SRTP_PROFILES, RTCDtlsTransport
from aiortc.rtp import is_rtcp

from manager.protocol import rtp_header
from manager.protocol.callstate import LastSenderReport, RtcpState, RtpState, SrtpState

from . import aiortc_hooks as hooks
from .rtp_streams import RtpStreamState


@dataclass
class SrtpKeys:
    profile: str  # OpenSSL name, e.g. "SRTP_AEAD_AES_128_GCM"
    keying_material: bytes  # RFC 5764 EXTRACTOR-dtls_srtp output
    tx_key: bytes  # master key || master salt we protect with
    rx_key: bytes  # master key || master salt we unprotect with


class MediaTap:
    """Observes one DTLS transport to capture what a migration must carry.

    aiortc exposes none of this, so per-instance wrappers are installed on the
    call's :class:`RTCDtlsTransport` (aiortc_hooks.tap_dtls; only this call is
    affected):

    * ``_setup_srtp``: aiortc derives the SRTP master keys there right after the
      handshake and keeps them only inside libsrtp sessions. After it ran we ask
      the same OpenSSL connection for the same exporter output
      (``export_keying_material``, deterministic for a session) and split it
      with aiortc's own profile table and role rule, so the keys are exactly
      the ones the sessions hold.
    * ``_send_rtp``: plaintext RTP/RTCP right before protection: tx SSRC,
      sequence, timestamp, ROC, packets and payload octets, SRTCP index.
    * ``_handle_rtp_data`` / ``_handle_rtcp_data``: plaintext after
      unprotection: the same for rx.

    The ``_send_rtp`` wrapper also implements the migration *freeze*: while
    frozen, outgoing RTP/RTCP is dropped before protection (so neither a
    sequence number the client sees nor an SRTCP index is used up), and
    :meth:`unfreeze` renumbers the packets that follow so the client sees no
    sequence gap (only a timestamp jump, like a pause in speech).
    """

    def __init__(self) -> None:
        self.srtp: SrtpKeys | None = None
        self.dtls_version: str | None = None
        self.dtls_cipher: str | None = None
        self.tx: dict[int, RtpStreamState] = {}
        self.rx: dict[int, RtpStreamState] = {}
        self.tx_rtcp: Counter[int] = Counter()  # per sender SSRC = next SRTCP index
        self.rx_rtcp: Counter[int] = Counter()
        self.frozen_at: float | None = None  # wall clock of the freeze (for the new owner)
        self.frozen_monotonic: float | None = None
        self.frozen_dropped = 0  # RTP + RTCP packets not sent while frozen
        self._seq_shift: Counter[int] = Counter()  # per tx SSRC: RTP packets dropped frozen

    @property
    def frozen(self) -> bool:
        return self.frozen_at is not None

    def freeze(self) -> None:
        if self.frozen_at is None:
            self.frozen_at, self.frozen_monotonic = time.time(), time.monotonic()

    def unfreeze(self) -> None:
        self.frozen_at = self.frozen_monotonic = None

    def install(self, dtls: RTCDtlsTransport) -> None:
        def after_srtp_setup() -> None:
            if hooks.dtls_srtp_ready(dtls) and hooks.dtls_ssl(dtls) is not None:
                self._capture_keys(dtls)

        async def send_rtp(data: bytes, send: Callable[[bytes], Awaitable[None]]) -> None:
            if self.frozen_at is not None:
                self._drop_frozen(data)
                return
            data = self._renumber(data)
            await send(data)  # raises if not connected: nothing was protected
            self._observe(data, self.tx, self.tx_rtcp)

        def received(data: bytes) -> None:
            self._observe(data, self.rx, self.rx_rtcp)

        hooks.tap_dtls(dtls, after_srtp_setup=after_srtp_setup, send_rtp=send_rtp, received=received)

    def _capture_keys(self, dtls: RTCDtlsTransport) -> None:
        ssl = hooks.dtls_ssl(dtls)
        assert ssl is not None
        name = ssl.get_selected_srtp_profile()
        profile = next((p for p in SRTP_PROFILES if p.openssl_profile == name), None)
        if profile is None:
            return
        material = ssl.export_keying_material(
            b"EXTRACTOR-dtls_srtp", 2 * (profile.key_length + profile.salt_length)
        )
        # RFC 5764 4.2: the client's keys come first; aiortc's role rule.
        tx_idx, rx_idx = (1, 0) if hooks.dtls_role(dtls) == "server" else (0, 1)
        self.srtp = SrtpKeys(
            profile=name.decode(),
            keying_material=bytes(material),
            tx_key=profile.get_key_and_salt(material, tx_idx),
            rx_key=profile.get_key_and_salt(material, rx_idx),
        )
        self.dtls_version = ssl.get_protocol_version_name()
        self.dtls_cipher = ssl.get_cipher_name()

    def _drop_frozen(self, data: bytes) -> None:
        self.frozen_dropped += 1
        if len(data) >= 12 and not is_rtcp(data):
            self._seq_shift[int.from_bytes(data[8:12], "big")] += 1

    def _renumber(self, data: bytes) -> bytes:
        # aiortc's sender numbered the packets dropped while frozen too; close
        # that gap. (Audio gets no NACK retransmissions from aiortc, whose
        # history is keyed by its own numbers.)
        if not self._seq_shift or len(data) < 12 or is_rtcp(data):
            return data
        shift = self._seq_shift.get(int.from_bytes(data[8:12], "big"), 0)
        if not shift:
            return data
        seq = (int.from_bytes(data[2:4], "big") - shift) & 0xFFFF
        return data[:2] + seq.to_bytes(2, "big") + data[4:]

    @staticmethod
    def _observe(data: bytes, streams: dict[int, RtpStreamState], rtcp: Counter[int]) -> None:
        if len(data) < 12:
            return
        if is_rtcp(data):
            rtcp[int.from_bytes(data[4:8], "big")] += 1
            return
        header = rtp_header.parse(data)
        if header is None:
            return
        stream = streams.get(header.ssrc)
        if stream is None:
            stream = streams[header.ssrc] = RtpStreamState(ssrc=header.ssrc, payload_type=header.payload_type)
        # The payload octets too: an SR counts them (a new owner's go on from these).
        stream.update(header.sequence, header.timestamp, header.payload_type, len(header.payload))

    def srtp_state(self, include_secrets: bool) -> SrtpState | None:
        if self.srtp is None:
            return None
        if not include_secrets:
            return SrtpState(profile=self.srtp.profile)
        return SrtpState(profile=self.srtp.profile, keying_material=self.srtp.keying_material.hex(),
                         tx_key=self.srtp.tx_key.hex(), rx_key=self.srtp.rx_key.hex())

    def rtp_state(self) -> RtpState:
        return RtpState(tx={str(s): st.to_model() for s, st in self.tx.items()},
                        rx={str(s): st.to_model() for s, st in self.rx.items()})

    def rtcp_state(self, last_sr: dict[str, LastSenderReport]) -> RtcpState:
        """The SRTCP counts, and `last_sr`: the client's last sender reports (the call's CallQuality)."""
        return RtcpState(tx_srtcp_index={str(s): n for s, n in self.tx_rtcp.items()},
                         rx_packets={str(s): n for s, n in self.rx_rtcp.items()}, rx_last_sr=last_sr)
