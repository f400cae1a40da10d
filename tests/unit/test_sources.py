"""Per-source keys, counters and buckets; trusted proxies; rate-limited logs."""

from __future__ import annotations

import logging

import pytest

from manager.protocol.log_budget import LogBudget
from manager.protocol.sources import SourceKey, Tally, TokenBuckets, TrustedProxies


def test_ipv4_is_one_source_per_address_and_ipv6_per_64() -> None:
    key = SourceKey()
    assert key("203.0.113.7") == "203.0.113.7/32"
    assert key("203.0.113.7") != key("203.0.113.8")
    # Any two addresses of one /64 are one source; the next /64 is another.
    assert key("2001:db8:1:2::1") == key("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert key("2001:db8:1:3::1") != key("2001:db8:1:2::1")
    assert key("::ffff:203.0.113.7") == "203.0.113.7/32"  # a v4-mapped client is the IPv4 client
    assert key("?") == "?"  # not an address: itself


def test_prefix_lengths_are_configurable() -> None:
    key = SourceKey(prefix_v4=24, prefix_v6=48)
    assert key("203.0.113.7") == key("203.0.113.200") == "203.0.113.0/24"
    assert key("2001:db8:1:2::1") == key("2001:db8:1:ffff::1") == "2001:db8:1::/48"
    with pytest.raises(ValueError, match="IPv6 source prefix must be 0..128"):
        SourceKey(prefix_v6=129)
    with pytest.raises(ValueError, match="IPv4 source prefix must be 0..32"):
        SourceKey(prefix_v4=33)


def test_tally_forgets_keys_at_zero() -> None:
    t = Tally()
    assert t.add("a") == 1 and t.add("a") == 2 and t.add("b") == 1
    t.remove("a")
    assert t["a"] == 1 and len(t) == 2
    t.remove("a")
    t.remove("a")  # below zero: nothing
    assert "a" not in t and t["a"] == 0 and len(t) == 1 and t.total() == 1


def test_token_buckets_refill_and_forget_the_least_recently_used() -> None:
    b = TokenBuckets(rate=2.0, burst=3, max_keys=2)
    assert [b.take("x", 0.0) for _ in range(4)] == [True, True, True, False]
    assert b.take("x", 0.5) and not b.take("x", 0.5)  # one token per half second
    assert b.take("y", 0.5) and b.take("z", 0.5)  # x is the least recent: forgotten
    assert len(b) == 2
    assert all(b.take("x", 0.5) for _ in range(3))  # ...and starts full again


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    proxies = TrustedProxies(["10.0.0.0/24", "fd00::/64"])
    # From a trusted proxy: the right-most hop it did not add itself.
    assert proxies.client_of("10.0.0.5", ["198.51.100.1, 203.0.113.9"]) == "203.0.113.9"
    assert proxies.client_of("10.0.0.5", ["198.51.100.1", "203.0.113.9, 10.0.0.7"]) == "203.0.113.9"
    assert proxies.client_of("fd00::5", ["2001:db8::1"]) == "2001:db8::1"
    assert proxies.client_of("10.0.0.5", []) == "10.0.0.5"
    assert proxies.client_of("10.0.0.5", ["not-an-address"]) == "10.0.0.5"
    # From anyone else the header is ignored.
    assert proxies.client_of("203.0.113.50", ["198.51.100.1"]) == "203.0.113.50"
    assert TrustedProxies().client_of("10.0.0.5", ["198.51.100.1"]) == "10.0.0.5"


def test_log_budget_keeps_a_few_lines_per_interval_and_counts_the_rest(caplog) -> None:
    now = [0.0]
    log = logging.getLogger("test.budget")
    budget = LogBudget(log, burst=2, interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.budget"):
        logged = [budget.log(logging.INFO, "refused", "refused %d", i) for i in range(2000)]
        assert logged.count(True) == 2 and budget.suppressed == 1998
        assert budget.log(logging.INFO, "other", "another kind")  # its own budget
        now[0] = 10.0
        assert budget.log(logging.INFO, "refused", "refused again")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["refused 0", "refused 1", "another kind",
                     "refused again (1998 more like it left out in the previous 10 s)"]
