"""Plugin discovery through real installed distributions and the ``kvcore`` entry-point group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from kvcore.hookspecs import hookimpl
from kvcore.plugins import PluginRegistry

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "kvcore-example-tier"
BROKEN = ROOT / "tests" / "fixtures" / "kvcore-broken-plugin"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site directory holding two really installed plugin distributions."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(EXAMPLE), str(BROKEN)],
        check=True, capture_output=True,
    )
    assert list(target.glob("kvcore_example_tier-*.dist-info"))
    return target


def run_kvcore(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {"PATH": os.environ["PATH"], "PYTHONPATH": str(site), **env}
    return subprocess.run([sys.executable, "-m", "kvcore.cli.main", *args],
                          capture_output=True, text=True, env=environment, timeout=120)


def _plugin(name: str, **hooks: Callable[..., None]) -> types.ModuleType:
    """An in-memory plugin module whose ``kvcore_register_<kind>`` functions are ``hooks``."""
    module = types.ModuleType(name)
    for hook, function in hooks.items():
        setattr(module, hook, hookimpl(function))
    return module


def test_third_party_tier_discovered_and_broken_plugins_reported(plugin_site: Path) -> None:
    proc = run_kvcore(plugin_site, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    plugins = {p["name"]: p for p in json.loads(proc.stdout)["plugins"]}
    example = plugins["example"]
    assert example["distribution"] == "kvcore-example-tier"
    assert example["version"] == "0.1.0"
    assert example["registers"]["tiers"] == ["example"]
    assert example["error"] is None
    assert "ImportError" in plugins["broken"]["error"]
    assert "not_installed_anywhere" in plugins["broken"]["error"]
    assert "registration exploded" in plugins["bad_register"]["error"]
    assert plugins["cpu"]["registers"]["tiers"] == ["cpu"]


def test_third_party_tier_used_by_engine(plugin_site: Path) -> None:
    script = (
        "import os\n"
        "from kvcore import CacheEngine, Namespace, load_settings\n"
        "e = CacheEngine(load_settings(chunk_size=4))\n"
        "keys = e.keys_for(Namespace('m'), range(16))\n"
        "payloads = [os.urandom(100) for _ in keys]\n"
        "assert e.store_buffers(keys, payloads).wait(10) == 4\n"
        "assert e.flush(10)\n"
        "example = e.tiers[1]\n"
        "assert example.name == 'example' and all(example.contains(keys))\n"
        "e.clear(tier='cpu')\n"
        "with e.acquire(keys) as lease:\n"
        "    assert [bytes(v) for v in lease.views] == payloads\n"
        "print('ok', type(example).__name__)\n"
        "e.close()\n"
    )
    environment = {"PATH": os.environ["PATH"], "PYTHONPATH": str(plugin_site),
                   "KVCORE_TIERS": "cpu,example"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=environment, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok DictTier"


def test_allow_list_skips_other_plugins(plugin_site: Path) -> None:
    proc = run_kvcore(plugin_site, "plugins", "--json", KVCORE_PLUGINS="kvcore-example-tier")
    names = {p["name"] for p in json.loads(proc.stdout)["plugins"]}
    assert "example" in names
    assert "broken" not in names and "bad_register" not in names


def test_unknown_tier_error_mentions_broken_plugins(plugin_site: Path) -> None:
    script = "from kvcore import CacheEngine; CacheEngine()"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": str(plugin_site),
                               "KVCORE_TIERS": "cpu,broken_tier"}, timeout=120)
    assert proc.returncode != 0
    assert "unknown tier 'broken_tier'" in proc.stderr
    assert "example" in proc.stderr and "broken" in proc.stderr


def test_registry_in_process_registers_module() -> None:
    import types

    from kvcore.hookspecs import hookimpl

    plugin = types.ModuleType("inline_plugin")

    @hookimpl
    def kvcore_register_eviction_policies(register):  # type: ignore[no-untyped-def]
        from kvcore.eviction.lru import LRUPolicy

        register("inline_lru", LRUPolicy)

    plugin.kvcore_register_eviction_policies = kvcore_register_eviction_policies  # type: ignore
    registry = PluginRegistry().load(allow=[])
    info = registry.register_module(plugin, "inline")
    assert info.error is None
    assert "inline_lru" in registry.eviction_policies
    duplicate = types.ModuleType("dup")
    duplicate.kvcore_register_eviction_policies = kvcore_register_eviction_policies  # type: ignore
    info = registry.register_module(duplicate, "dup")
    assert info.error and "already registered" in info.error


def test_a_plugin_whose_hook_raises_is_rolled_back_whole() -> None:
    """Its tier registered before the policy hook raised: neither stays, and the plugin is
    unregistered (docs/plugins.md: a plugin that fails is skipped)."""
    def broken(register):  # type: ignore[no-untyped-def]
        raise RuntimeError("broken on purpose")

    plugin = _plugin(
        "half_plugin",
        kvcore_register_tiers=lambda register: register("half_tier", lambda context: None),
        kvcore_register_eviction_policies=broken)
    registry = PluginRegistry().load(allow=[])
    info = registry.register_module(plugin, "half")
    assert info.error and "kvcore_register_eviction_policies" in info.error
    assert "half_tier" not in registry.tiers
    assert info.registers == {}
    assert not registry.manager.is_registered(plugin)
    assert "cpu" in registry.tiers  # the built-ins are untouched


@pytest.mark.parametrize("call, message", [
    (lambda register: register("x"), "missing"),
    (lambda register: register("x", 3), "needs a callable"),
    (lambda register: register("", print), "non-empty string"),
])
def test_registrations_are_checked_by_kind(call, message) -> None:  # type: ignore[no-untyped-def]
    plugin = _plugin("typed_plugin", kvcore_register_tiers=call)
    info = PluginRegistry().load(allow=[]).register_module(plugin, "typed")
    assert info.error and message in info.error and "kvcore_register_tiers" in info.error


def test_settings_and_connectors_must_be_their_types() -> None:
    plugin = _plugin("wrong_types", kvcore_register_settings=lambda register: register(dict))
    info = PluginRegistry().load(allow=[]).register_module(plugin, "wrong")
    assert info.error and "PluginSettings subclass" in info.error


def _settings_class(name: str, config: dict, section: str) -> type:
    from typing import ClassVar

    from pydantic_settings import SettingsConfigDict

    from kvcore.config import PluginSettings

    return type(name, (PluginSettings,), {
        "model_config": SettingsConfigDict(**config),  # type: ignore[typeddict-item]
        "file_section": section, "__annotations__": {"file_section": ClassVar[str]}})


@pytest.mark.parametrize(("config", "section", "message"), [
    ({"env_prefix": "MYPLUGIN_"}, "myplugin", 'env_prefix="KVCORE_<PLUGIN>_"'),
    ({"env_prefix": "KVCORE_MINE"}, "mine", 'env_prefix="KVCORE_<PLUGIN>_"'),
    ({"env_prefix": "KVCORE_MINE_"}, "other", "file_section = 'mine'"),
    ({"env_prefix": "KVCORE_MINE_", "frozen": False}, "mine", "overrides frozen"),
    ({"env_prefix": "KVCORE_MINE_", "allow_inf_nan": True}, "mine", "allow_inf_nan"),
])
def test_plugin_settings_are_declared_one_way(config: dict, section: str, message: str) -> None:
    """A settings class declares its ``KVCORE_<PLUGIN>_`` prefix and the matching file table,
    and inherits the rest (frozen, unknown fields ignored, no inf/nan); anything else is
    refused when registered, naming what to write."""
    cls = _settings_class("MineSettings", config, section)
    plugin = _plugin("mine", kvcore_register_settings=lambda register: register(cls))
    info = PluginRegistry().load(allow=[]).register_module(plugin, "mine")
    assert info.error and message in info.error, info.error
    good = _settings_class("GoodSettings", {"env_prefix": "KVCORE_MINE_"}, "mine")
    plugin = _plugin("good", kvcore_register_settings=lambda register: register(good))
    assert PluginRegistry().load(allow=[]).register_module(plugin, "good").error is None


def test_allow_list_is_honoured_after_the_first_load() -> None:
    from kvcore.plugins import get_registry

    everything = get_registry(allow=None)
    builtins_only = get_registry(allow=[])
    assert builtins_only is not everything
    assert set(builtins_only.tiers) == {"cpu"}
    assert get_registry(allow=[]) is builtins_only  # loaded once per allow-list


def test_the_cli_commands_come_through_the_command_hook() -> None:
    registry = PluginRegistry().load(allow=[])
    subcommands = next(p for p in registry.plugins if p.module == "kvcore.cli.subcommands")
    assert subcommands.registers["commands"] == [
        "plugins", "config", "bench", "trace", "controller", "doctor"]


def test_a_plugin_with_an_unknown_hook_is_skipped_not_fatal() -> None:
    """A hook kvcore does not define (a typo, another kvcore version) fails only that plugin."""
    plugin = _plugin(
        "typo_plugin",
        kvcore_register_tiers=lambda register: register("typo_tier", lambda context: None),
        kvcore_register_teirs=lambda register: None)
    registry = PluginRegistry()
    registry.register_module(plugin, "typo")
    registry.load(allow=[])  # validates every registered plugin's hooks
    info = next(p for p in registry.plugins if p.name == "typo")
    assert info.error and "kvcore_register_teirs" in info.error
    assert "typo_tier" not in registry.tiers and "cpu" in registry.tiers
