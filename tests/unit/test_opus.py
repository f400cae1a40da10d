"""The media engine's Opus (manager/transceiver/opus.py): libopus mono 48 kHz
with in-band FEC, loss concealment and a bad packet refused, never a crash."""

from __future__ import annotations

import array
import math
import random

import pytest

from manager.lab.client import tone_power
from manager.transceiver.opus import FRAME_SAMPLES, Decoder, Encoder, OpusError


def tone(frames: int, freq: float = 440.0) -> list[bytes]:
    pcm = array.array("h", (int(8000 * math.sin(2 * math.pi * freq * i / 48000)) for i in range(960 * frames)))
    return [pcm[i * 960:(i + 1) * 960].tobytes() for i in range(frames)]


def samples(pcm: bytes) -> array.array:
    return array.array("h", pcm)


def dominant(pcm: bytes, freq: float, other: float) -> bool:
    s = samples(pcm)
    return tone_power(s, freq) > 20 * tone_power(s, other)


def test_round_trip_keeps_the_tone():
    enc, dec = Encoder(), Decoder()
    packets = [enc.encode(f) for f in tone(50)]
    assert all(0 < len(p) < 200 for p in packets)  # 32 kb/s: about 80 bytes a frame
    out = [dec.decode(p) for p in packets]
    assert all(len(o) == 2 * FRAME_SAMPLES for o in out)
    assert dominant(b"".join(out[10:]), 440.0, 1000.0)


def test_lost_frame_comes_back_from_the_next_packets_fec():
    enc, dec = Encoder(expected_loss=10), Decoder()
    packets = [enc.encode(f) for f in tone(60)]
    for p in packets[:30]:
        dec.decode(p)
    rebuilt = dec.decode_fec(packets[31])  # packet 30 lost
    assert len(rebuilt) == 2 * FRAME_SAMPLES
    assert dominant(rebuilt, 440.0, 1000.0)
    assert dominant(dec.decode(packets[31]), 440.0, 1000.0)


def test_concealment_continues_the_tone():
    enc, dec = Encoder(), Decoder()
    for p in [enc.encode(f) for f in tone(30)]:
        dec.decode(p)
    concealed = dec.conceal()
    assert len(concealed) == 2 * FRAME_SAMPLES
    assert dominant(concealed, 440.0, 1000.0)


@pytest.mark.parametrize("complexity", [0, 5, 10])
def test_complexity_is_a_setting(complexity):
    assert len(Encoder(complexity=complexity).encode(tone(1)[0])) > 0


def test_bad_complexity_is_refused():
    with pytest.raises(ValueError, match="complexity"):
        Encoder(complexity=11)


def test_garbage_packets_raise_opus_error_never_crash():
    rng = random.Random(5)
    dec = Decoder()
    good = Encoder().encode(tone(1)[0])
    refused = 0
    for i in range(3000):
        if i % 2:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 400)))
        else:  # a real packet with a few bytes flipped
            data = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            data = bytes(data)
        try:
            out = dec.decode(data)
            assert len(out) % 2 == 0 and len(out) <= 2 * 5760
        except OpusError:
            refused += 1
    with pytest.raises(OpusError):
        dec.decode(b"")
    assert refused > 0
    assert len(dec.decode(good)) == 2 * FRAME_SAMPLES  # still decodes afterwards
