"""What an import needs from an exported call (manager.protocol.callstate),
checked and converted once before anything is set up: keys as bytes, codecs as
aiortc parameters, stream states; a ValueError says why this transceiver
cannot take a valid state over."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiortc.rtcdtlstransport import SRTP_PROFILES
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from manager.protocol import dtls_record
from manager.protocol.callstate import CallState, Candidate, IceState

from .rtp_streams import RtpStreamState, migration_blocker


@dataclass
class ImportPlan:
    """What an imported call needs from a validated CallState, in the types it
    uses (keys as bytes, codecs as aiortc parameters); ValueError when the
    state is valid but this transceiver cannot take it over."""

    state: CallState
    libsrtp_profile: int
    tx_key: bytes
    rx_key: bytes
    keying_material: bytes
    local_ssrc: int
    mid: str | None
    codecs: list[RTCRtpCodecParameters]  # audio, the first is what we send (aiortc's rule)
    header_extensions: list[dict[str, Any]]
    tx: RtpStreamState | None
    rx: dict[int, RtpStreamState]
    frozen_at: float

    @property
    def ice(self) -> IceState:
        return self.state.ice

    @property
    def remote_candidate(self) -> Candidate:
        assert self.state.ice.selected_pair is not None
        return self.state.ice.selected_pair.remote

    @classmethod
    def from_state(cls, state: CallState) -> ImportPlan:
        ice = state.ice
        if ice.remote_ufrag is None:
            raise ValueError("ice.remote_ufrag: missing (the call has no remote ICE parameters)")
        if ice.local_pwd is None or ice.remote_pwd is None:
            raise ValueError("ice.local_pwd/remote_pwd: missing (an export without secrets cannot be imported)")
        if ice.selected_pair is None:
            raise ValueError("ice.selected_pair: missing (the call has no nominated pair)")
        if state.srtp is None:
            raise ValueError("srtp: missing (DTLS not finished)")
        for name in ("tx_key", "rx_key", "keying_material"):
            if getattr(state.srtp, name) is None:
                raise ValueError(f"srtp.{name}: missing (an export without secrets cannot be imported)")
        profile = next((p for p in SRTP_PROFILES if p.openssl_profile.decode() == state.srtp.profile), None)
        if profile is None:
            raise ValueError(f"srtp.profile: {state.srtp.profile!r} is not supported")
        tx_key, rx_key = bytes.fromhex(state.srtp.tx_key or ""), bytes.fromhex(state.srtp.rx_key or "")
        for name, key in (("tx_key", tx_key), ("rx_key", rx_key)):
            if len(key) != profile.key_length + profile.salt_length:
                raise ValueError(f"srtp.{name}: wrong length for {state.srtp.profile}")
        audio = state.audio()
        if audio is None:
            raise ValueError("media: no audio section")
        if audio.local_ssrc is None:
            raise ValueError("media[audio].local_ssrc: missing")
        if not audio.codecs:
            raise ValueError("media[audio].codecs: empty")
        codecs = [RTCRtpCodecParameters(mimeType=c.mime_type, clockRate=c.clock_rate, channels=c.channels,
                                        payloadType=c.payload_type, parameters=dict(c.parameters))
                  for c in audio.codecs]
        if codecs[0].mimeType.lower() != "audio/opus" or codecs[0].clockRate != 48000:
            raise ValueError(f"media[audio].codecs: the media engine carries Opus, not {codecs[0].mimeType}")
        problem = migration_blocker(state.srtp, state.rtp)
        if problem is not None:
            raise ValueError(problem)
        if state.sctp is not None and state.sctp.association is not None:
            record = state.dtls.record
            if record is None or state.dtls.role is None or state.dtls.cipher is None:
                raise ValueError("dtls.record: missing (the SCTP association needs the DTLS session's record state)")
            if record.master_secret is None:
                raise ValueError("dtls.record.master_secret: missing (an export without secrets cannot be imported)")
            try:
                dtls_record.suite(state.dtls.cipher)
            except dtls_record.DtlsRecordError as exc:
                raise ValueError(f"dtls.cipher: {exc}") from None
        if state.frozen is None:
            # Without the freeze the old owner may still be sending: our packets
            # would reuse its sequence numbers.
            raise ValueError('state was exported without freeze (export with {"freeze": true})')
        tx = state.rtp.tx.get(str(audio.local_ssrc))
        return cls(
            state=state, libsrtp_profile=profile.libsrtp_profile, tx_key=tx_key, rx_key=rx_key,
            keying_material=bytes.fromhex(state.srtp.keying_material or ""), local_ssrc=audio.local_ssrc,
            mid=audio.mid, codecs=codecs,
            header_extensions=[{"id": x.id, "uri": x.uri} for x in audio.header_extensions],
            tx=None if tx is None else RtpStreamState.from_model(tx),
            rx={st.ssrc: RtpStreamState.from_model(st) for st in state.rtp.rx.values()},
            frozen_at=state.frozen.at,
        )
