"""Reloading relayd's configuration: what changes live on the public
listener (API keys, limits, origins, proxies, the hint key ring), what is
refused by name, and that a refused reload changes nothing. The public app
runs in process with stand-in transceivers (tests/support/signaling.py); the
same reload through SIGHUP and `relayctl reload` on a real relayd is in
tests/netns/test_reload.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from manager.protocol.keyring import KeyRing
from manager.protocol.ufrag import decode_ufrag, encode_ufrag
from manager.relay.config import load_config
from manager.relay.credentials import ClientAuth
from manager.relay.reload import Reloader, ReloadError, ReloadTargets, diff
from manager.relay.signaling import reconfigure
from tests.support.signaling import SDP, relay, run

HINT = "ab" * 32
BASE = """
hint_key_file = "{dir}/hint.key"

[datapath]
interfaces = ["pub0", "tx1"]
vips = [{{ addr = "10.10.1.1", port = 3478 }}]
internal_addr4 = "10.10.0.1"

[client_auth]
mode = "api_keys"
api_keys_file = "{dir}/api.keys"
"""


def secret(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def setup(tmp_path: Path, extra: str = "") -> Path:
    secret(tmp_path / "hint.key", HINT + "\n")
    secret(tmp_path / "api.keys", "key-a\n")
    return secret(tmp_path / "relayd.toml", BASE.format(dir=tmp_path) + extra)


def reloader_for(path: Path, app) -> tuple[Reloader, ClientAuth, KeyRing]:
    cfg = load_config(path, environ={})
    auth = ClientAuth.from_config(cfg.client_auth)
    ring = cfg.hint_ring
    reconfigure(app, limits=cfg.limits, allowed_origins=cfg.signaling.allowed_origins,
                trusted_proxies=cfg.signaling.trusted_proxies)
    return Reloader(path, cfg, ReloadTargets(app, auth, ring, datapath=None)), auth, ring  # type: ignore[arg-type]


def with_key(key: str) -> dict[str, str]:
    return {**SDP, "Authorization": f"Bearer {key}"}


def test_keys_limits_origins_and_proxies_change_live(tmp_path: Path) -> None:
    path = setup(tmp_path)

    async def scenario() -> None:
        cfg = load_config(path, environ={})
        auth = ClientAuth.from_config(cfg.client_auth)
        async with relay(transceivers=1, auth=auth) as env:
            app = env.http.server.app
            reloader = Reloader(path, cfg, ReloadTargets(app, auth, cfg.hint_ring, datapath=None))  # type: ignore[arg-type]
            _, offer = await env.offer()
            assert (await env.http.post("/v1/calls", data=offer, headers=with_key("key-a"))).status == 201
            preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
            assert (await env.http.options("/v1/calls", headers=preflight)).status == 403

            secret(tmp_path / "api.keys", "key-b\n")
            secret(path, path.read_text().replace("[client_auth]", """
[limits]
create_rate = 0.001
create_burst = 1

[signaling]
allowed_origins = ["https://app.example"]
trusted_proxies = ["127.0.0.1/32"]

[client_auth]"""))
            result = await reloader.reload()
            changed = "\n".join(result["changed"])
            for name in ("limits.create_rate", "limits.create_burst", "signaling.allowed_origins",
                         "signaling.trusted_proxies", "client_auth.api_keys: 1 added, 1 removed"):
                assert name in changed, changed
            assert "key-b" not in changed and "key-a" not in changed  # keys never show

            _, offer = await env.offer()
            resp = await env.http.post("/v1/calls", data=offer, headers=with_key("key-a"))
            assert resp.status == 401, await resp.text()
            assert (await env.http.options("/v1/calls", headers=preflight)).status == 204
            # One call per source now, and the trusted proxy's X-Forwarded-For names the source.
            statuses = []
            for client in ("192.0.2.1", "192.0.2.1", "192.0.2.2"):
                _, offer = await env.offer()
                resp = await env.http.post("/v1/calls", data=offer,
                                           headers={**with_key("key-b"), "X-Forwarded-For": client})
                statuses.append(resp.status)
            assert statuses == [201, 429, 201], statuses

    run(scenario)


@pytest.mark.parametrize("old, new, field", [
    ('internal_addr4 = "10.10.0.1"', 'internal_addr4 = "10.10.0.1"\nflow_port_max = 25000', "datapath.flow_port_max"),
    ("[client_auth]", "[signaling]\nport = 8081\n\n[client_auth]", "signaling.port"),
    ('mode = "api_keys"', 'mode = "off"', "client_auth.mode"),
    ("[client_auth]", "[limits]\nsource_prefix_v4 = 24\n\n[client_auth]", "limits.source_prefix_v4"),
])
def test_a_field_that_needs_a_restart_is_refused_by_name(tmp_path: Path, old: str, new: str, field: str) -> None:
    path = setup(tmp_path)
    text = path.read_text().replace(old, new)
    assert text != path.read_text()

    async def scenario() -> None:
        async with relay(transceivers=1) as env:
            reloader, auth, _ = reloader_for(path, env.http.server.app)
            secret(tmp_path / "api.keys", "key-b\n")  # a live change beside it is not applied either
            secret(path, text)
            with pytest.raises(ReloadError) as exc:
                await reloader.reload()
            msg = str(exc.value)
            assert msg.startswith("reload refused, the running configuration stays: ") and "\n" not in msg
            assert f"{field} needs a restart" in msg, msg
            auth.check("Bearer key-a")  # still the running key

    run(scenario)


@pytest.mark.parametrize("breakage, reason", [
    (lambda d: secret(d / "relayd.toml", "[datapath\n"), "not valid TOML"),
    (lambda d: secret(d / "relayd.toml", (d / "relayd.toml").read_text() + "\n[limits]\ncreate_rate = -1\n"),
     "limits.create_rate"),
    (lambda d: (d / "api.keys").chmod(0o644), "lets others read a secret"),
    (lambda d: secret(d / "hint.key", "1 abcd sign\n"), "the key must be at least 16 bytes"),
    (lambda d: secret(d / "api.keys", "# none\n"), "no API key"),
])
def test_a_broken_file_keeps_the_running_configuration(tmp_path: Path, breakage, reason: str) -> None:
    path = setup(tmp_path)

    async def scenario() -> None:
        async with relay(transceivers=1) as env:
            reloader, auth, ring = reloader_for(path, env.http.server.app)
            before = reloader.current
            breakage(tmp_path)
            with pytest.raises(ReloadError) as exc:
                await reloader.reload()
            assert reason in str(exc.value) and "\n" not in str(exc.value), exc.value
            assert "Traceback" not in str(exc.value)
            assert reloader.current is before
            auth.check("Bearer key-a")
            assert ring == KeyRing.single(bytes.fromhex(HINT))

    run(scenario)


def test_the_hint_key_ring_changes_in_place(tmp_path: Path) -> None:
    path = setup(tmp_path)

    async def scenario() -> None:
        async with relay(transceivers=1) as env:
            reloader, _, ring = reloader_for(path, env.http.server.app)
            old = encode_ufrag(ring, 1, 5)
            secret(tmp_path / "hint.key", f"0 {HINT}\n1 {'cd' * 32} sign\n")
            result = await reloader.reload()
            assert result["changed"] == ["hint keys: 0* -> 0,1*"] and result["hint_keys"] == "0,1*"
            new = encode_ufrag(ring, 1, 6)  # the object every component holds now signs with key 1
            assert decode_ufrag(ring, new).key_id == 1 and decode_ufrag(ring, old).key_id == 0
            secret(tmp_path / "hint.key", f"1 {'cd' * 32} sign\n")
            await reloader.reload()
            assert ring.ids == [1]

    run(scenario)


def test_diff_names_fields_and_never_keys(tmp_path: Path) -> None:
    a = load_config(setup(tmp_path), environ={})
    b = load_config(tmp_path / "relayd.toml", environ={"SPLITRELAY__HINT_KEY": "cd" * 32,
                                                      "SPLITRELAY__HINT_KEY_FILE": "null"})
    live, restart = diff(a, b)
    assert restart == []
    assert live == ["hint_key_file: '" + str(tmp_path / "hint.key") + "' -> None", "hint keys: 0* -> 0* (key 0 replaced)"]
    assert not any(HINT in line or "cd" * 32 in line for line in live)


def test_a_refusal_shows_no_password(tmp_path: Path) -> None:
    path = setup(tmp_path)
    a = load_config(path, environ={})
    b = load_config(path, environ={"SPLITRELAY__REGISTRY__BACKEND": "redis",
                                   "SPLITRELAY__REGISTRY__URL": "redis://u:s3cret@10.0.0.9:6379/0"})
    live, restart = diff(a, b)
    assert "registry.url: None -> 'redis://u:***@10.0.0.9:6379/0'" in restart
    assert not any("s3cret" in line for line in live + restart)
