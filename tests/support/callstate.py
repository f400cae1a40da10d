"""Call-state samples: a DTLS cipher and an SCTP association."""

from __future__ import annotations

import base64

CIPHER = "ECDHE-ECDSA-AES128-GCM-SHA256"


def chunk(tsn: int, data: bytes, **over) -> dict:
    return {"tsn": tsn, "stream_id": 1, "stream_seq": 4, "protocol": 51, "flags": 3,
            "user_data": base64.b64encode(data).decode(), "sent_count": 1, "acked": False, "abandoned": False,
            "expiry": None, "max_retransmits": None, **over}


def association(**over) -> dict:
    """An established association with one channel, a chunk in flight, one
    awaiting reassembly and a queued message."""
    return {
        "local_port": 5000, "remote_port": 5000, "local_verification_tag": 0xA1B2C3D4,
        "remote_verification_tag": 0x0F0E0D0C, "remote_max_message_size": 65536, "remote_partial_reliability": True,
        "remote_extensions": [192, 130], "next_channel_id": 0, "inbound_streams_count": 65535,
        "outbound_streams_count": 65535, "advertised_rwnd": 1048576, "last_received_tsn": 700,
        "sack_misordered": [702], "sack_duplicates": [], "sack_needed": True,
        "inbound": [{"stream_id": 1, "sequence_number": 9, "reassembly": [chunk(702, b"later", stream_seq=10)]}],
        "local_tsn": 101, "last_sacked_tsn": 99, "advanced_peer_ack_tsn": 99, "cwnd": 3600, "ssthresh": 131072,
        "partial_bytes_acked": 0, "outbound_stream_seq": {"1": 5}, "sent": [chunk(100, b"hello")], "outbound": [],
        "reconfig_request_seq": 50, "reconfig_response_seq": 60, "srtt": 0.01, "rttvar": 0.005, "rto": 1.0,
        "channels": [{"id": 1, "label": "chat", "protocol": "", "ordered": True, "max_packet_life_time": None,
                      "max_retransmits": None, "negotiated": False}],
        "queued": [{"channel": 1, "protocol": 51, "user_data": base64.b64encode(b"queued").decode()}],
        **over,
    }
