"""Hooks into aiortc's SCTP transport: the association exported and restored as a whole."""

from __future__ import annotations

import base64

from aiortc.rtcdatachannel import RTCDataChannel, RTCDataChannelParameters
from aiortc.rtcsctptransport import DataChunk, InboundStream, RTCSctpTransport

from manager.protocol.callstate import (
    SctpAssociation,
    SctpChannel,
    SctpChunk,
    SctpInboundStream,
    SctpQueued,
)

# -- SCTP association (aiortc RTCSctpTransport) ---------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _chunk_state(chunk: DataChunk) -> SctpChunk:
    return SctpChunk(
        tsn=chunk.tsn, stream_id=chunk.stream_id, stream_seq=chunk.stream_seq, protocol=chunk.protocol,
        flags=chunk.flags, user_data=_b64(chunk.user_data),
        sent_count=getattr(chunk, "_sent_count", 0), acked=getattr(chunk, "_acked", False),
        abandoned=getattr(chunk, "_abandoned", False), expiry=getattr(chunk, "_expiry", None),
        max_retransmits=getattr(chunk, "_max_retransmits", None))


def _chunk(state: SctpChunk, *, retransmit: bool) -> DataChunk:
    chunk = DataChunk(flags=state.flags)
    chunk.tsn, chunk.stream_id, chunk.stream_seq = state.tsn, state.stream_id, state.stream_seq
    chunk.protocol, chunk.user_data = state.protocol, base64.b64decode(state.user_data)
    # The sender's bookkeeping, as RTCSctpTransport._send sets it up.
    chunk._abandoned, chunk._acked = state.abandoned, state.acked
    chunk._book_size = len(chunk.user_data)
    chunk._expiry, chunk._max_retransmits = state.expiry, state.max_retransmits
    chunk._in_flight, chunk._misses, chunk._sent_time = False, 0, None  # no RTT sample from a moved chunk
    chunk._retransmit = retransmit
    chunk._sent_count = state.sent_count
    return chunk


def sctp_export(sctp: RTCSctpTransport) -> SctpAssociation:
    """An established association's whole state (ValueError naming what
    cannot be carried: not established, or a channel closing)."""
    if sctp._association_state != RTCSctpTransport.State.ESTABLISHED:
        raise ValueError(f"the SCTP association is {sctp._association_state.name}, not ESTABLISHED")
    if sctp._reconfig_request is not None or sctp._reconfig_queue or sctp._reconfig_deferred is not None:
        raise ValueError("a data channel is closing (SCTP stream reset in progress)")
    channels = []
    for stream_id, channel in sorted(sctp._data_channels.items()):
        if channel.readyState != "open":
            raise ValueError(f"data channel {stream_id} is {channel.readyState}, not open")
        channels.append(SctpChannel(id=stream_id, label=channel.label, protocol=channel.protocol,
                                    ordered=channel.ordered, max_packet_life_time=channel.maxPacketLifeTime,
                                    max_retransmits=channel.maxRetransmits, negotiated=channel.negotiated))
    queued = []
    for channel, protocol, user_data in sctp._data_channel_queue:
        if channel.id is None:
            raise ValueError("a data channel has no stream id yet")
        queued.append(SctpQueued(channel=channel.id, protocol=protocol, user_data=_b64(user_data)))
    return SctpAssociation(
        local_port=sctp._local_port, remote_port=sctp._remote_port,
        local_verification_tag=sctp._local_verification_tag,
        remote_verification_tag=sctp._remote_verification_tag,
        remote_max_message_size=sctp._remote_max_message_size,
        remote_partial_reliability=sctp._remote_partial_reliability,
        remote_extensions=list(sctp._remote_extensions), next_channel_id=sctp._data_channel_id,
        inbound_streams_count=sctp._inbound_streams_count, outbound_streams_count=sctp._outbound_streams_count,
        advertised_rwnd=max(0, sctp._advertised_rwnd), last_received_tsn=sctp._last_received_tsn,
        sack_misordered=sorted(sctp._sack_misordered), sack_duplicates=list(sctp._sack_duplicates),
        sack_needed=sctp._sack_needed,
        inbound=[SctpInboundStream(stream_id=sid, sequence_number=stream.sequence_number,
                                   reassembly=[_chunk_state(c) for c in stream.reassembly])
                 for sid, stream in sorted(sctp._inbound_streams.items())],
        local_tsn=sctp._local_tsn, last_sacked_tsn=sctp._last_sacked_tsn,
        advanced_peer_ack_tsn=sctp._advanced_peer_ack_tsn, cwnd=sctp._cwnd, ssthresh=sctp._ssthresh,
        partial_bytes_acked=sctp._partial_bytes_acked,
        outbound_stream_seq={str(k): v for k, v in sctp._outbound_stream_seq.items()},
        sent=[_chunk_state(c) for c in sctp._sent_queue], outbound=[_chunk_state(c) for c in sctp._outbound_queue],
        reconfig_request_seq=sctp._reconfig_request_seq, reconfig_response_seq=sctp._reconfig_response_seq,
        srtt=sctp._srtt, rttvar=sctp._rttvar, rto=sctp._rto,
        channels=channels, queued=queued,
    )


def sctp_restore(sctp: RTCSctpTransport, state: SctpAssociation) -> list[RTCDataChannel]:
    """Make a fresh RTCSctpTransport (on a DtlsStandIn, never started) the
    association `state` describes, ESTABLISHED, with its data channels open
    (returned). Chunks sent but not acknowledged are marked for retransmission:
    the old owner's last transmissions may never have left it (the freeze)."""
    sctp._RTCSctpTransport__started = True
    sctp._local_port, sctp._remote_port = state.local_port, state.remote_port
    sctp._local_verification_tag = state.local_verification_tag
    sctp._remote_verification_tag = state.remote_verification_tag
    sctp._remote_max_message_size = state.remote_max_message_size
    sctp._remote_partial_reliability = state.remote_partial_reliability
    sctp._remote_extensions = list(state.remote_extensions)
    sctp._data_channel_id = state.next_channel_id
    sctp._inbound_streams_count, sctp._outbound_streams_count = (state.inbound_streams_count,
                                                                 state.outbound_streams_count)
    sctp._advertised_rwnd = state.advertised_rwnd
    sctp._last_received_tsn = state.last_received_tsn
    sctp._sack_misordered, sctp._sack_duplicates = set(state.sack_misordered), list(state.sack_duplicates)
    sctp._sack_needed = state.sack_needed
    for stream in state.inbound:
        inbound = InboundStream()
        inbound.sequence_number = stream.sequence_number
        inbound.reassembly = [_chunk(c, retransmit=False) for c in stream.reassembly]
        sctp._inbound_streams[stream.stream_id] = inbound
    sctp._local_tsn, sctp._last_sacked_tsn = state.local_tsn, state.last_sacked_tsn
    sctp._advanced_peer_ack_tsn = state.advanced_peer_ack_tsn
    sctp._reconfig_request_seq, sctp._reconfig_response_seq = state.reconfig_request_seq, state.reconfig_response_seq
    sctp._cwnd, sctp._ssthresh, sctp._partial_bytes_acked = state.cwnd, state.ssthresh, state.partial_bytes_acked
    sctp._fast_recovery_exit = None
    sctp._outbound_stream_seq = {int(k): v for k, v in state.outbound_stream_seq.items()}
    sctp._sent_queue.extend(_chunk(c, retransmit=not (c.acked or c.abandoned)) for c in state.sent)
    sctp._outbound_queue.extend(_chunk(c, retransmit=False) for c in state.outbound)
    sctp._flight_size = 0  # nothing counts in flight until resent
    sctp._srtt, sctp._rttvar, sctp._rto = state.srtt, state.rttvar, state.rto
    sctp._association_state = RTCSctpTransport.State.ESTABLISHED
    sctp._RTCSctpTransport__state = "connected"
    sctp.transport._register_data_receiver(sctp)
    channels = {}
    for c in state.channels:
        params = RTCDataChannelParameters(label=c.label, maxPacketLifeTime=c.max_packet_life_time,
                                          maxRetransmits=c.max_retransmits, ordered=c.ordered,
                                          protocol=c.protocol, negotiated=c.negotiated, id=c.id)
        channel = RTCDataChannel(sctp, params, send_open=False)  # a negotiated one registers itself
        sctp._data_channels[c.id] = channel
        channel._setReadyState("open")
        channels[c.id] = channel
    for q in state.queued:
        channel = channels.get(q.channel)
        if channel is None:
            raise ValueError(f"sctp.association.queued: a message for data channel {q.channel}, which is not open")
        sctp._data_channel_queue.append((channel, q.protocol, base64.b64decode(q.user_data)))
    return list(channels.values())


async def sctp_resume(sctp: RTCSctpTransport) -> None:
    """Start a restored association at its new owner, or again after a
    freeze: acknowledge what it owes the peer (with gap blocks, the peer
    fast-retransmits what the freeze dropped), resend every chunk not
    acknowledged (what went out while held never left), send what is queued."""
    for chunk in sctp._sent_queue:
        if not (chunk._acked or chunk._abandoned):
            chunk._retransmit = True
            sctp._flight_size_decrease(chunk)
    if sctp._sack_needed or sctp._sack_misordered:
        await sctp._send_sack()
    await sctp._transmit()
    await sctp._data_channel_flush()


async def sctp_receive(sctp: RTCSctpTransport, data: bytes) -> None:
    """One SCTP packet from the record layer, as RTCDtlsTransport hands it over."""
    await sctp._handle_data(data)


async def sctp_abort(sctp: RTCSctpTransport) -> None:
    """Send an ABORT (the peer's data channels close at once), as stop() does."""
    await sctp._abort()
