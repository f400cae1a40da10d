"""Per-SSRC RTP stream state, and which calls a fresh libsrtp session can take over."""

from __future__ import annotations

from dataclasses import dataclass

from manager.protocol.callstate import RtpState, RtpStream, SrtpState

U32_MAX = 0xFFFFFFFF
#: A client stream this close to 65535 when exported may wrap before its
#: first packet reaches the new owner (about 10 s at 50 packets/s): the new
#: owner also tries the next rollover counter for it (imported_call).
WRAP_MARGIN = 500


@dataclass
class RtpStreamState:
    """What a new owner needs to continue (tx) or accept (rx) one SSRC's RTP stream."""

    ssrc: int
    payload_type: int
    seq: int = 0  # highest sequence number seen
    timestamp: int = 0  # RTP timestamp of that packet
    roc: int = 0  # SRTP rollover counter (RFC 3711 3.3.1), counts seq wraps
    packets: int = 0
    octets: int = 0  # payload octets (a sent stream's: the sender octet count of our SRs)

    def is_newer(self, seq: int) -> bool:
        """Whether ``seq`` is after the highest one seen (modulo 2^16)."""
        return self.packets == 0 or 0 < ((seq - self.seq) & 0xFFFF) < 0x8000

    def update(self, seq: int, timestamp: int, payload_type: int, octets: int = 0) -> None:
        if self.packets == 0:
            self.seq, self.timestamp = seq, timestamp
        elif self.is_newer(seq):  # else duplicate/reordered
            if seq < self.seq:
                self.roc = (self.roc + 1) & U32_MAX
            self.seq, self.timestamp = seq, timestamp
        self.payload_type = payload_type
        self.packets += 1
        self.octets += octets

    def to_model(self) -> RtpStream:
        return RtpStream(ssrc=self.ssrc, payload_type=self.payload_type, seq=self.seq,
                         timestamp=self.timestamp, roc=self.roc, packets=self.packets, octets=self.octets)

    @classmethod
    def from_model(cls, m: RtpStream) -> RtpStreamState:
        return cls(ssrc=m.ssrc, payload_type=m.payload_type, seq=m.seq, timestamp=m.timestamp,
                   roc=m.roc, packets=m.packets, octets=m.octets)


def migration_blocker(srtp: SrtpState | None, rtp: RtpState) -> str | None:
    """Why an exported call cannot move to a fresh libsrtp session, or None.

    Wrapped sequence numbers are no reason: each SSRC's rollover counter is
    exported and the new owner's libsrtp streams start there
    (aiortc_hooks.srtp_session)."""
    if srtp is None or srtp.tx_key is None:
        return "the call has no SRTP keys yet (DTLS not finished)"
    return None
