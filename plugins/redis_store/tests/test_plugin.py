"""The plugin as kvcore finds it: entry point, settings, ``kvcore bench redis``."""

from __future__ import annotations

import argparse

import pytest

from kvcore.config import ConfigError, load_settings
from kvcore.plugins import PluginRegistry
from kvcore_redis import RedisSettings, bench


def test_registered_through_the_entry_point() -> None:
    registry = PluginRegistry().load()
    assert "redis" in registry.tiers and "redis" in registry.benchmarks
    assert registry.settings["RedisSettings"] is RedisSettings
    assert not [p for p in registry.plugins if p.name == "redis" and p.error]


def test_settings_from_environment_keep_the_password_secret(monkeypatch) -> None:
    monkeypatch.setenv("KVCORE_REDIS_URL", "redis://:hunter22@10.0.0.1:6379/0")
    monkeypatch.setenv("KVCORE_REDIS_PART_SIZE", "8MiB")
    settings = load_settings(RedisSettings)
    assert settings.part_size == 8 * 1024**2
    assert "hunter22" not in repr(settings) and "hunter22" not in str(settings.model_dump())
    monkeypatch.setenv("KVCORE_REDIS_SOCKET_TIMEOUT_S", "-1")
    with pytest.raises(ConfigError, match="KVCORE_REDIS_SOCKET_TIMEOUT_S"):
        load_settings(RedisSettings)


def test_bench_compares_with_a_plain_pipeline_and_leaves_no_keys(redis_server, redis_url) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--url", redis_url, "--chunks", "4", "--chunk-mib", "0.5",
                              "--batch", "2", "--repeat", "1"])
    redis_server.client().set(b"someone-else", b"keep")
    figures = bench.run(args)
    for name in ("plain_write_gbps", "kvcore_write_gbps", "plain_read_gbps", "kvcore_read_gbps",
                 "ratio_write", "ratio_read"):
        assert figures[name] > 0
    assert redis_server.client().keys() == [b"someone-else"]
