"""RFC 4571 framing: RTP, STUN, DTLS and the rest over a TCP stream, each
packet behind its 16-bit length (RFC 6544 ICE-TCP uses it)."""

from __future__ import annotations

import struct

FRAME_HEADER = struct.Struct("!H")  # the length of the packet that follows


class FrameError(ValueError):
    """A frame to refuse (the stream is closed)."""


def frame(packet: bytes) -> bytes:
    """One frame."""
    if len(packet) > 0xFFFF:
        raise ValueError(f"a packet of {len(packet)} bytes does not fit an RFC 4571 frame")
    return FRAME_HEADER.pack(len(packet)) + packet


class FrameParser:
    """Frames out of a TCP byte stream, as the bytes come."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The packets of every frame completed by `data` (FrameError: refuse the stream)."""
        buf = self._buf
        buf += data
        out = []
        pos = 0
        while len(buf) - pos >= FRAME_HEADER.size:
            (length,) = FRAME_HEADER.unpack_from(buf, pos)
            if length == 0:
                raise FrameError("empty frame")
            if length > self.max_frame:
                raise FrameError(f"frame of {length} bytes exceeds tcp.max_frame ({self.max_frame})")
            end = pos + FRAME_HEADER.size + length
            if end > len(buf):
                break
            out.append(bytes(buf[pos + FRAME_HEADER.size:end]))
            pos = end
        del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buf)
