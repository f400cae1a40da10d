"""A Redis URL's password never reaches a log line."""

from __future__ import annotations

import logging

from manager.relay.fleet import redact_text, redact_url


def test_passwords_in_redis_urls_are_redacted() -> None:
    assert redact_url("redis://:s3cret@10.0.0.9:6379/0") == "redis://:***@10.0.0.9:6379/0"
    assert redact_url("rediss://relay:s3cret@redis.internal:6380") == "rediss://relay:***@redis.internal:6380"
    assert redact_url("redis://10.0.0.9:6379/0") == "redis://10.0.0.9:6379/0"
    assert redact_url("unix:///run/redis.sock") == "unix:///run/redis.sock"
    assert redact_url(None) is None
    assert redact_text("AuthenticationError: s3cret is wrong", "redis://:s3cret@h:1") == \
        "AuthenticationError: *** is wrong"


def test_relayd_logs_no_password_when_redis_is_unreachable(caplog) -> None:
    import asyncio

    from manager.relay.config import RegistryConfig
    from manager.relay.fleet import RedisFleet
    from manager.relay.registry import Registry

    cfg = RegistryConfig(backend="redis", url="redis://:s3cret@127.0.0.1:1/0", timeout=0.2)

    async def go() -> None:
        fleet = RedisFleet(cfg, Registry(), relay_id="r1")
        with caplog.at_level(logging.INFO, logger="manager.relay.fleet"):
            await fleet.start(wait=0.5)
            await fleet.stop()

    asyncio.run(go())
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "127.0.0.1:1" in text and "s3cret" not in text, text
