"""KVCORE_REDIS_URL forms and redaction."""

from __future__ import annotations

import pytest

from kvcore.config import ConfigError
from kvcore_redis.urls import parse_endpoint, redact


def test_single_server_forms() -> None:
    plain = parse_endpoint("redis://127.0.0.1:7000/3")
    assert not plain.cluster and plain.nodes == [("127.0.0.1", 7000)]
    assert plain.options["db"] == 3
    tls = parse_endpoint("rediss://app:pw@cache.local:6380")
    assert tls.options["ssl"] is True and tls.options["username"] == "app"
    unix = parse_endpoint("unix://:pw@/run/redis.sock?db=1")
    assert unix.options["unix_socket_path"] == "/run/redis.sock" and unix.nodes == []


def test_cluster_forms() -> None:
    seeds = parse_endpoint("redis+cluster://:pw@h1:7000,h2:7001")
    assert seeds.cluster and seeds.nodes == [("h1", 7000), ("h2", 7001)]
    assert seeds.options["password"] == "pw"
    listed = parse_endpoint("redis://h1:7000, rediss://h2:7001")
    assert listed.cluster and listed.nodes == [("h1", 7000), ("h2", 7001)]
    with pytest.raises(ConfigError, match="database 0"):
        parse_endpoint("redis://h1:1/2,redis://h2:2/2")


def test_redaction_hides_passwords_only() -> None:
    assert redact("redis://app:s3cret@h:1/0") == "redis://app:***@h:1/0"
    assert redact("redis://:s3cret@h:1,redis://:s3cret@h:2") == "redis://:***@h:1,redis://:***@h:2"
    assert redact("redis://app@h:1") == "redis://app@h:1"
    assert redact("redis://h:1") == "redis://h:1"


def test_bad_urls_name_the_variable_without_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        parse_endpoint("memcached://:s3cret@h:1")
    assert "KVCORE_REDIS_URL" in str(info.value) and "s3cret" not in str(info.value)
    with pytest.raises(ConfigError, match="KVCORE_REDIS_URL"):
        parse_endpoint("localhost:6379")


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("KVCORE_REDIS_URL", "http://cache:6379", "unknown scheme 'http'"),
    ("KVCORE_REDIS_URL", "", "KVCORE_REDIS_URL is empty"),
    ("KVCORE_REDIS_PREFIX", "kv{x}:", "must not hold braces"),
])
def test_config_and_doctor_refuse_what_the_tier_would(variable: str, value: str,
                                                      message: str) -> None:
    """`kvcore config` and `kvcore doctor` run the tier's own checks (RedisSettings.check),
    without connecting: exit 2, one line naming the variable, no traceback."""
    import os
    import subprocess
    import sys

    env = {**os.environ, variable: value, "KVCORE_TIERS": "cpu,redis"}
    for command in ("config", "doctor"):
        done = subprocess.run([sys.executable, "-m", "kvcore.cli.main", command],
                              capture_output=True, text=True, env=env, timeout=120)
        out = done.stdout + done.stderr
        assert done.returncode == 2 and message in out and "Traceback" not in out, out
