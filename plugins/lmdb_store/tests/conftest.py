"""Fixtures of the kvcore-lmdb tests: helpers on sys.path (a clean KVCORE_* environment and
``figure`` come from kvcore's pytest plugin)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # for `import lmdb_workers` (importlib mode)
