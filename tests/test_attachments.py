"""Attachments: what plugins run beside an engine, started after its tiers, closed before them."""

from __future__ import annotations

import logging
import types
from typing import Any

import pytest

from kvcore.config import ConfigError, load_settings
from kvcore.control import attach
from kvcore.engine import CacheEngine
from kvcore.hookspecs import hookimpl
from kvcore.interfaces import Attachment
from kvcore.plugins import PluginRegistry


class Recorder(Attachment):
    """Records what it saw of its engine when it started and closed."""

    def __init__(self, engine: CacheEngine, journal: list[str], tag: str) -> None:
        self.engine, self.journal, self.tag = engine, journal, tag
        self.tiers_at_start = [t.name for t in engine.tiers]
        journal.append(f"start {tag}")

    def close(self) -> None:
        pipeline_open = not self.engine.pipeline.closed
        self.journal.append(f"close {self.tag} (pipeline {'open' if pipeline_open else 'closed'})")


def registry_with(**factories: Any) -> PluginRegistry:
    def register_all(register: Any) -> None:
        for name, factory in factories.items():
            register(name, factory)

    module = types.ModuleType("test_attachments_plugin")
    module.kvcore_register_attachments = hookimpl(register_all)  # type: ignore[attr-defined]
    registry = PluginRegistry().load(allow=[])
    info = registry.register_module(module, name="test-attachments")
    assert info.error is None, info.error
    return registry


def test_attachments_start_after_the_tiers_and_close_first_last_first() -> None:
    journal: list[str] = []
    registry = registry_with(
        first=lambda engine: Recorder(engine, journal, "first"),
        off=lambda engine: None,
        second=lambda engine: Recorder(engine, journal, "second"),
    )
    engine = CacheEngine(load_settings(chunk_size=4, cpu_size="1MiB"), registry=registry)
    assert sorted(engine.attachments) == ["first", "second"]  # "off" returned None
    first = engine.attachments["first"]
    assert isinstance(first, Recorder) and first.tiers_at_start == ["cpu"]
    engine.close()
    assert journal == ["start first", "start second", "close second (pipeline open)",
                       "close first (pipeline open)"]
    assert len(engine.attachments) == 0


def test_a_lookup_only_engine_starts_no_attachment() -> None:
    journal: list[str] = []
    registry = registry_with(one=lambda engine: Recorder(engine, journal, "one"))
    with CacheEngine(load_settings(chunk_size=4), registry=registry, attachments=False) as engine:
        assert len(engine.attachments) == 0
    assert journal == []


def test_a_failing_attachment_is_logged_and_the_engine_serves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(engine: CacheEngine) -> Attachment:
        raise OSError("address already in use")

    journal: list[str] = []
    registry = registry_with(broken=broken, fine=lambda e: Recorder(e, journal, "fine"))
    with caplog.at_level(logging.WARNING, logger="kvcore.attachments"):
        engine = CacheEngine(load_settings(chunk_size=4), registry=registry)
    try:
        assert list(engine.attachments) == ["fine"]
        assert "kvcore attachment broken failed to start (OSError: address already in use)" \
            in caplog.text
        keys = engine.keys_for(b"n" * 8, list(range(8)))
        assert engine.store_buffers(keys, [b"x" * 8, b"y" * 8]).wait(5) == 2
    finally:
        engine.close()


def test_a_bad_attachment_setting_fails_the_engine_and_closes_what_started() -> None:
    journal: list[str] = []

    def misconfigured(engine: CacheEngine) -> Attachment:
        raise ConfigError("KVCORE_EXAMPLE_URL='::': not a URL")

    registry = registry_with(started=lambda e: Recorder(e, journal, "started"), bad=misconfigured)
    with pytest.raises(ConfigError, match="KVCORE_EXAMPLE_URL"):
        CacheEngine(load_settings(chunk_size=4), registry=registry)
    assert journal == ["start started", "close started (pipeline open)"]


def test_adding_under_a_taken_name_keeps_the_running_one() -> None:
    journal: list[str] = []
    with CacheEngine(load_settings(chunk_size=4)) as engine:
        first = engine.attachments.add("x", Recorder(engine, journal, "a"))
        again = engine.attachments.add("x", Recorder(engine, journal, "b"))
        assert again is first and engine.attachments["x"] is first
    assert journal == ["start a", "start b", "close b (pipeline open)",
                       "close a (pipeline open)"]


def test_the_controller_reporter_is_the_built_in_controller_attachment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With KVCORE_CONTROLLER_URL set every engine reports (nothing listens here: the engine
    serves anyway); attach() returns the running reporter; closing the engine stops it."""
    monkeypatch.setenv("KVCORE_CONTROLLER_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("KVCORE_CONTROLLER_TOKEN", "t" * 32)
    monkeypatch.setenv("KVCORE_CONTROLLER_TIMEOUT_S", "0.2")
    engine = CacheEngine(load_settings(chunk_size=4))
    reporter = engine.attachments["controller"]
    assert not reporter._stop.is_set()  # type: ignore[attr-defined]  # running, not closed
    assert attach(engine) is reporter
    engine.close()
    assert reporter._stop.is_set()  # type: ignore[attr-defined]
    monkeypatch.delenv("KVCORE_CONTROLLER_URL")
    with CacheEngine(load_settings(chunk_size=4)) as plain:
        assert "controller" not in plain.attachments
