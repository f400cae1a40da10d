"""Opus for the media engine: libopus (Debian's libopus0) through opuslib-next.

opuslib-next holds the codec states and their controls (complexity, bit
rate, in-band FEC); the per-frame calls go straight to its ctypes bindings
of ``opus_encode``/``opus_decode`` with buffers allocated once per call
(its convenience wrappers copy every sample through a Python list).

Everything is mono s16 at 48 kHz, 20 ms frames: what a voice agent speaks
and hears, and what the agent's outbound track produces. What the engine
needs beyond PyAV's libopus: ``decode_fec`` (the previous frame rebuilt from
a packet's in-band FEC) and ``conceal`` (packet loss concealment).
"""

from __future__ import annotations

import ctypes

import opuslib_next
from opuslib_next.api import decoder as _dec
from opuslib_next.api import encoder as _enc

RATE = 48000
FRAME_SAMPLES = 960  # 20 ms
#: The longest Opus packet is 120 ms; a decode buffer this size takes any packet.
MAX_SAMPLES = 5760
MAX_PACKET = 1275  # RFC 6716: the largest single-frame packet
#: Wideband SILK at 20 kb/s: speech up to 8 kHz, the band a speech model
#: hears (16 kHz input), at about two thirds of the CPU of 32 kb/s hybrid
#: (docs/media-engine.md, "Profile").
DEFAULT_BITRATE = 20000
DEFAULT_COMPLEXITY = 1

OpusError = opuslib_next.OpusError
_INT16_P = ctypes.POINTER(ctypes.c_int16)


class Decoder:
    """One call's decoder; every method returns mono s16 PCM bytes."""

    def __init__(self) -> None:
        self._state = opuslib_next.Decoder(RATE, 1)
        self._pcm = (ctypes.c_int16 * MAX_SAMPLES)()
        self._out = ctypes.cast(self._pcm, _INT16_P)

    def _run(self, data: bytes | None, samples: int, fec: int) -> bytes:
        n = _dec.libopus_decode(self._state.decoder_state, data, len(data) if data else 0, self._out, samples, fec)
        if n < 0:
            raise OpusError(n)
        return ctypes.string_at(self._pcm, n * 2)

    def decode(self, packet: bytes) -> bytes:
        """The packet's audio (any packet duration up to 120 ms); OpusError if malformed."""
        if not packet:
            raise OpusError(opuslib_next.INVALID_PACKET)
        return self._run(packet, MAX_SAMPLES, 0)

    def decode_fec(self, next_packet: bytes, samples: int = FRAME_SAMPLES) -> bytes:
        """The frame *before* ``next_packet``, from its in-band FEC (concealed
        by PLC when the packet carries none)."""
        return self._run(next_packet, samples, 1)

    def conceal(self, samples: int = FRAME_SAMPLES) -> bytes:
        """Packet loss concealment for one missing frame."""
        return self._run(None, samples, 0)


class Encoder:
    """One call's encoder: mono 48 kHz voice (wideband), in-band FEC on."""

    def __init__(self, *, complexity: int = DEFAULT_COMPLEXITY, bitrate: int = DEFAULT_BITRATE,
                 expected_loss: int = 5) -> None:
        if not 0 <= complexity <= 10:
            raise ValueError("Opus complexity must be in 0..10")
        self._state = opuslib_next.Encoder(RATE, 1, opuslib_next.APPLICATION_VOIP)
        self._state.complexity = complexity
        self._state.bitrate = bitrate
        # Voice: SILK/hybrid, the modes that carry in-band FEC (left to
        # itself, libopus picks CELT at complexity >= 7, which has none).
        self._state.signal = opuslib_next.SIGNAL_VOICE
        self._state.max_bandwidth = opuslib_next.BANDWIDTH_WIDEBAND
        # FEC data is only produced when the encoder expects losses.
        self._state.inband_fec = 1
        self._state.packet_loss_perc = expected_loss
        self._buf = ctypes.create_string_buffer(MAX_PACKET)

    def encode(self, pcm: bytes) -> bytes:
        """One frame of mono s16 PCM (960 samples for 20 ms) to one packet."""
        samples = len(pcm) // 2
        src = ctypes.cast(ctypes.c_char_p(pcm), _INT16_P)
        n = _enc.libopus_encode(self._state.encoder_state, src, samples, self._buf, MAX_PACKET)
        if n < 0:
            raise OpusError(n)
        return self._buf.raw[:n]
