"""Fixtures of the BPF layer: the XDP program loaded on a harness with live flows."""

import pytest

from tests.support.xdp_fixture_harness import live_harness


@pytest.fixture(scope="module")
def harness():
    with live_harness() as h:
        yield h
