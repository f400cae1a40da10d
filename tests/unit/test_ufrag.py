"""Routing hints in the server ufrag: round trips, every rejection, tamper fuzz."""

from __future__ import annotations

import base64
import hmac
import re
import string

import pytest
from aioice import stun

from manager.protocol.keyring import KeyRing
from manager.protocol.ufrag import (
    HINT_LENGTH,
    ICE_CHARS,
    UFRAG_LENGTH,
    RoutingHint,
    UfragError,
    decode_ufrag,
    encode_ufrag,
    is_ice_ufrag,
    parse_stun_username,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NONCE = b"\x02\x03\x04"

# RFC 8445 section 5.3 / RFC 5234, written independently of the module:
#   ice-char = ALPHA / DIGIT / "+" / "/" ; ufrag = 4*256ice-char
RFC8445_UFRAG = re.compile(r"[A-Za-z0-9+/]{4,256}")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# -- round trips ------------------------------------------------------------


@pytest.mark.parametrize(
    "transceiver_id, conn_id",
    [(1, 1), (65535, 0xFFFFFFFF), (7, 123456), (0x1234, 0xDEADBEEF)],
)
def test_round_trip(transceiver_id: int, conn_id: int) -> None:
    ufrag = encode_ufrag(KEY, transceiver_id, conn_id, nonce=NONCE)
    assert decode_ufrag(KEY, ufrag) == RoutingHint(
        version=1, transceiver_id=transceiver_id, conn_id=conn_id, nonce=NONCE
    )


def test_layout_is_exact() -> None:
    ufrag = encode_ufrag(KeyRing({5: KEY}), 0x0102, 0x03040506, nonce=b"\xbb\xcc\xdd")
    raw = base64.b64decode(ufrag, validate=True)
    assert len(ufrag) == UFRAG_LENGTH == 24
    assert len(raw) == HINT_LENGTH == 18
    assert "=" not in ufrag
    # version, transceiver id, connection id, key id, nonce
    assert raw[:11] == bytes.fromhex("01 0102 03040506 05 bbccdd")


def test_random_nonce_differs_and_decodes() -> None:
    ufrags = {encode_ufrag(KEY, 3, 99) for _ in range(64)}
    # 24 bits of nonce: 64 distinct ufrags, or the nonce is not random.
    assert len(ufrags) == 64
    nonces = {decode_ufrag(KEY, u).nonce for u in ufrags}
    assert len(nonces) == 64
    assert all(decode_ufrag(KEY, u).conn_id == 99 for u in ufrags)


def test_ufrag_satisfies_rfc8445_grammar() -> None:
    for i in range(200):
        ufrag = encode_ufrag(KEY, 1 + i % 65535, 1 + i * 7919)
        assert RFC8445_UFRAG.fullmatch(ufrag), ufrag
        assert is_ice_ufrag(ufrag)


def test_base64_alphabet_is_exactly_ice_chars() -> None:
    # Every 6-bit value maps to an ice-char and every ice-char is used.
    every_sextet = "".join(_b64(bytes([b0, b1, b2])) for b0, b1, b2 in _all_sextets())
    assert set(every_sextet) == ICE_CHARS
    assert set(string.ascii_letters + string.digits + "+/") == ICE_CHARS
    assert RFC8445_UFRAG.fullmatch("".join(sorted(ICE_CHARS)))


def _all_sextets() -> list[tuple[int, int, int]]:
    # Three bytes whose base64 is four copies of sextet s.
    out = []
    for s in range(64):
        v = (s << 18) | (s << 12) | (s << 6) | s
        out.append(((v >> 16) & 0xFF, (v >> 8) & 0xFF, v & 0xFF))
    return out


def test_stun_username_carries_the_hint() -> None:
    # The hint survives a real STUN binding request round trip (aioice).
    server = encode_ufrag(KEY, 42, 4242)
    request = stun.Message(
        message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST
    )
    request.attributes["USERNAME"] = f"{server}:Ab3+"
    request.add_message_integrity(b"password")
    parsed = stun.parse_message(bytes(request))
    server_ufrag, client_ufrag = parse_stun_username(parsed.attributes["USERNAME"])
    assert client_ufrag == "Ab3+"
    hint = decode_ufrag(KEY, server_ufrag)
    assert (hint.transceiver_id, hint.conn_id) == (42, 4242)


# -- encode rejections ------------------------------------------------------


@pytest.mark.parametrize(
    "transceiver_id, conn_id, message",
    [
        (0, 1, "transceiver id must be in 1..65535"),
        (65536, 1, "transceiver id must be in 1..65535"),
        (-1, 1, "transceiver id must be in 1..65535"),
        (True, 1, "transceiver id must be an integer"),
        ("1", 1, "transceiver id must be an integer"),
        (1, 0, "connection id must be in 1..4294967295"),
        (1, 1 << 32, "connection id must be in 1..4294967295"),
        (1, 1.0, "connection id must be an integer"),
    ],
)
def test_encode_rejects_bad_ids(transceiver_id, conn_id, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        encode_ufrag(KEY, transceiver_id, conn_id)
    assert str(exc.value) == message


def test_encode_rejects_bad_nonce() -> None:
    with pytest.raises(ValueError) as exc:
        encode_ufrag(KEY, 1, 1, nonce=b"\x00" * 4)
    assert str(exc.value) == "nonce must be 3 bytes"


@pytest.mark.parametrize("key", [b"", b"x" * 15, "a string key of enough length"])
def test_short_or_wrong_key_rejected(key) -> None:
    with pytest.raises(ValueError) as exc:
        encode_ufrag(key, 1, 1)
    assert str(exc.value) == "hint key must be at least 16 bytes"
    assert not isinstance(exc.value, UfragError)  # config error, not a bad packet
    with pytest.raises(ValueError) as exc:
        decode_ufrag(key, encode_ufrag(KEY, 1, 1))
    assert str(exc.value) == "hint key must be at least 16 bytes"


# -- decode rejections ------------------------------------------------------


def _forge(body: bytes, mac: bytes = b"\x00" * 7) -> str:
    return _b64(body + mac)


@pytest.mark.parametrize(
    "ufrag, message",
    [
        ("", "ufrag length is not 24 characters"),
        ("abcd", "ufrag length is not 24 characters"),
        ("A" * 23, "ufrag length is not 24 characters"),
        ("A" * 25, "ufrag length is not 24 characters"),
        ("A" * 22 + "==", "ufrag contains characters outside ice-chars"),
        ("A" * 23 + "-", "ufrag contains characters outside ice-chars"),
        ("A" * 23 + "_", "ufrag contains characters outside ice-chars"),
        ("A" * 23 + "\n", "ufrag contains characters outside ice-chars"),
        ("A" * 23 + "é", "ufrag contains characters outside ice-chars"),
        ("A" * 23 + "٣", "ufrag contains characters outside ice-chars"),  # non-ASCII digit
        (_forge(bytes([2]) + bytes(10)), "ufrag has unknown version"),
        (_forge(bytes([0]) + bytes(10)), "ufrag has unknown version"),
        (_forge(bytes([1, 0, 1, 0, 0, 0, 1, 0]) + NONCE), "ufrag MAC does not match"),
    ],
)
def test_decode_rejections(ufrag: str, message: str) -> None:
    with pytest.raises(UfragError) as exc:
        decode_ufrag(KEY, ufrag)
    assert str(exc.value) == message


def test_decode_rejects_non_string() -> None:
    with pytest.raises(UfragError) as exc:
        decode_ufrag(KEY, b"A" * 24)  # type: ignore[arg-type]
    assert str(exc.value) == "ufrag must be a string"


def test_other_key_rejected() -> None:
    ufrag = encode_ufrag(KEY, 5, 6)
    with pytest.raises(UfragError) as exc:
        decode_ufrag(OTHER_KEY, ufrag)
    assert str(exc.value) == "ufrag MAC does not match"


def test_swapped_fields_with_valid_mac_for_other_fields_rejected() -> None:
    # Re-using a genuine MAC with different routing fields must fail.
    genuine = base64.b64decode(encode_ufrag(KEY, 5, 6, nonce=NONCE))
    body, mac = genuine[:11], genuine[11:]
    tampered = body[:1] + (9).to_bytes(2, "big") + body[3:]
    with pytest.raises(UfragError, match="^ufrag MAC does not match$"):
        decode_ufrag(KEY, _forge(tampered, mac))


def test_every_single_bit_flip_is_rejected() -> None:
    """Flip each bit of each character: the result is never accepted."""
    ufrag = encode_ufrag(KEY, 0x0A0B, 0x0C0D0E0F, nonce=NONCE)
    tried = 0
    for pos in range(len(ufrag)):
        for bit in range(8):
            flipped = chr(ord(ufrag[pos]) ^ (1 << bit))
            candidate = ufrag[:pos] + flipped + ufrag[pos + 1 :]
            with pytest.raises(UfragError):
                decode_ufrag(KEY, candidate)
            tried += 1
    assert tried == 24 * 8


def test_every_single_char_substitution_is_rejected() -> None:
    """Replace each character by every other ice-char: always rejected."""
    ufrag = encode_ufrag(KEY, 77, 0x01020304, nonce=NONCE)
    rejected = 0
    for pos in range(len(ufrag)):
        for char in sorted(ICE_CHARS - {ufrag[pos]}):
            candidate = ufrag[:pos] + char + ufrag[pos + 1 :]
            with pytest.raises(UfragError) as exc:
                decode_ufrag(KEY, candidate)
            assert str(exc.value) in ("ufrag MAC does not match", "ufrag has unknown version")
            rejected += 1
    assert rejected == 24 * 63


def test_every_single_byte_bit_flip_in_decoded_hint_is_rejected() -> None:
    raw = base64.b64decode(encode_ufrag(KEY, 300, 70000, nonce=NONCE))
    for i in range(len(raw) * 8):
        mutated = bytearray(raw)
        mutated[i // 8] ^= 1 << (i % 8)
        with pytest.raises(UfragError):
            decode_ufrag(KEY, _b64(bytes(mutated)))


# -- STUN USERNAME ----------------------------------------------------------


def test_parse_stun_username() -> None:
    server = encode_ufrag(KEY, 1, 2)
    assert parse_stun_username(f"{server}:abcd") == (server, "abcd")
    assert parse_stun_username("wxyz:a+/9") == ("wxyz", "a+/9")


@pytest.mark.parametrize(
    "username, message",
    [
        ("abcdefgh", "STUN USERNAME has no ':' separator"),
        ("", "STUN USERNAME has no ':' separator"),
        ("abcd:efgh:ijkl", "STUN USERNAME has more than one ':' separator"),
        (":abcd", "STUN USERNAME server ufrag is not 4-256 ice-chars"),
        ("abc:abcd", "STUN USERNAME server ufrag is not 4-256 ice-chars"),
        ("a" * 257 + ":abcd", "STUN USERNAME server ufrag is not 4-256 ice-chars"),
        ("ab-d:abcd", "STUN USERNAME server ufrag is not 4-256 ice-chars"),
        ("abcd:", "STUN USERNAME client ufrag is not 4-256 ice-chars"),
        ("abcd:ab d", "STUN USERNAME client ufrag is not 4-256 ice-chars"),
        ("abcd:abcd\n", "STUN USERNAME client ufrag is not 4-256 ice-chars"),
    ],
)
def test_parse_stun_username_rejections(username: str, message: str) -> None:
    with pytest.raises(UfragError) as exc:
        parse_stun_username(username)
    assert str(exc.value) == message


def test_parse_stun_username_accepts_max_length() -> None:
    assert parse_stun_username("a" * 256 + ":" + "b" * 4) == ("a" * 256, "bbbb")


# -- key ids (rotation) -------------------------------------------------------


def test_the_key_id_travels_and_picks_the_key() -> None:
    old, new = KeyRing({1: KEY}), KeyRing({1: KEY, 2: OTHER_KEY}, signing=2)
    minted_old, minted_new = encode_ufrag(old, 3, 9), encode_ufrag(new, 3, 10)
    assert decode_ufrag(new, minted_old).key_id == 1  # every listed key verifies
    assert decode_ufrag(new, minted_new).key_id == 2  # the newest signs
    assert base64.b64decode(minted_new)[7] == 2
    # The id is on the wire: the same key under another id does not verify it.
    with pytest.raises(UfragError, match="key id 2 is not in the key ring"):
        decode_ufrag(KeyRing({7: OTHER_KEY}), minted_new)


def test_a_retired_key_is_refused() -> None:
    ring = KeyRing({1: KEY, 2: OTHER_KEY}, signing=2)
    minted = encode_ufrag(ring, 3, 9, nonce=NONCE)
    ring.replace(ring.signing_with(1))
    assert decode_ufrag(ring, minted).conn_id == 9
    ring.replace(ring.retired(2))
    with pytest.raises(UfragError, match="key id 2 is not in the key ring"):
        decode_ufrag(ring, minted)


def test_another_key_under_a_known_id_fails_the_mac() -> None:
    minted = encode_ufrag(KeyRing({3: KEY}), 3, 9)
    with pytest.raises(UfragError, match="MAC does not match"):
        decode_ufrag(KeyRing({3: OTHER_KEY}), minted)


def _legacy_ufrag(key: bytes, id_byte: int) -> str:
    """A ufrag as minted before key ids: 4 random nonce bytes where the id now is."""
    body = bytes([1, 0, 3, 0, 0, 0, 9, id_byte]) + NONCE
    mac = hmac.new(key, b"splitrelay/ufrag/v1\x00" + body, "sha256").digest()[:7]
    return _b64(body + mac)


@pytest.mark.parametrize("id_byte", [0, 2, 77])
def test_ufrags_from_before_key_ids_verify_with_the_legacy_key(id_byte: int) -> None:
    ring = KeyRing({0: KEY, 2: OTHER_KEY}, signing=2)  # key 0: the plain key file's, before rotation
    assert decode_ufrag(ring, _legacy_ufrag(KEY, id_byte)).key_id == 0
    ring.replace(ring.retired(0))
    with pytest.raises(UfragError):
        decode_ufrag(ring, _legacy_ufrag(KEY, id_byte))
    # A bare key is the ring {0: key}: what every caller before rings passed.
    assert decode_ufrag(KEY, _legacy_ufrag(KEY, id_byte)).conn_id == 9
