"""relayd configuration: files, environment overrides, and errors that name
the field, the value and the reason (never a traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from manager.relay.config import ConfigError, load_config
from tests.support.paths import REPO

GOOD = """
hint_key = "00112233445566778899aabbccddeeff"

[datapath]
interfaces = ["pub0", "tx1"]
vips = [{ addr = "10.10.1.1", port = 3478 }]
internal_addr4 = "10.10.0.1"
"""


def write(tmp_path: Path, text: str, name: str = "relayd.toml", mode: int = 0o600) -> Path:
    p = tmp_path / name
    p.write_text(text)
    p.chmod(mode)  # it holds a key
    return p


def test_good_file_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), environ={})
    assert cfg.datapath.vips[0].as_tuple() == ("10.10.1.1", 3478)
    assert cfg.datapath.max_flows >= 1 << 20  # the flow map holds at least 1M by default
    assert cfg.signaling.port == 8080 and cfg.detach_on_exit is False
    assert cfg.hint_key_bytes == bytes.fromhex("00112233445566778899aabbccddeeff")


def test_environment_overrides_the_file(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), environ={
        "SPLITRELAY__SIGNALING__PORT": "9090",
        "SPLITRELAY__DATAPATH__INTERFACES": '["eth9"]',
        "SPLITRELAY__DETACH_ON_EXIT": "true",
    })
    assert cfg.signaling.port == 9090
    assert cfg.datapath.interfaces == ["eth9"]
    assert cfg.detach_on_exit is True


def test_yaml_file(tmp_path):
    pytest.importorskip("yaml")
    text = ('hint_key: "00112233445566778899aabbccddeeff"\n'
            "datapath:\n  vips: [{addr: 'fd00::1', port: 3478}]\n  internal_addr6: 'fd00::2'\n")
    cfg = load_config(write(tmp_path, text, "relayd.yaml"), environ={})
    assert cfg.datapath.vips[0].family == 10


@pytest.mark.parametrize("override, expected", [
    ({"SPLITRELAY__SIGNALING__PORT": "70000"}, "signaling.port: 70000: Input should be less than or equal to 65535"),
    ({"SPLITRELAY__HINT_KEY": "abc"}, "hint_key: 'abc': must be hexadecimal"),
    ({"SPLITRELAY__HINT_KEY": "00ff"}, "hint_key: '00ff': must be at least 16 bytes (32 hex digits), got 2 bytes"),
    ({"SPLITRELAY__DATAPATH__PIN_DIR": "/tmp/x"},
     "datapath.pin_dir: '/tmp/x': must be a directory under /sys/fs/bpf (bpffs), got /tmp/x"),
    ({"SPLITRELAY__DATAPATH__PIN_DIR": "/sys/fs/bpf/../../../tmp/x"},
     "datapath.pin_dir: '/sys/fs/bpf/../../../tmp/x': must be a directory under /sys/fs/bpf (bpffs), "
     "got /sys/fs/bpf/../../../tmp/x (resolves to /tmp/x)"),
    ({"SPLITRELAY__DATAPATH__PIN_DIR": "/sys/fs/bpf/.."},
     "datapath.pin_dir: '/sys/fs/bpf/..': must be a directory under /sys/fs/bpf (bpffs), got /sys/fs/bpf/.. "
     "(resolves to /sys/fs)"),
    ({"SPLITRELAY__LIMITS__SOURCE_PREFIX_V6": "129"},
     "limits.source_prefix_v6: 129: Input should be less than or equal to 128"),
    ({"SPLITRELAY__DATAPATH__INTERNAL_ADDR4": "fd00::1"}, "datapath.internal_addr4: 'fd00::1': not an IPv4 address"),
    ({"SPLITRELAY__DATAPATH__FLOW_PORT_MIN": "3000", "SPLITRELAY__DATAPATH__FLOW_PORT_MAX": "4000"},
     "VIP port 3478 lies inside the flow-port range"),
    ({"SPLITRELAY__DATAPATH__XDP_MODE": "turbo"}, "datapath.xdp_mode: 'turbo': Input should be 'auto', 'native' or 'generic'"),
    ({"SPLITRELAY__SIGNALING__BOGUS": "1"}, "signaling.bogus: 1: Extra inputs are not permitted"),
    ({"SPLITRELAY__TCP__MAX_FRAME": "100"}, "tcp.max_frame: 100: Input should be greater than or equal to 576"),
    ({"SPLITRELAY__TCP__PORT": "70000"}, "tcp.port: 70000: Input should be less than or equal to 65535"),
])
def test_invalid_values_name_field_value_reason(tmp_path, override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD), environ=override)
    assert expected in str(info.value)


def test_missing_and_unreadable(tmp_path):
    with pytest.raises(ConfigError, match="datapath: required field is missing"):
        load_config(write(tmp_path, 'hint_key = "00112233445566778899aabbccddeeff"\n'), environ={})
    with pytest.raises(ConfigError, match="give the routing-hint key as hint_key_file"):
        load_config(write(tmp_path, GOOD.replace('hint_key = "00112233445566778899aabbccddeeff"', "")), environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml", environ={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "hint_key = \n"), environ={})


def test_relayd_rejects_bad_config_in_one_message(tmp_path):
    bad = write(tmp_path, GOOD.replace("3478", "0"))
    proc = subprocess.run([sys.executable, "-m", "cli.relayd", "-c", str(bad)], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "datapath.vips.0.port: 0: Input should be greater than or equal to 1" in proc.stderr


# -- keys and secrets ----------------------------------------------------------------


def test_the_example_key_is_refused(tmp_path):
    example = (REPO / "docs" / "relayd.example.toml").read_text()
    key = next(line.split('"')[1] for line in example.splitlines() if line.startswith("#   hint_key ="))
    with pytest.raises(ConfigError, match="is the example key from docs/relayd.example.toml"):
        load_config(write(tmp_path, GOOD), environ={"SPLITRELAY__HINT_KEY": key})
    with pytest.raises(ConfigError, match="is the example key"):
        load_config(write(tmp_path, GOOD), environ={"SPLITRELAY__HINT_KEY": key.upper()})


def test_a_readable_config_holding_the_key_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"holds hint_key but its mode 0644 lets others read it"):
        load_config(write(tmp_path, GOOD, mode=0o644), environ={})


def test_hint_key_file(tmp_path):
    key = tmp_path / "hint.key"
    key.write_text("ab" * 32 + "\n")
    key.chmod(0o600)
    text = GOOD.replace('hint_key = "00112233445566778899aabbccddeeff"', f'hint_key_file = "{key}"')
    cfg = load_config(write(tmp_path, text, mode=0o644), environ={})  # no secret in the config itself
    assert cfg.hint_key_bytes == bytes.fromhex("ab" * 32)
    key.chmod(0o640)
    with pytest.raises(ConfigError, match=r"hint.key: mode 0640 lets others read a secret; chmod 600 it"):
        load_config(write(tmp_path, text), environ={})
    key.chmod(0o600)
    with pytest.raises(ConfigError, match="exactly one of them"):
        load_config(write(tmp_path, text), environ={"SPLITRELAY__HINT_KEY": "cd" * 32})


def test_metrics_default_to_the_internal_address(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), environ={"SPLITRELAY__INTERNAL__HOST": "10.1.2.3"})
    assert cfg.metrics_host == "10.1.2.3"
    assert cfg.internal.allows("10.9.9.9") and not cfg.internal.allows("8.8.8.8")


def test_client_auth_needs_its_key_file(tmp_path):
    with pytest.raises(ConfigError, match="token_key_file: needed with mode = 'tokens'"):
        load_config(write(tmp_path, GOOD), environ={"SPLITRELAY__CLIENT_AUTH__MODE": "tokens"})


def test_pin_dir_is_resolved_before_it_is_checked(tmp_path):
    """A symlink under /sys/fs/bpf is followed: where it leads is what counts."""
    from manager.relay.config import DatapathConfig

    assert DatapathConfig(pin_dir="/sys/fs/bpf/a/../splitrelay").pin_dir == Path("/sys/fs/bpf/splitrelay")
    link = tmp_path / "link"
    link.symlink_to("/tmp")
    with pytest.raises(ValueError, match="resolves to /tmp"):
        DatapathConfig(pin_dir=f"/sys/fs/bpf/../../..{link}/x")


def test_source_prefixes_and_trusted_proxies(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), environ={})
    assert (cfg.limits.source_prefix_v4, cfg.limits.source_prefix_v6) == (32, 64)
    assert cfg.limits.source_key()("2001:db8:1:2::7") == "2001:db8:1:2::/64"
    assert cfg.signaling.trusted_proxies == []
    cfg = load_config(write(tmp_path, GOOD + '[limits]\nsource_prefix_v6 = 56\n'
                                             '[signaling]\ntrusted_proxies = ["10.0.0.1", "fd00::/64"]\n'),
                      environ={})
    assert cfg.limits.source_key()("2001:db8:1:2::7") == "2001:db8:1::/56"
    assert cfg.signaling.trusted_proxies == ["10.0.0.1/32", "fd00::/64"]
    with pytest.raises(ConfigError, match=r"signaling.trusted_proxies: \['nope'\]: not an address or prefix: 'nope'"):
        load_config(write(tmp_path, GOOD + '[signaling]\ntrusted_proxies = ["nope"]\n'), environ={})
    with pytest.raises(ConfigError, match="limits.source_prefix_v6: 129"):
        load_config(write(tmp_path, GOOD + '[limits]\nsource_prefix_v6 = 129\n'), environ={})


def test_client_auth_off_on_a_public_vip_is_warned_about(tmp_path):
    lab = load_config(write(tmp_path, GOOD), environ={})
    assert lab.start_warnings() == []  # private VIPs: a lab
    public = GOOD.replace('"10.10.1.1"', '"5.6.7.8"').replace('"pub0", "tx1"', '"eth0"')
    (warning,) = load_config(write(tmp_path, public), environ={}).start_warnings()
    assert warning.startswith("client_auth.mode = 'off' on public VIP 5.6.7.8: anyone who reaches")
    key = tmp_path / "token.key"
    key.write_text("00" * 32)
    key.chmod(0o600)
    guarded = public + f'[client_auth]\nmode = "tokens"\ntoken_key_file = "{key}"\n'
    assert load_config(write(tmp_path, guarded), environ={}).start_warnings() == []
