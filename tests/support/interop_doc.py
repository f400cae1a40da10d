"""docs/interop.md, rendered from the interop matrix's JSON.

tests/e2e/test_interop.py writes test-artifacts/interop.json (write_artifact);
docs/interop.json is a committed copy of a passing run, and docs/interop.md is
`render()` of it (tests/unit/test_interop_doc.py holds them equal). After a run:

    python -m tests.support.interop_doc test-artifacts/interop.json
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.paths import ARTIFACTS, REPO

DOC_JSON = REPO / "docs" / "interop.json"
DOC_MD = REPO / "docs" / "interop.md"
ARTIFACT = ARTIFACTS / "interop.json"

NETWORKS = {"ipv4": "UDP, IPv4 only", "ipv6": "UDP, IPv6 only", "tcp": "ICE-TCP (UDP blocked)",
            "dual": "UDP, IPv4 + IPv6"}


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return "not installed"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def client_versions() -> dict[str, str]:
    """The version of every client in the matrix, and of the transceiver's stack."""
    import aiortc
    from OpenSSL import SSL

    gst = _first_line([sys.executable, "-c", "import gi; gi.require_version('Gst', '1.0'); "
                       "from gi.repository import Gst; Gst.init(None); "
                       "print(Gst.version_string(), 'webrtc', Gst.Registry.get().find_plugin('webrtc').get_version())"])
    return {
        "chromium": _first_line(["chromium", "--version"]).split(" built on")[0],
        "firefox": _first_line(["firefox-esr", "--version"]),
        "gstreamer": gst.replace("webrtc", "(webrtcbin plugin", 1) + ")" if "webrtc" in gst else gst,
        "aiortc": f"aiortc {aiortc.__version__}",
        "transceiver": f"aiortc {aiortc.__version__}, {SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}",
    }


def write_artifact(rows: list[dict], versions: dict[str, str]) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_text(json.dumps({"versions": versions, "rows": rows}, indent=1) + "\n")
    return ARTIFACT


def _db(value: float | None) -> str:
    return "–" if value is None else f"{round(value, 1) + 0.0:+.1f} dB"  # + 0.0: no "-0.0"


def render(data: dict) -> str:
    versions = data["versions"]
    lines = [
        "# Interop matrix",
        "",
        "Every standard WebRTC stack below calls the echo agent through the lab's relay",
        "(relayd with XDP, two transceivers; `tests/e2e/test_interop.py`). In each row the",
        "client hears its tone come back at the level it sent it, gets its data-channel pings",
        "echoed, and is then moved live to the other transceiver: its audio and data channel",
        "go on (more pings echoed, the tone at its level again). What the transceiver",
        "negotiated is read from its side of the call (`GET /calls/{id}` → `export.dtls`).",
        "",
        "Echo level: the echo's RMS as the client hears it against the RMS it sends (its",
        "microphone, measured the same way), medians over a second, before and after the",
        "migration; a row fails beyond ±1 dB. Browsers use relayd's page with voice",
        "processing switched off; Chromium plays a 440 Hz file as its microphone, Firefox",
        "its fake device's tone. GStreamer is `webrtcbin` from Python (`tests/support/gst_client.py`),",
        "with the RSA-2048 certificate it makes by default, and with an ECDSA P-256 one",
        "(put into its DTLS element, with the offer's fingerprint rewritten to match:",
        "webrtcbin has no setting for it). \"ready\" is the time from starting the client",
        "(a browser's start included) to its call connected, its tone echoed and three pings",
        "answered.",
        "",
        f"Transceiver: {versions['transceiver']}. Regenerate: run the test, then",
        "`python -m tests.support.interop_doc test-artifacts/interop.json`.",
        "",
        "| client | version | network | DTLS | cipher suite | SRTP profile | ready | "
        "echo level (before / after migration) | data channel echoed | migration | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        network = NETWORKS.get(r["network"], r["network"])
        if r.get("path"):
            network += f" ({r['path'].split(' to ')[0]})"
        connected = f"{r['connected_s']:.1f} s" if r.get("connected_s") is not None else "–"
        result = "pass" if r.get("passed") else f"FAIL: {r.get('error', '?')}"
        cells = [r["row"], versions.get(r["client"], "?"), network, r.get("dtls_version", "–"),
                 r.get("cipher", "–"), r.get("srtp_profile", "–"), connected,
                 f"{_db(r.get('level_db_before'))} / {_db(r.get('level_db_after'))}", r.get("dc", "–"),
                 r.get("migration", "–"), result]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else DOC_JSON
    if source.resolve() != DOC_JSON.resolve():
        shutil.copy(source, DOC_JSON)
    DOC_MD.write_text(render(json.loads(DOC_JSON.read_text())))
    print(f"wrote {DOC_MD} from {DOC_JSON}")


if __name__ == "__main__":
    main()
