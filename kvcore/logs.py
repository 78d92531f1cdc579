"""kvcore's logging: ``KVCORE_LOG_LEVEL`` applies to the ``kvcore`` logger in every process.

A host program (vLLM, SGLang, a script) often configures only its own loggers; records of
``kvcore.*`` then reach Python's last-resort handler, which prints warnings and errors only, so
``KVCORE_LOG_LEVEL=DEBUG`` would show nothing. :func:`configure` sets the level and, when no
handler would print kvcore's records, adds one that writes to stderr.
"""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _has_handler(logger: logging.Logger) -> bool:
    current: logging.Logger | None = logger
    while current is not None:
        if current.handlers:
            return True
        current = current.parent if current.propagate else None
    return False


def configure(level: str) -> logging.Logger:
    """Apply ``level`` to the ``kvcore`` logger; make sure its records are printed."""
    logger = logging.getLogger("kvcore")
    logger.setLevel(level)
    if not _has_handler(logger):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
    return logger
