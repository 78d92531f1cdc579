"""Settings: environment, units, config files, and the error messages users see."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvcore.config import ConfigError, Settings, load_settings, parse_byte_size


def test_defaults() -> None:
    s = load_settings()
    assert s.chunk_size == 256
    assert s.tiers == ["cpu"]
    assert s.eviction
    assert s.plugins is None


@pytest.mark.parametrize(
    "text,expected",
    [("512MiB", 512 * 1024**2), ("4GB", 4 * 10**9), ("1.5GiB", int(1.5 * 1024**3)),
     ("1073741824", 1073741824), ("10 kb", 10_000), (123, 123)],
)
def test_byte_sizes(text: object, expected: int) -> None:
    assert parse_byte_size(text) == expected


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVCORE_CHUNK_SIZE", "128")
    monkeypatch.setenv("KVCORE_TIERS", "cpu, lmdb")
    monkeypatch.setenv("KVCORE_CPU_SIZE", "2GiB")
    s = load_settings()
    assert (s.chunk_size, s.tiers, s.cpu_size) == (128, ["cpu", "lmdb"], 2 * 1024**3)


@pytest.mark.parametrize(
    "variable,value,fragment",
    [("KVCORE_CPU_SIZE", "lots", "512MiB"), ("KVCORE_CHUNK_SIZE", "-3", "greater than 0"),
     ("KVCORE_CHUNK_SIZE", "abc", "integer"), ("KVCORE_TIERS", "", "at least one tier")],
)
def test_bad_value_names_variable_value_and_form(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert variable in message and repr(value) in message and fragment in message


def test_yaml_file_and_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "kvcore.yaml"
    path.write_text("chunk_size: 64\ncpu_size: 1GiB\ntiers: [cpu, lmdb]\n")
    monkeypatch.setenv("KVCORE_CONFIG_FILE", str(path))
    monkeypatch.setenv("KVCORE_CHUNK_SIZE", "32")
    s = load_settings()
    assert s.chunk_size == 32  # environment wins
    assert s.cpu_size == 1024**3 and s.tiers == ["cpu", "lmdb"]


def test_toml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "kvcore.toml"
    path.write_text('eviction = "prefix_lru"\ntiers = "cpu"\n')
    monkeypatch.setenv("KVCORE_CONFIG_FILE", str(path))
    assert load_settings().eviction == "prefix_lru"


def test_missing_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVCORE_CONFIG_FILE", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="KVCORE_CONFIG_FILE"):
        load_settings()


def test_unknown_tier_and_policy_list_known(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvcore.engine import CacheEngine

    with pytest.raises(ConfigError) as info:
        CacheEngine(load_settings(tiers=["cpu", "floppy"]))
    assert "KVCORE_TIERS" in str(info.value) and "floppy" in str(info.value)
    assert "cpu" in str(info.value).split("known:")[1]
    with pytest.raises(ConfigError) as info:
        CacheEngine(load_settings(eviction="random-ish"))
    assert "KVCORE_EVICTION" in str(info.value) and "lru" in str(info.value)


def test_first_tier_must_be_memory() -> None:
    from kvcore.engine import CacheEngine
    from kvcore.interfaces import Tier

    class DiskLike(Tier):
        contains = get = put = delete = usage = lambda self, *a: []  # type: ignore[assignment]

    with pytest.raises(ConfigError, match="first tier"):
        CacheEngine(load_settings(), tiers=[DiskLike()])


def test_cli_bad_config_exits_2_without_traceback() -> None:
    env = {"KVCORE_CPU_SIZE": "huge", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "kvcore.cli.main", "config"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "KVCORE_CPU_SIZE='huge'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_config_json() -> None:
    import json

    proc = subprocess.run([sys.executable, "-m", "kvcore.cli.main", "config", "--json"],
                          capture_output=True, text=True, env={"KVCORE_CHUNK_SIZE": "512",
                                                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["core"]["chunk_size"] == 512


def test_settings_are_documented() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, f"setting {name} has no description"


def test_unknown_variables_are_named_with_the_closest_known_one() -> None:
    from kvcore.config import Settings, check_environment, unknown_variables
    from kvcore.copy.settings import CopySettings

    environ = {"KVCORE_CHUNK_SIZ": "3", "KVCORE_TIERS": "cpu", "KVCORE_COPY_THREAD": "2",
               "KVCORE_QQQQQQQQQQQQ": "1", "PATH": "/bin"}
    assert unknown_variables([Settings, CopySettings], environ) == [
        ("KVCORE_CHUNK_SIZ", "KVCORE_CHUNK_SIZE"), ("KVCORE_COPY_THREAD", "KVCORE_COPY_THREADS"),
        ("KVCORE_QQQQQQQQQQQQ", None)]
    with pytest.raises(ConfigError, match="KVCORE_CHUNK_SIZ \\(did you mean KVCORE_CHUNK_SIZE"):
        check_environment([Settings, CopySettings], environ)
    check_environment([Settings], {"KVCORE_TIERS": "cpu", "KVCORE_CONFIG_FILE": "x.toml"})


def test_copy_settings_are_validated_and_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvcore.copy.settings import CopySettings, copy_settings
    from kvcore.plugins import PluginRegistry

    monkeypatch.setenv("KVCORE_COPY_CUDA_MODE", "staged")
    assert copy_settings().copy_cuda_mode == "staged"
    monkeypatch.setenv("KVCORE_COPY_CUDA_MODE", "STAGED")  # the old code lower-cased too
    assert copy_settings().copy_cuda_mode == "staged"
    monkeypatch.setenv("KVCORE_COPY_CUDA_MODE", "sideways")
    # On the copy path a bad value is logged once and the defaults apply (a copy never fails
    # for a setting); `kvcore config` and `kvcore doctor` reject it.
    assert copy_settings().copy_cuda_mode == "direct"
    with pytest.raises(ConfigError, match="KVCORE_COPY_CUDA_MODE='sideways'"):
        load_settings(CopySettings)
    monkeypatch.delenv("KVCORE_COPY_CUDA_MODE")
    assert copy_settings().copy_cuda_mode == "direct"
    assert "CopySettings" in PluginRegistry().load(allow=[]).settings


def test_config_and_doctor_reject_a_misspelt_variable() -> None:
    import os

    env = {**os.environ, "KVCORE_CHUNK_SIZ": "3"}
    for command in ("config", "doctor"):
        done = subprocess.run([sys.executable, "-m", "kvcore.cli.main", command],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "did you mean KVCORE_CHUNK_SIZE" in done.stdout + done.stderr


def test_unknown_config_file_keys_are_named_with_the_closest_known_one(tmp_path: Path) -> None:
    from kvcore.config import Settings, unknown_file_keys
    from kvcore.control.settings import ControllerSettings

    data = {"chunk_size": 16, "chunksize": 3, "controller": {"url": "", "tokn": "x"},
            "controller_timeout_s": 1.0, "controler_url": "x", "zzzzzzzz": 1}
    assert unknown_file_keys([Settings, ControllerSettings], data) == [
        ("chunksize", "chunk_size"), ("controller.tokn", "controller.token"),
        ("controler_url", "controller_url"), ("zzzzzzzz", None)]
    assert unknown_file_keys([Settings, ControllerSettings],
                             {"tiers": ["cpu"], "controller": {"token": "t"}}) == []


def test_config_doctor_and_engine_reject_or_warn_about_a_misspelt_file_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    import logging
    import os

    from kvcore.engine import CacheEngine

    config = tmp_path / "kvcore.yaml"
    config.write_text("chunk_size: 16\ncpu_sise: 1MiB\ncontroller:\n  timeout: 3\n")
    env = {**os.environ, "KVCORE_CONFIG_FILE": str(config)}
    for command in ("config", "doctor"):
        done = subprocess.run([sys.executable, "-m", "kvcore.cli.main", command],
                              capture_output=True, text=True, env=env, timeout=120)
        out = done.stdout + done.stderr
        assert done.returncode == 2, (command, out)
        assert "cpu_sise (did you mean cpu_size?)" in out, out
        assert "controller.timeout (did you mean controller.timeout_s?)" in out, out
        assert "Traceback" not in out
    monkeypatch.setenv("KVCORE_CONFIG_FILE", str(config))
    with caplog.at_level(logging.WARNING, logger="kvcore.engine"):
        with CacheEngine(load_settings()) as engine:  # the engine serves, and says why
            assert engine.chunk_size == 16
    assert "config-file key cpu_sise is not a kvcore setting (did you mean cpu_size?)" \
        in caplog.text


@pytest.mark.parametrize("variable", ["KVCORE_TIER_TIMEOUT_S", "KVCORE_CONTROLLER_TIMEOUT_S",
                                      "KVCORE_VERIFY_TOLERANCE"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_no_float_setting_takes_inf_or_nan(variable: str, value: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``KVCORE_TIER_TIMEOUT_S=inf`` once disabled every lower tier's timeout; every float
    setting, the plugins' included, refuses inf and nan naming the variable."""
    from kvcore.control.settings import ControllerSettings

    monkeypatch.setenv(variable, value)
    cls = ControllerSettings if "CONTROLLER" in variable else Settings
    with pytest.raises(ConfigError, match=f"{variable}='{value}'"):
        load_settings(cls)


@pytest.mark.parametrize(("url", "message"), [
    ("http://:8470", "names no host"), ("http://host:99999", "port is not a number"),
    ("http://host:port", "port is not a number"), ("ftp://host", "http:// or https://"),
    ("http://host:8470/?q=1", "no query"),
])
def test_unusable_controller_urls_are_refused(url: str, message: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from kvcore.control.settings import ControllerSettings

    monkeypatch.setenv("KVCORE_CONTROLLER_URL", url)
    with pytest.raises(ConfigError, match=message):
        load_settings(ControllerSettings)
