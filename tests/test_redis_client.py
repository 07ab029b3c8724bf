"""Redis URLs (shared/redis_client.py): the scheme picks cluster mode and TLS; errors hide the password."""

from __future__ import annotations

import pytest

from tokenspool.shared.redis_client import RedisTarget


@pytest.mark.parametrize(
    ("url", "cluster", "tls"),
    [
        ("redis://127.0.0.1:6379/0", False, False),
        ("rediss://gw:secret@redis.internal:6380/0", False, True),
        ("redis+cluster://10.0.0.1:7000", True, False),
        ("rediss+cluster://gw:secret@10.0.0.1:7000", True, True),
    ],
)
def test_redis_url_scheme_selects_cluster_mode_and_tls(url: str, cluster: bool, tls: bool) -> None:
    target = RedisTarget(url)
    assert (target.cluster, target.tls) == (cluster, tls)
    assert "+cluster" not in target.plain_url and target.plain_url.split("://")[1] == url.split("://")[1]


def test_redis_target_never_shows_the_password_in_its_errors() -> None:
    with pytest.raises(ValueError) as raised:
        RedisTarget("redis+sentinel://gw:hunter2@h:1")
    assert "hunter2" not in str(raised.value) and "gw:***@h:1" in str(raised.value)
