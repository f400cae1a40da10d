"""SDP fragments (`application/trickle-ice-sdpfrag`, RFC 8840) as WHIP
clients PATCH them: ICE credentials, candidates, end-of-candidates, grouped
under the media sections they belong to. Parsed only as far as the relay
acts on them; anything malformed is a FragmentError naming the line."""

from __future__ import annotations

from dataclasses import dataclass, field

from aioice import Candidate

MAX_CANDIDATES = 64  # a client gathers a handful per interface; more is noise or an attack


class FragmentError(ValueError):
    """The fragment is not one the relay can act on (one line, no SDP echoed back)."""


@dataclass
class Fragment:
    ufrag: str | None = None
    pwd: str | None = None
    candidates: list[Candidate] = field(default_factory=list)
    end_of_candidates: bool = False
    mids: list[str] = field(default_factory=list)


def _set_once(current: str | None, value: str, name: str) -> str:
    if current is not None and current != value:
        raise FragmentError(f"the fragment carries two different {name} values")
    return value


def parse_fragment(text: str) -> Fragment:
    """The fragment's ICE content; FragmentError if a line is malformed.
    A fragment with no ufrag is returned as such (the caller refuses it)."""
    frag = Fragment()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if len(line) < 2 or line[1] != "=":
            raise FragmentError(f"line {number} is not an SDP line")
        if line.startswith("a=ice-ufrag:"):
            frag.ufrag = _set_once(frag.ufrag, line[len("a=ice-ufrag:"):], "ice-ufrag")
        elif line.startswith("a=ice-pwd:"):
            frag.pwd = _set_once(frag.pwd, line[len("a=ice-pwd:"):], "ice-pwd")
        elif line.startswith("a=candidate:"):
            if len(frag.candidates) >= MAX_CANDIDATES:
                raise FragmentError(f"more than {MAX_CANDIDATES} candidates in one fragment")
            try:
                frag.candidates.append(Candidate.from_sdp(line[len("a=candidate:"):]))
            except (ValueError, IndexError):
                raise FragmentError(f"line {number}: malformed candidate") from None
        elif line == "a=end-of-candidates":
            frag.end_of_candidates = True
        elif line.startswith("a=mid:"):
            frag.mids.append(line[len("a=mid:"):])
        # m=, a=ice-options and the like: structure the relay has no use for.
    if frag.ufrag is not None and not frag.ufrag:
        raise FragmentError("a=ice-ufrag is empty")
    return frag
