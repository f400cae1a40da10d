"""SDP candidate handling for the relay's signaling (text level, line based).

The relay touches only what routing needs: it strips the client's candidates
from the offer (so the transceiver learns the client only as a peer-reflexive
candidate, through the relay) and replaces the transceiver's candidates in the
answer by the relay's public address(es). Everything else passes through
byte for byte, so codecs, DTLS fingerprints and the rest stay end to end.
Output always uses CRLF line endings (RFC 8866 section 5).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from aioice.candidate import candidate_foundation, candidate_priority
from aiortc.sdp import SessionDescription

from manager.protocol.ufrag import is_ice_ufrag

_CRLF = "\r\n"
# aiortc's own m-line grammar: what it cannot match, it cannot parse.
_MLINE_RE = re.compile(r"^m=([^ ]+) ([0-9]+) ([A-Z/]+) (.+)$")
_CONN_RE = re.compile(r"^c=IN (IP4|IP6) ([^ ]+)$")
# str.splitlines() (used by aiortc) splits on these too; we split only on
# CRLF/LF, so they must not occur or both would see different lines.
_BAD_CHARS_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x85\u2028\u2029]")
# RFC 8445 section 5.3: password = 22*256ice-char
_ICE_PWD_RE = re.compile(r"[A-Za-z0-9+/]{22,256}")
_SETUP_VALUES = {"offer": ("actpass", "active", "passive"), "answer": ("active", "passive")}


class SdpError(ValueError):
    """An SDP that the relay cannot (or will not) hand to a WebRTC endpoint."""


def _lines(sdp: str) -> list[str]:
    lines = re.split(r"\r?\n", sdp)
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _join(lines: list[str]) -> str:
    return _CRLF.join(lines) + _CRLF


def _sections(lines: list[str]) -> tuple[list[str], list[list[str]]]:
    """Split into the session part and one list per media section (m= first)."""
    session: list[str] = []
    media: list[list[str]] = []
    for line in lines:
        if line.startswith("m="):
            media.append([line])
        elif media:
            media[-1].append(line)
        else:
            session.append(line)
    return session, media


def _is_candidate_line(line: str) -> bool:
    return line.startswith("a=candidate:") or line == "a=end-of-candidates"


def _attr(lines: list[str], name: str) -> str | None:
    prefix = f"a={name}:"
    for line in lines:
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    return None


def _has_flag(lines: list[str], name: str) -> bool:
    return any(line == f"a={name}" or line.startswith(f"a={name}:") for line in lines)


def strip_candidates(sdp: str) -> str:
    """Remove every a=candidate and a=end-of-candidates line."""
    return _join([line for line in _lines(sdp) if not _is_candidate_line(line)])


def check_public_addrs(public: Sequence[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """Validate and normalise public (address, port) pairs -> (addr, port, version)."""
    if not public:
        raise ValueError("at least one public address is needed")
    out = []
    for item in public:
        try:
            addr, port = item
            ip = ipaddress.ip_address(addr)
        except (TypeError, ValueError):
            raise ValueError(f"public address {item!r} is not an (IP literal, port) pair") from None
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"public port {port!r} is not in 1..65535")
        out.append((ip.compressed, port, ip.version))
    return out


def _connection_line(addr: str, version: int) -> str:
    return f"c=IN IP{version} {addr}"


# RFC 6544 4.2: local preference = 2^13 * direction-pref + other-pref, passive
# candidates' direction-pref 4: every TCP candidate ranks below every UDP one
# (whose local preference is 65535 - i here).
TCP_PASSIVE_DIRECTION_PREF = 4


def relay_candidates(public: Sequence[tuple[str, int]], tcp: Sequence[tuple[str, int]] = ()) -> list[str]:
    """The relay's candidate lines, as every answer (and an ICE restart's
    answer fragment) carries them: one UDP host candidate per public
    address, one RFC 6544 passive TCP one per `tcp` address (lower
    priority), then a=end-of-candidates."""
    addrs = check_public_addrs(public)
    tcp_addrs = check_public_addrs(tcp) if tcp else []
    return [
        # component 1 only: WebRTC requires rtcp-mux.
        f"a=candidate:{candidate_foundation('host', 'udp', addr)} 1 udp "
        f"{candidate_priority(1, 'host', local_pref=65535 - i)} {addr} {port} typ host"
        for i, (addr, port, _) in enumerate(addrs)
    ] + [
        f"a=candidate:{candidate_foundation('host', 'tcp', addr)} 1 tcp "
        f"{candidate_priority(1, 'host', local_pref=(TCP_PASSIVE_DIRECTION_PREF << 13) + 8191 - i)} "
        f"{addr} {port} typ host tcptype passive"
        for i, (addr, port, _) in enumerate(tcp_addrs)
    ] + ["a=end-of-candidates"]


def rewrite_candidates(sdp: str, public: Sequence[tuple[str, int]],
                       tcp: Sequence[tuple[str, int]] = ()) -> str:
    """Make the relay's public address(es) the only candidates of every media section.

    Each active media section gets one UDP host candidate per public address,
    then one RFC 6544 passive TCP host candidate per `tcp` address (ICE-TCP,
    lower priority), a=end-of-candidates (nothing else will be trickled), and
    its c= line and m-line port set to the first public address. Rejected
    sections (port 0) stay rejected.
    """
    addrs = check_public_addrs(public)
    first_addr, first_port, first_version = addrs[0]
    candidates = relay_candidates(public, tcp)
    conn = _connection_line(first_addr, first_version)

    session, media = _sections(_lines(sdp))
    out = [conn if line.startswith("c=") else line for line in session]
    for section in media:
        m = _MLINE_RE.match(section[0])
        if m is None:
            raise SdpError(f"malformed m= line: {section[0][:80]!r}")
        if m.group(2) == "0":
            out += [line for line in section if not _is_candidate_line(line)]
            continue
        kind, _, proto, fmt = m.groups()
        out.append(f"m={kind} {first_port} {proto} {fmt}")
        body: list[str] = []
        insert_at: int | None = None
        have_conn = False
        for line in section[1:]:
            if _is_candidate_line(line):
                # Candidates go where the old ones were (keeps attribute order).
                if insert_at is None:
                    insert_at = len(body)
            elif line.startswith("c="):
                if not have_conn:
                    body.append(conn)
                    have_conn = True
            else:
                body.append(line)
        if not have_conn:
            # c= follows the m= line and an optional i= line (RFC 8866 5.7).
            pos = 1 if body and body[0].startswith("i=") else 0
            body.insert(pos, conn)
            if insert_at is not None and insert_at >= pos:
                insert_at += 1
        if insert_at is None:
            insert_at = len(body)
        out += body[:insert_at] + candidates + body[insert_at:]
    return _join(out)


def ice_credentials(sdp: str) -> tuple[str, str]:
    """(ufrag, pwd) of the first media section, falling back to session level."""
    session, media = _sections(_lines(sdp))
    if not media:
        raise SdpError("SDP has no media section (m= line)")
    ufrag = _attr(media[0], "ice-ufrag") or _attr(session, "ice-ufrag")
    pwd = _attr(media[0], "ice-pwd") or _attr(session, "ice-pwd")
    if not ufrag:
        raise SdpError("SDP has no a=ice-ufrag")
    if not pwd:
        raise SdpError("SDP has no a=ice-pwd")
    return ufrag, pwd


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]


def validate(sdp: str, kind: str = "offer") -> SessionDescription:
    """Check that `sdp` is an offer/answer the relay can carry; return aiortc's parse.

    Raises SdpError with a one-line reason. Beyond what aiortc itself needs,
    the relay needs one ICE transport per call (one server ufrag, one owner
    address): all media sections BUNDLEd with the same ICE credentials, and a
    full ICE agent on the client side (an ice-lite client never sends the
    binding requests the relay routes on).
    """
    if kind not in _SETUP_VALUES:
        raise ValueError("kind must be 'offer' or 'answer'")
    if not isinstance(sdp, str) or not sdp.strip():
        raise SdpError("SDP is empty")
    if _BAD_CHARS_RE.search(sdp) or re.search(r"\r(?!\n)", sdp):
        raise SdpError("SDP contains control characters")
    lines = _lines(sdp)
    if lines[0] != "v=0":
        raise SdpError("SDP does not start with v=0")
    session, media = _sections(lines)
    if not media:
        raise SdpError("SDP has no media section (m= line)")

    for line in session + [line for section in media for line in section[1:]]:
        if line.startswith("c=") and not _CONN_RE.match(line):
            raise SdpError(f"malformed c= line: {line[:80]!r}")

    credentials = set()
    mids = []
    for index, section in enumerate(media):
        m = _MLINE_RE.match(section[0])
        if m is None:
            raise SdpError(f"malformed m= line: {section[0][:80]!r}")
        where = f"media section {index} ({m.group(1)})"
        ufrag = _attr(section, "ice-ufrag") or _attr(session, "ice-ufrag")
        pwd = _attr(section, "ice-pwd") or _attr(session, "ice-pwd")
        if not ufrag:
            raise SdpError(f"{where} has no a=ice-ufrag")
        if not pwd:
            raise SdpError(f"{where} has no a=ice-pwd")
        if not is_ice_ufrag(ufrag):
            raise SdpError(f"{where} a=ice-ufrag is not 4-256 ice-chars")
        if not _ICE_PWD_RE.fullmatch(pwd):
            raise SdpError(f"{where} a=ice-pwd is not 22-256 ice-chars")
        credentials.add((ufrag, pwd))
        if not (_has_flag(section, "fingerprint") or _has_flag(session, "fingerprint")):
            raise SdpError(f"{where} has no a=fingerprint (DTLS is required)")
        setup = _attr(section, "setup") or _attr(session, "setup")
        if setup not in _SETUP_VALUES[kind]:
            allowed = "/".join(_SETUP_VALUES[kind])
            raise SdpError(f"{where} a=setup must be one of {allowed} in an {kind}")
        if m.group(1) in ("audio", "video") and not _has_flag(section, "rtcp-mux"):
            raise SdpError(f"{where} has no a=rtcp-mux")
        mids.append(_attr(section, "mid"))

    all_lines = session + [line for section in media for line in section]
    if kind == "offer" and _has_flag(all_lines, "ice-lite"):
        raise SdpError("ice-lite offers are not supported: the client must send ICE checks")
    if len(credentials) > 1:
        raise SdpError(
            "media sections use different ICE credentials (one BUNDLE transport is required)"
        )
    if len(media) > 1:
        groups = [line.split()[1:] for line in session if line.split()[:1] == ["a=group:BUNDLE"]]
        if None in mids or not any(set(mids) <= set(group) for group in groups):
            raise SdpError("all media sections must be in one a=group:BUNDLE")

    try:
        return SessionDescription.parse(_join(lines))
    except Exception as exc:  # aiortc raises assorted errors (assert, IndexError...)
        detail = _one_line(f"{type(exc).__name__}: {exc}").rstrip(": ")
        raise SdpError(f"SDP could not be parsed: {detail}") from None
