"""kvcore's pytest plugin, as another project's test suite sees it (a real pytest run)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SUITE = textwrap.dedent('''
    import os

    def test_environment():
        print("chunk size variable:", os.environ.get("KVCORE_CHUNK_SIZE"))

    def test_kvcore_env_fixture(kvcore_env):
        assert "KVCORE_CHUNK_SIZE" not in os.environ

    def test_make_engine(make_engine, free_port, figure):
        engine = make_engine(chunk_size=4, cpu_size="1MiB")
        assert engine.chunk_size == 4 and engine.memory.budget == 1 << 20
        assert 0 < free_port() < 65536
        figure("engine built and closed")
''')


def run_suite(tmp_path: Path, ini: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_other.py").write_text(SUITE)
    (tmp_path / "pytest.ini").write_text(f"[pytest]\n{ini}\n")
    env = {**os.environ, "KVCORE_CHUNK_SIZE": "7"}
    return subprocess.run([sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_fixtures_are_offered_and_the_environment_is_left_alone_by_default(
    tmp_path: Path,
) -> None:
    run = run_suite(tmp_path, "")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "chunk size variable: 7" in run.stdout  # no autouse cleaning without the ini option
    assert "kvcore figures" in run.stdout
    assert "test_make_engine: engine built and closed" in run.stdout


def test_the_ini_option_isolates_every_test(tmp_path: Path) -> None:
    run = run_suite(tmp_path, "kvcore_isolate_env = true")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "chunk size variable: None" in run.stdout
