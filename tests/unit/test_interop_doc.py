"""docs/interop.md is what tests/support/interop_doc.py renders from the
committed docs/interop.json (regenerate both after a run of tests/e2e/test_interop.py:
`python -m tests.support.interop_doc test-artifacts/interop.json`)."""

from __future__ import annotations

import json

from tests.support.interop_doc import DOC_JSON, DOC_MD, render


def test_docs_interop_md_is_rendered_from_docs_interop_json() -> None:
    data = json.loads(DOC_JSON.read_text())
    assert DOC_MD.read_text() == render(data), \
        "docs/interop.md is stale: python -m tests.support.interop_doc"


def test_every_row_passed_and_names_what_it_negotiated() -> None:
    data = json.loads(DOC_JSON.read_text())
    assert {r["row"] for r in data["rows"]} == {"chromium-udp4", "chromium-udp6", "chromium-tcp", "firefox-esr",
                                                "gstreamer-rsa", "gstreamer-ecdsa", "aiortc"}
    for row in data["rows"]:
        assert row["passed"], row
        assert row["dtls_version"] and row["cipher"] and row["srtp_profile"], row
        assert row["client"] in data["versions"], row


def test_a_failed_row_renders_its_error() -> None:
    data = {"versions": {"transceiver": "t", "x": "X 1"},
            "rows": [{"row": "x", "client": "x", "network": "dual", "passed": False, "error": "boom | bang"}]}
    text = render(data)
    assert "| x | X 1 | UDP, IPv4 + IPv6 | – | – | – | – | – / – | – | – | FAIL: boom / bang |" in text
