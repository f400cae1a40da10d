"""relayd's flow ports against the kernel's ephemeral range (the ranges
passed in; tests/netns/test_port_range_refusal.py runs relayd against a
namespace's own sysctls)."""

from __future__ import annotations

import pytest

from manager.relay.config import DatapathConfig
from manager.relay.port_ranges import (
    PortRangeError,
    check_flow_ports,
    parse_port_range,
    parse_reserved_ports,
    unreserved_overlap,
)

LINUX = (32768, 60999)


def test_the_sysctl_formats_parse() -> None:
    assert parse_port_range("32768\t60999\n") == LINUX
    assert parse_reserved_ports("\n") == []
    assert parse_reserved_ports("8080,20000-39999\n") == [(8080, 8080), (20000, 39999)]


def test_the_old_default_is_refused_naming_both_ranges() -> None:
    with pytest.raises(PortRangeError) as exc:
        check_flow_ports((20000, 59999), LINUX, [])
    msg = str(exc.value)
    assert "20000-59999" in msg and "32768-60999" in msg and "\n" not in msg


def test_the_default_range_is_outside_linux_and_nodeports() -> None:
    cfg = DatapathConfig()
    flow = (cfg.flow_port_min, cfg.flow_port_max)
    check_flow_ports(flow, LINUX, [])
    assert flow[1] < 30000  # Kubernetes' NodePorts: 30000-32767


@pytest.mark.parametrize(("flow", "ephemeral"), [
    ((10000, 29999), LINUX), ((61000, 65000), LINUX), ((32768, 32768), (1024, 32767))])
def test_disjoint_ranges_pass(flow, ephemeral) -> None:
    check_flow_ports(flow, ephemeral, [])


@pytest.mark.parametrize("flow", [(32768, 32768), (60999, 61000), (20000, 40000), (1024, 65535)])
def test_any_shared_port_is_refused(flow) -> None:
    with pytest.raises(PortRangeError):
        check_flow_ports(flow, LINUX, [])


def test_reserved_flow_ports_are_never_handed_out_so_they_pass() -> None:
    check_flow_ports((20000, 39999), LINUX, [(20000, 39999)])
    check_flow_ports((20000, 39999), LINUX, [(30000, 35000), (35001, 39999)])
    check_flow_ports((40000, 40001), LINUX, [(40000, 40000), (40001, 40001)])


def test_a_reservation_with_a_gap_is_refused_and_the_gap_named() -> None:
    assert unreserved_overlap((20000, 39999), LINUX, [(32768, 35000), (35002, 39999)]) == [(35001, 35001)]
    with pytest.raises(PortRangeError, match="35001-35001"):
        check_flow_ports((20000, 39999), LINUX, [(32768, 35000), (35002, 39999)])
