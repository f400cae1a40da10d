"""SDP candidate handling, checked against real aiortc offers and answers."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack
from aiortc.sdp import SessionDescription

from manager.protocol.sdp import (
    SdpError,
    ice_credentials,
    rewrite_candidates,
    strip_candidates,
    validate,
)

T = TypeVar("T")
PUBLIC4 = ("203.0.113.7", 3478)
PUBLIC6 = ("2001:db8::7", 3479)


def run(factory: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(factory())


async def _offerer() -> RTCPeerConnection:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(AudioStreamTrack())
    pc.createDataChannel("chat")
    await pc.setLocalDescription(await pc.createOffer())
    return pc


async def _answer_for(offer: str) -> str:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return pc.localDescription.sdp
    finally:
        await pc.close()


async def _accepts_offer(offer: str) -> bool:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        return True
    except Exception:
        return False
    finally:
        try:
            await pc.close()
        except Exception:  # aiortc 1.16 cannot always close a half-set-up pc
            pass


@pytest.fixture(scope="module")
def real() -> dict[str, str]:
    """One real aiortc offer (audio + data channel) and the answer to it."""

    async def make() -> dict[str, str]:
        pc = await _offerer()
        try:
            offer = pc.localDescription.sdp
            return {"offer": offer, "answer": await _answer_for(offer)}
        finally:
            await pc.close()

    return run(make)


def _lines(sdp: str) -> list[str]:
    assert sdp.endswith("\r\n")
    return sdp[:-2].split("\r\n")


def _replace(sdp: str, old: str, new: str) -> str:
    assert old in sdp, old
    return sdp.replace(old, new)


def _drop(sdp: str, prefix: str) -> str:
    lines = _lines(sdp)
    kept = [line for line in lines if not line.startswith(prefix)]
    assert kept != lines, prefix
    return "\r\n".join(kept) + "\r\n"


# -- strip_candidates -------------------------------------------------------


def test_real_offer_has_candidates(real: dict[str, str]) -> None:
    # Guards the other tests: they would pass vacuously on an empty offer.
    lines = _lines(real["offer"])
    assert sum(line.startswith("a=candidate:") for line in lines) >= 2
    assert "a=end-of-candidates" in lines


def test_strip_candidates_removes_only_candidates(real: dict[str, str]) -> None:
    stripped = strip_candidates(real["offer"])
    expected = [
        line
        for line in _lines(real["offer"])
        if not line.startswith("a=candidate:") and line != "a=end-of-candidates"
    ]
    assert _lines(stripped) == expected
    assert strip_candidates(stripped) == stripped


def test_stripped_offer_leaves_ice_open(real: dict[str, str]) -> None:
    # No candidates and no end-of-candidates: the answerer must keep waiting
    # for the client's peer-reflexive candidate (which arrives via the relay).
    parsed = SessionDescription.parse(strip_candidates(real["offer"]))
    assert len(parsed.media) == 2
    for media in parsed.media:
        assert media.ice_candidates == []
        assert media.ice_candidates_complete is False
    assert run(lambda: _accepts_offer(strip_candidates(real["offer"])))


def test_strip_candidates_normalises_to_crlf(real: dict[str, str]) -> None:
    lf = real["offer"].replace("\r\n", "\n")
    assert strip_candidates(lf) == strip_candidates(real["offer"])
    assert "\n" not in strip_candidates(lf).replace("\r\n", "")


# -- rewrite_candidates -----------------------------------------------------


def _rewrite_round_trip(public: list[tuple[str, int]]) -> tuple[str, str]:
    """Real offer -> real answer -> rewritten -> set on the real offerer."""

    async def flow() -> tuple[str, str]:
        pc = await _offerer()
        try:
            answer = await _answer_for(strip_candidates(pc.localDescription.sdp))
            rewritten = rewrite_candidates(answer, public)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=rewritten, type="answer"))
            assert pc.signalingState == "stable"
            return answer, rewritten
        finally:
            await pc.close()

    return run(flow)


def _candidates(media) -> list[tuple[str, int, str, str, int]]:
    return [(c.ip, c.port, c.type, c.protocol, c.component) for c in media.ice_candidates]


def test_rewrite_dual_stack_round_trip_in_aiortc() -> None:
    answer, rewritten = _rewrite_round_trip([PUBLIC4, PUBLIC6])
    parsed = SessionDescription.parse(rewritten)
    assert [m.kind for m in parsed.media] == ["audio", "application"]
    for media in parsed.media:
        assert _candidates(media) == [
            ("203.0.113.7", 3478, "host", "udp", 1),
            ("2001:db8::7", 3479, "host", "udp", 1),
        ]
        assert media.ice_candidates_complete is True
        assert (media.host, media.port) == PUBLIC4
        # Distinct foundations (different base addresses), first one preferred.
        first, second = media.ice_candidates
        assert first.foundation != second.foundation
        assert first.priority > second.priority
    # The transceiver's own addresses are gone from every line that carries them.
    original_hosts = {c.ip for m in SessionDescription.parse(answer).media for c in m.ice_candidates}
    assert original_hosts
    for line in _lines(rewritten):
        if line.startswith(("a=candidate:", "c=", "m=")):
            assert not any(host in line.split() for host in original_hosts), line


def test_rewrite_keeps_everything_else(real: dict[str, str]) -> None:
    rewritten = rewrite_candidates(real["answer"], [PUBLIC4])

    def rest(sdp: str) -> list[str]:
        return [
            line
            for line in _lines(sdp)
            if not line.startswith(("a=candidate:", "a=end-of-candidates", "c=", "m="))
        ]

    assert rest(rewritten) == rest(real["answer"])
    assert [line for line in _lines(rewritten) if line.startswith("m=")] == [
        "m=audio 3478 UDP/TLS/RTP/SAVPF 96 9 0 8",
        "m=application 3478 UDP/DTLS/SCTP webrtc-datachannel",
    ]
    assert [line for line in _lines(rewritten) if line.startswith("c=")] == [
        "c=IN IP4 203.0.113.7"
    ] * 2


def test_rewrite_ipv6_only_round_trip_in_aiortc() -> None:
    _, rewritten = _rewrite_round_trip([PUBLIC6])
    assert [line for line in _lines(rewritten) if line.startswith("c=")] == [
        "c=IN IP6 2001:db8::7"
    ] * 2
    for media in SessionDescription.parse(rewritten).media:
        assert _candidates(media) == [("2001:db8::7", 3479, "host", "udp", 1)]
        assert media.port == 3479


def test_rewrite_normalises_ipv6_text(real: dict[str, str]) -> None:
    rewritten = rewrite_candidates(real["answer"], [("2001:0db8:0:0::0007", 9)])
    assert "c=IN IP6 2001:db8::7" in _lines(rewritten)


def test_rewrite_is_idempotent(real: dict[str, str]) -> None:
    once = rewrite_candidates(real["answer"], [PUBLIC4, PUBLIC6])
    assert rewrite_candidates(once, [PUBLIC4, PUBLIC6]) == once


def test_rewrite_adds_candidates_and_c_line_when_missing(real: dict[str, str]) -> None:
    bare = _drop(strip_candidates(real["answer"]), "c=")
    rewritten = rewrite_candidates(bare, [PUBLIC4])
    lines = _lines(rewritten)
    for index, line in enumerate(lines):
        if line.startswith("m="):
            assert lines[index + 1] == "c=IN IP4 203.0.113.7"
    for media in SessionDescription.parse(rewritten).media:
        assert _candidates(media) == [("203.0.113.7", 3478, "host", "udp", 1)]
        assert media.ice_candidates_complete


def test_rewrite_puts_c_line_after_i_line(real: dict[str, str]) -> None:
    lines = _lines(_drop(real["answer"], "c="))
    at = next(i for i, line in enumerate(lines) if line.startswith("m=audio"))
    lines.insert(at + 1, "i=voice")
    rewritten = _lines(rewrite_candidates("\r\n".join(lines) + "\r\n", [PUBLIC4]))
    at = next(i for i, line in enumerate(rewritten) if line.startswith("m=audio"))
    assert rewritten[at + 1 : at + 3] == ["i=voice", "c=IN IP4 203.0.113.7"]


def test_rewrite_leaves_rejected_sections_rejected(real: dict[str, str]) -> None:
    line = next(x for x in _lines(real["answer"]) if x.startswith("m=application "))
    rejected = _replace(real["answer"], line, "m=application 0 " + line.split(" ", 2)[2])
    rewritten = rewrite_candidates(rejected, [PUBLIC4])
    media = SessionDescription.parse(rewritten).media
    assert media[0].port == 3478 and len(media[0].ice_candidates) == 1
    assert media[1].port == 0 and media[1].ice_candidates == []


def test_rewrite_rewrites_session_level_c_line(real: dict[str, str]) -> None:
    sdp = _replace(real["answer"], "t=0 0\r\n", "c=IN IP4 192.0.2.99\r\nt=0 0\r\n")
    rewritten = rewrite_candidates(sdp, [PUBLIC4])
    assert "192.0.2.99" not in rewritten
    assert SessionDescription.parse(rewritten).host == "203.0.113.7"


@pytest.mark.parametrize(
    "public, message",
    [
        ([], "at least one public address is needed"),
        ([("relay.example.com", 3478)], "public address ('relay.example.com', 3478) is not an (IP literal, port) pair"),
        ([("203.0.113.7",)], "public address ('203.0.113.7',) is not an (IP literal, port) pair"),
        ([("203.0.113.7", 0)], "public port 0 is not in 1..65535"),
        ([("203.0.113.7", 65536)], "public port 65536 is not in 1..65535"),
        ([("203.0.113.7", "3478")], "public port '3478' is not in 1..65535"),
    ],
)
def test_rewrite_rejects_bad_public(real: dict[str, str], public, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        rewrite_candidates(real["answer"], public)
    assert str(exc.value) == message


# -- ice_credentials --------------------------------------------------------


def test_ice_credentials_from_media(real: dict[str, str]) -> None:
    parsed = SessionDescription.parse(real["offer"])
    expected = (parsed.media[0].ice.usernameFragment, parsed.media[0].ice.password)
    assert ice_credentials(real["offer"]) == expected
    assert ice_credentials(strip_candidates(real["offer"])) == expected


def test_ice_credentials_session_level_fallback(real: dict[str, str]) -> None:
    ufrag, pwd = ice_credentials(real["offer"])
    moved = _drop(_drop(real["offer"], "a=ice-ufrag:"), "a=ice-pwd:")
    moved = _replace(moved, "t=0 0\r\n", f"t=0 0\r\na=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\n")
    assert ice_credentials(moved) == (ufrag, pwd)
    assert SessionDescription.parse(moved).media[0].ice.usernameFragment == ufrag


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: _drop(s, "a=ice-ufrag:"), "SDP has no a=ice-ufrag"),
        (lambda s: _drop(s, "a=ice-pwd:"), "SDP has no a=ice-pwd"),
        (lambda s: s.split("m=", 1)[0], "SDP has no media section (m= line)"),
    ],
)
def test_ice_credentials_errors(real: dict[str, str], mutate, message: str) -> None:
    with pytest.raises(SdpError) as exc:
        ice_credentials(mutate(real["offer"]))
    assert str(exc.value) == message


# -- validate ---------------------------------------------------------------


def test_validate_accepts_real_offer_and_answer(real: dict[str, str]) -> None:
    assert [m.kind for m in validate(real["offer"]).media] == ["audio", "application"]
    assert validate(strip_candidates(real["offer"])).media[0].ice_candidates == []
    validate(real["answer"], "answer")
    validate(rewrite_candidates(real["answer"], [PUBLIC4]), "answer")
    validate(real["offer"].replace("\r\n", "\n"))


def _mline(sdp: str, kind: str) -> str:
    return next(x for x in _lines(sdp) if x.startswith(f"m={kind} "))


OFFER_REJECTIONS: list[tuple[str, Callable[[str], str], str]] = [
    ("empty", lambda s: "", "SDP is empty"),
    ("blank", lambda s: " \r\n\r\n", "SDP is empty"),
    ("not sdp", lambda s: "hello world", "SDP does not start with v=0"),
    ("json", lambda s: '{"sdp": "v=0"}', "SDP does not start with v=0"),
    ("version 1", lambda s: s.replace("v=0", "v=1", 1), "SDP does not start with v=0"),
    ("nul byte", lambda s: s.replace("s=-", "s=\x00"), "SDP contains control characters"),
    ("bare cr", lambda s: s.replace("s=-\r\n", "s=-\r"), "SDP contains control characters"),
    ("unicode line sep", lambda s: s.replace("s=-", "s=\u2028"), "SDP contains control characters"),
    ("no media", lambda s: s.split("m=", 1)[0], "SDP has no media section (m= line)"),
    (
        "bad m-line",
        lambda s: _replace(s, _mline(s, "audio"), "m=audio port UDP/TLS/RTP/SAVPF 96"),
        "malformed m= line: 'm=audio port UDP/TLS/RTP/SAVPF 96'",
    ),
    (
        "bad c-line",
        lambda s: s.replace("c=IN IP4 ", "c=IN IPX ", 1),
        "malformed c= line: 'c=IN IPX ",
    ),
    ("no ufrag", lambda s: _drop(s, "a=ice-ufrag:"), "media section 0 (audio) has no a=ice-ufrag"),
    ("no pwd", lambda s: _drop(s, "a=ice-pwd:"), "media section 0 (audio) has no a=ice-pwd"),
    (
        "short ufrag",
        lambda s: s.replace(ice_credentials(s)[0], "abc"),
        "media section 0 (audio) a=ice-ufrag is not 4-256 ice-chars",
    ),
    (
        "ufrag chars",
        lambda s: s.replace(ice_credentials(s)[0], "ab-cd"),
        "media section 0 (audio) a=ice-ufrag is not 4-256 ice-chars",
    ),
    (
        "short pwd",
        lambda s: s.replace(ice_credentials(s)[1], "tooshort"),
        "media section 0 (audio) a=ice-pwd is not 22-256 ice-chars",
    ),
    (
        "no fingerprint",
        lambda s: _drop(s, "a=fingerprint:"),
        "media section 0 (audio) has no a=fingerprint (DTLS is required)",
    ),
    (
        "no setup",
        lambda s: _drop(s, "a=setup:"),
        "media section 0 (audio) a=setup must be one of actpass/active/passive in an offer",
    ),
    (
        "bad setup",
        lambda s: s.replace("a=setup:actpass", "a=setup:holdconn"),
        "media section 0 (audio) a=setup must be one of actpass/active/passive in an offer",
    ),
    ("no rtcp-mux", lambda s: _drop(s, "a=rtcp-mux"), "media section 0 (audio) has no a=rtcp-mux"),
    (
        "ice-lite",
        lambda s: _replace(s, "t=0 0\r\n", "t=0 0\r\na=ice-lite\r\n"),
        "ice-lite offers are not supported: the client must send ICE checks",
    ),
    (
        "two transports",
        lambda s: s[::-1].replace(ice_credentials(s)[0][::-1], "XYZW"[::-1], 1)[::-1],
        "media sections use different ICE credentials (one BUNDLE transport is required)",
    ),
    ("no bundle", lambda s: _drop(s, "a=group:BUNDLE"), "all media sections must be in one a=group:BUNDLE"),
    (
        "partial bundle",
        lambda s: s.replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 0"),
        "all media sections must be in one a=group:BUNDLE",
    ),
    (
        "aiortc parse error",
        lambda s: s.replace("a=rtpmap:96 opus/48000/2", "a=rtpmap:96 opus/fast/2"),
        "SDP could not be parsed: ValueError: invalid literal for int() with base 10: 'fast'",
    ),
    (
        "aiortc assert",
        lambda s: s.replace("UDP/TLS/RTP/SAVPF 96 9 0 8", "UDP/TLS/RTP/SAVPF 96 9 0 8 300"),
        "SDP could not be parsed: AssertionError",
    ),
]


@pytest.mark.parametrize(
    "mutate, message", [(m, msg) for _, m, msg in OFFER_REJECTIONS], ids=[n for n, _, _ in OFFER_REJECTIONS]
)
def test_validate_rejections(real: dict[str, str], mutate, message: str) -> None:
    sdp = mutate(real["offer"])
    with pytest.raises(SdpError) as exc:
        validate(sdp)
    assert str(exc.value).startswith(message)
    assert "\n" not in str(exc.value)


def test_rejected_offers_are_really_unusable(real: dict[str, str]) -> None:
    """These rejections mirror aiortc's own: check aiortc refuses them too.

    The others are relay policy (an offer without media, ice-lite, unbundled,
    RFC 8445 credential lengths...): aiortc may accept them, the relay cannot
    route them, so they are not in this list.
    """
    aiortc_rejects = {
        "bad m-line", "bad c-line", "no ufrag", "no pwd", "aiortc parse error",
        "aiortc assert", "no rtcp-mux",
    }
    mutations = {name: m for name, m, _ in OFFER_REJECTIONS if name in aiortc_rejects}
    assert len(mutations) == len(aiortc_rejects)

    async def check() -> list[str]:
        return [name for name, m in mutations.items() if await _accepts_offer(m(real["offer"]))]

    assert run(check) == []


def test_offer_is_not_an_answer(real: dict[str, str]) -> None:
    with pytest.raises(SdpError) as exc:
        validate(real["offer"], "answer")
    assert str(exc.value) == (
        "media section 0 (audio) a=setup must be one of active/passive in an answer"
    )
    with pytest.raises(ValueError, match="kind must be 'offer' or 'answer'"):
        validate(real["offer"], "pranswer")


def test_validate_is_never_weaker_than_aiortc(real: dict[str, str]) -> None:
    """Drop each line in turn: validate either rejects it or aiortc accepts it."""
    lines = _lines(strip_candidates(real["offer"]))
    variants = ["\r\n".join(lines[:i] + lines[i + 1 :]) + "\r\n" for i in range(len(lines))]

    async def check() -> list[str]:
        accepted_by_us_only = []
        for sdp in variants:
            try:
                validate(sdp)
            except SdpError:
                continue
            if not await _accepts_offer(sdp):
                accepted_by_us_only.append(sdp)
        return accepted_by_us_only

    assert run(check) == []


def test_validate_random_corruption_only_raises_sdp_error(real: dict[str, str]) -> None:
    rng = random.Random(8445)
    offer = real["offer"]
    alphabet = "v=0amcI P4:/ \r\n\x00é-9"
    rejected = 0
    for _ in range(500):
        chars = list(offer)
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(chars))
            op = rng.random()
            if op < 0.4:
                chars[pos] = rng.choice(alphabet)
            elif op < 0.7:
                del chars[pos]
            else:
                chars.insert(pos, rng.choice(alphabet))
        try:
            validate("".join(chars))
        except SdpError as exc:
            assert "\n" not in str(exc)
            rejected += 1
    assert rejected > 100  # the corruption actually exercised the rejections
