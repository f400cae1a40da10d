"""SmallWebRTC's own data-channel messages stop at the transport."""

from __future__ import annotations

import pytest

from manager.integrations.pipecat_transport import decode_message
from manager.integrations.smallwebrtc_control import SmallWebRTCControl

CASES = [
    # (description, message as it arrives on the data channel, consumed)
    ("keep-alive", "ping: 1733472000000", True),
    ("mic muted", '{"type": "signalling", "message": {"type": "trackStatus", "receiver_index": 0, "enabled": false}}',
     True),
    ("signalling of a kind not known here", '{"type": "signalling", "message": {"type": "renegotiate"}}', True),
    ("RTVI", '{"label": "rtvi-ai", "type": "client-ready", "id": "1", "data": {}}', False),
    ("an app's JSON", '{"type": "chat", "text": "ping me"}', False),
    ("an app's text", "hello", False),
    ("text that mentions ping later", "say ping", False),
    ("bytes", b"ping", False),
    ("broken JSON", '{"type": "signalling"', False),
]


@pytest.mark.parametrize("what,raw,consumed", CASES, ids=[c[0] for c in CASES])
def test_the_client_transports_messages_are_consumed_and_the_rest_reach_the_bot(what, raw, consumed):
    control = SmallWebRTCControl()
    assert control.consume(decode_message(raw)) is consumed


def test_track_status_and_keep_alives_are_recorded():
    control = SmallWebRTCControl()
    for raw in ("ping: 1", "ping: 2",
                '{"type": "signalling", "message": {"type": "trackStatus", "receiver_index": 0, "enabled": false}}',
                '{"type": "signalling", "message": {"type": "trackStatus", "receiver_index": 1, "enabled": true}}',
                '{"type": "signalling", "message": {"type": "trackStatus", "receiver_index": 7, "enabled": true}}',
                '{"type": "signalling", "message": {"type": "trackStatus", "receiver_index": 0, "enabled": "no"}}'):
        control.consume(decode_message(raw))
    assert control.pings == 2 and control.last_ping_at is not None
    assert control.track_status == {"microphone": False, "camera": True}
    assert control.signalling == 4
