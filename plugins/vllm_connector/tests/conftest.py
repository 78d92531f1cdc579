"""Fixtures of the kvcore-vllm tests (a clean KVCORE_* environment comes from kvcore's pytest
plugin)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def model_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from harness import write_model_config

    return write_model_config(tmp_path_factory.mktemp("llama-config"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer random-weight Llama with a local tokenizer (built once per session)."""
    from kvcore_vllm.testing import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), layers=4, hidden=1024)


@pytest.fixture
def harness_factory(model_config_dir: Path) -> Iterator:
    from harness import Harness, make_vllm_config

    made = []

    def make(num_blocks: int = 64, worker_in_process: bool = True, wait_async: bool = True,
             flush_stores: bool = True, deferred_finalize: bool = False, **config_args):
        h = Harness(make_vllm_config(model_config_dir, **config_args), num_blocks=num_blocks,
                    worker_in_process=worker_in_process, wait_async=wait_async,
                    flush_stores=flush_stores, deferred_finalize=deferred_finalize)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()
