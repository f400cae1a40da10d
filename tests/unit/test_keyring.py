"""Key rings: their text form, the rotation steps, and `relayctl keys` on a
ring file (add, sign, retire, list; --json), as an operator runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.relayctl import main
from manager.protocol.client_auth import verify_token
from manager.protocol.keyring import KeyRing, fingerprint, parse_ring

A, B = bytes(range(32)), bytes(range(1, 33))


def test_text_round_trip_and_the_plain_key_form() -> None:
    ring = KeyRing({1: A, 2: B}, signing=1)
    assert parse_ring(ring.to_text(), min_length=16, what="f") == ring
    assert parse_ring(A.hex() + "\n", min_length=16, what="f") == KeyRing({0: A})  # before key ids
    # With no line saying sign, the newest signs.
    assert parse_ring(f"# c\n\n1 {A.hex()}\n7 {B.hex()}\n", min_length=16, what="f").signing_id == 7


@pytest.mark.parametrize("text, message", [
    ("", "f: no key"),
    ("zz", "f: the key: the key must be hexadecimal"),
    ("abcd", "f: the key: the key must be at least 16 bytes (32 hex digits), got 2"),
    (f"1 {A.hex()}\n1 {B.hex()}", "f: line 2: key id 1 is listed twice"),
    (f"300 {A.hex()}", "f: line 1: key id 300 is outside 0..255"),
    (f"1 {A.hex()} sign\n2 {B.hex()} sign", "f: keys 1 and 2 both say 'sign'; one key signs"),
    (f"1 {A.hex()} signs", "f: line 1: expected '<id> <hex key> [sign]'"),
])
def test_bad_rings_are_named(text: str, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_ring(text, min_length=16, what="f")
    assert str(exc.value) == message


def test_rotation_steps() -> None:
    ring = KeyRing({0: A})
    added = ring.added(B, sign=False)
    assert added.ids == [0, 1] and added.signing_id == 0
    assert added.signing_with(1).signing_id == 1
    with pytest.raises(ValueError, match="key 0 signs: make another key sign first"):
        added.retired(0)
    assert added.signing_with(1).retired(0).ids == [1]
    with pytest.raises(ValueError, match="no key 9 in the ring"):
        added.retired(9)
    # Ids wrap past 255 to the lowest free one.
    assert KeyRing({255: A}).next_id() == 1 and KeyRing({3: A, 255: B}).next_id() == 1


def keys(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return res.exit_code, res.output


def test_relayctl_keys_rotates_a_ring_file(tmp_path: Path) -> None:
    f = tmp_path / "token.key"
    f.write_text(A.hex() + "\n")
    f.chmod(0o600)
    code, out = keys("keys", "add", "token", "--file", str(f), "--no-sign", "--json")
    assert code == 0, out
    listed = json.loads(out)
    assert listed["signing"] == 0 and [k["id"] for k in listed["keys"]] == [0, 1]
    assert listed["keys"][0]["fingerprint"] == fingerprint(A) and A.hex() not in out  # never the key
    assert f.stat().st_mode & 0o777 == 0o600
    code, out = keys("keys", "sign", "token", "1", "--file", str(f))
    assert code == 0 and "token key 1 signs; apply it: relayctl reload" in out, out
    ring = parse_ring(f.read_text(), min_length=32, what="f")
    code, out = keys("token", "--key-file", str(f), "--json")
    assert verify_token(ring, json.loads(out)["token"]).subject == "" and json.loads(out)["kid"] == 1
    code, out = keys("keys", "retire", "token", "1", "--file", str(f))
    assert code == 1 and "key 1 signs: make another key sign first" in out, out
    code, out = keys("keys", "retire", "token", "0", "--file", str(f))
    assert code == 0, out
    code, out = keys("keys", "list", "token", "--file", str(f))
    assert out.splitlines()[1].split()[:2] == ["1", "yes"] and len(out.splitlines()) == 2, out


def test_relayctl_keys_refuses_a_readable_file_and_names_a_missing_one(tmp_path: Path) -> None:
    f = tmp_path / "hint.key"
    f.write_text(A.hex() + "\n")
    f.chmod(0o644)
    code, out = keys("keys", "add", "hint", "--file", str(f))
    assert code == 1 and "lets others read a secret; chmod 600 it" in out, out
    code, out = keys("keys", "list", "hint")
    assert code == 1 and "no hint key file: give --file, or a config (-c) whose hint_key_file is set" in out


def test_a_transceiver_follows_its_key_file(tmp_path: Path, caplog) -> None:
    """What a transceiver reads (pki.read_hint_key): the file again once it
    changed, and the last good ring while a changed file is broken."""
    from manager import pki

    f = tmp_path / "hint.key"
    f.write_text(A.hex() + "\n")
    f.chmod(0o600)
    keys_file = pki.read_hint_key(f, {})
    assert keys_file() == KeyRing({0: A})
    replacement = tmp_path / "new"  # a rename, as relayctl keys and a Kubernetes secret update do
    replacement.write_text(KeyRing({0: A, 1: B}, signing=1).to_text())
    replacement.chmod(0o600)
    replacement.rename(f)
    assert keys_file().signing_id == 1
    f.write_text("1 nothex sign\n")
    assert keys_file().ids == [0, 1]  # kept
    assert "hint.key: line 1: expected '<id> <hex key> [sign]'; keeping the keys read before" in caplog.text
    with pytest.raises(ValueError, match="no routing-hint key"):
        pki.read_hint_key(None, {})
    assert pki.read_hint_key(None, {"SPLITRELAY_HINT_KEY": A.hex()}) == KeyRing({0: A})
