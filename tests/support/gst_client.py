"""A GStreamer webrtcbin client (Debian's gstreamer1.0-plugins-bad with libnice,
through python3-gi), run as its own process in the lab's client namespace:

    python -m tests.support.gst_client URL [--ecdsa] [--tone HZ]

It places a WHIP-style call (POST the offer to URL/v1/calls, the answer comes
back in the 201), sends a sine tone (audiotestsrc, volume 0.5: RMS 0.354) as
mono Opus, opens a data channel and sends a ping every 200 ms, and listens to
the agent's audio. Every 250 ms it prints one JSON line on stdout:
{"state", "sent_level", "level", "tone_ratio", "dc_sent", "dc_echoed", ...}.
It runs until stdin closes or SIGTERM.

webrtcbin's own certificate is RSA-2048; `--ecdsa` puts a P-256 one in its
DTLS elements (dtlsdec's `pem`) as they are created, before the offer
carries its fingerprint.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
import time
import urllib.request
from array import array

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstWebRTC", "1.0")
gi.require_version("GstSdp", "1.0")
from gi.repository import GLib, Gst, GstSdp, GstWebRTC  # noqa: E402

RATE = 48000
VOLUME = 0.5  # sine amplitude: RMS 0.354


def ecdsa_pem() -> tuple[str, str]:
    """A self-signed P-256 certificate and its key, as dtlsdec's `pem` takes
    them, and the certificate's SHA-256 fingerprint as SDP writes it."""
    from aiortc.rtcdtlstransport import certificate_digest, generate_certificate
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    cert = generate_certificate(key)
    pem = (cert.public_bytes(serialization.Encoding.PEM)
           + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                               serialization.NoEncryption())).decode()
    return pem, certificate_digest(cert, "sha-256")


def tone_ratio(samples: array, freq: float) -> float:
    """Goertzel power at `freq` over the mean power at two other frequencies (how clearly the tone is there)."""

    def power(f: float) -> float:
        k = 2 * math.cos(2 * math.pi * f / RATE)
        s1 = s2 = 0.0
        for x in samples:
            s1, s2 = x + k * s1 - s2, s1
        return s1 * s1 + s2 * s2 - k * s1 * s2

    others = (power(freq * 1.5) + power(freq * 0.75)) / 2
    return power(freq) / max(others, 1e-9)


class Client:
    def __init__(self, url: str, *, ecdsa: bool, tone: float) -> None:
        self.url, self.tone = url, tone
        self.status: dict = {"state": "new", "error": None, "sent_level": VOLUME / math.sqrt(2), "level": 0.0,
                             "tone_ratio": 0.0, "dc_sent": 0, "dc_echoed": 0, "dc_open": False,
                             "connected_s": None, "gst": Gst.version_string(), "ecdsa": ecdsa}
        self.t0 = time.monotonic()
        self.pending: set[str] = set()
        self.lock = threading.Lock()
        self.pipe = Gst.parse_launch(
            f"webrtcbin name=webrtc bundle-policy=max-bundle "
            f"audiotestsrc is-live=true wave=sine freq={tone} volume={VOLUME} ! audioconvert ! audioresample "
            f"! audio/x-raw,channels=1,rate={RATE} ! opusenc ! rtpopuspay pt=111 "
            f"! application/x-rtp,media=audio,encoding-name=OPUS,payload=111 ! webrtc.")
        self.webrtc = self.pipe.get_by_name("webrtc")
        self.fingerprint: str | None = None
        if ecdsa:
            pem, self.fingerprint = ecdsa_pem()
            self.webrtc.connect("deep-element-added", self._on_element, pem)
        self.webrtc.connect("on-negotiation-needed", self._on_negotiation_needed)
        self.webrtc.connect("pad-added", self._on_pad)
        self.webrtc.connect("notify::connection-state", self._on_state)
        self.channel = None
        self.offered = False

    # -- set-up ----------------------------------------------------------------------------

    def _on_element(self, _bin, _sub, element, pem: str) -> None:
        factory = element.get_factory()
        if factory is not None and factory.get_name() == "dtlsdec":
            # dtlsdec made its connection with its default agent when it got
            # its connection-id: set the id again to make it anew with ours.
            element.set_property("pem", pem)
            element.set_property("connection-id", element.get_property("connection-id"))

    def start(self) -> None:
        self.pipe.set_state(Gst.State.READY)
        # Before PLAYING, so the one offer carries the audio and the data channel.
        self.channel = self.webrtc.emit("create-data-channel", "agent", None)
        self.channel.connect("on-open", self._on_open)
        self.channel.connect("on-message-string", self._on_message)
        self.pipe.set_state(Gst.State.PLAYING)

    def _on_negotiation_needed(self, _webrtc) -> None:
        if self.offered:
            return  # one offer/answer per call: a second one would need new signaling
        self.offered = True
        promise = Gst.Promise.new_with_change_func(self._on_offer, None)
        self.webrtc.emit("create-offer", None, promise)

    def _on_offer(self, promise, _data) -> None:
        reply = promise.get_reply()
        offer = reply.get_value("offer") if reply is not None else None
        if offer is None:
            self.status["error"] = f"create-offer: {reply.to_string() if reply else None}"
            return
        self.webrtc.emit("set-local-description", offer, Gst.Promise.new())
        sdp = offer.sdp.as_text()
        if self.fingerprint is not None:
            # webrtcbin wrote the fingerprint of the certificate it generated
            # first; the handshake uses ours (a failure here would be a mismatch).
            sdp = "\r\n".join(f"a=fingerprint:sha-256 {self.fingerprint}" if x.startswith("a=fingerprint:")
                                else x for x in sdp.split("\r\n"))
        threading.Thread(target=self._signal, args=(sdp,), daemon=True).start()

    def _signal(self, sdp: str) -> None:
        try:
            req = urllib.request.Request(f"{self.url}/v1/calls", data=sdp.encode(), method="POST",
                                         headers={"Content-Type": "application/sdp"})
            with urllib.request.urlopen(req, timeout=10) as r:
                answer, self.status["call_url"] = r.read().decode(), r.headers.get("Location")
        except Exception as exc:
            self.status["error"] = f"signaling: {exc}"
            return
        _, msg = GstSdp.SDPMessage.new_from_text(answer)
        desc = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, msg)
        GLib.idle_add(lambda: self.webrtc.emit("set-remote-description", desc, Gst.Promise.new()) and False)

    def _on_state(self, webrtc, _pspec) -> None:
        state = webrtc.get_property("connection-state").value_nick
        self.status["state"] = state
        if state == "connected" and self.status["connected_s"] is None:
            self.status["connected_s"] = round(time.monotonic() - self.t0, 3)

    # -- the agent's audio -------------------------------------------------------------------

    def _on_pad(self, _webrtc, pad) -> None:
        if pad.direction != Gst.PadDirection.SRC:
            return
        out = Gst.parse_bin_from_description(
            f"rtpopusdepay ! opusdec ! audioconvert ! audioresample "
            f"! audio/x-raw,format=S16LE,channels=1,rate={RATE} ! appsink name=sink emit-signals=true sync=false",
            True)
        self.pipe.add(out)
        out.sync_state_with_parent()
        out.get_by_name("sink").connect("new-sample", self._on_sample)
        pad.link(out.get_static_pad("sink"))

    def _on_sample(self, sink):
        buf = sink.emit("pull-sample").get_buffer()
        ok, info = buf.map(Gst.MapFlags.READ)
        if ok:
            pcm = array("h", bytes(info.data))
            buf.unmap(info)
            with self.lock:
                self.window = (getattr(self, "window", array("h")) + pcm)[-RATE // 4:]
        return Gst.FlowReturn.OK

    def measure(self) -> None:
        with self.lock:
            pcm = getattr(self, "window", array("h"))
        if len(pcm) >= RATE // 8:
            self.status["level"] = math.sqrt(sum(x * x for x in pcm) / len(pcm)) / 32768
            self.status["tone_ratio"] = round(tone_ratio(pcm, self.tone), 1)

    # -- the data channel --------------------------------------------------------------------

    def _on_open(self, _channel) -> None:
        self.status["dc_open"] = True
        GLib.timeout_add(200, self._ping)

    def _ping(self) -> bool:
        tag = f"ping-{self.status['dc_sent']}"
        self.pending.add(tag)
        self.channel.emit("send-string", tag)
        self.status["dc_sent"] += 1
        return True

    def _on_message(self, _channel, text: str) -> None:
        if text in self.pending:
            self.pending.discard(text)
            self.status["dc_echoed"] += 1

    def stop(self) -> None:
        self.pipe.set_state(Gst.State.NULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--ecdsa", action="store_true")
    parser.add_argument("--tone", type=float, default=440.0)
    args = parser.parse_args()
    Gst.init(None)
    client = Client(args.url, ecdsa=args.ecdsa, tone=args.tone)
    loop = GLib.MainLoop()

    def report() -> bool:
        client.measure()
        print(json.dumps(client.status), flush=True)
        return True

    GLib.timeout_add(250, report)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, lambda: loop.quit() or False)
    threading.Thread(target=lambda: (sys.stdin.read(), GLib.idle_add(loop.quit)), daemon=True).start()
    client.start()
    try:
        loop.run()
    finally:
        client.stop()


if __name__ == "__main__":
    main()
