"""Load or recompute: claim the leading chunks whose load is expected to finish before the
engine would have recomputed them.

Two online models, both fed by real work:

- :class:`TierCost` per lower tier: seconds per chunk of a read (the tier's own latency and
  bandwidth, framing, verification and the codec's decode, as :meth:`LowerTier.get_decoded`
  measures them), a moving average that follows a tier that slows down, plus its backlog (reads
  already in flight wait first);
- :class:`PrefillCost`: the engine's prefill time, ``a * tokens + b * tokens * context`` (the
  linear part and attention over the context), fitted to the forward steps an engine connector
  reports (the vLLM connector times each step).

:meth:`Planner.plan` takes, for each leading chunk found, the tier it would come from, and picks
the number of chunks ``k`` that minimises ``load(k) + recompute(from k to the end of the
prompt)``. Memory-tier chunks cost nothing to claim. Until the engine's prefill has been measured,
or for a tier never read yet, everything found is claimed (the behaviour without a planner); a
chunk is skipped only when loading is expected to be slower by more than ``MARGIN``.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

MARGIN = 1.05
"""A load is skipped only when expected to take this many times longer than recomputing."""
ALPHA = 0.5
"""Weight of the newest read in a tier's moving average (a tier that slows is seen at once)."""
MIN_PREFILL_TOKENS = 32
"""Forward steps with fewer new tokens (decode steps) do not feed the prefill model."""
MIN_PREFILL_SAMPLES = 2
PREFILL_SAMPLES = 128

AUTO, LOAD, RECOMPUTE = "auto", "load", "recompute"
MODES = (AUTO, LOAD, RECOMPUTE)


class TierCost:
    """Moving average of one tier's seconds per chunk read, and reads in flight."""

    def __init__(self) -> None:
        self.per_chunk_s: float | None = None
        self.reads = 0
        self.in_flight = 0
        """Chunks being read now (a new load queues behind them)."""
        self._lock = threading.Lock()

    def started(self, chunks: int) -> None:
        with self._lock:
            self.in_flight += chunks

    def finished(self, chunks: int, seconds: float) -> None:
        with self._lock:
            self.in_flight = max(0, self.in_flight - chunks)
            if chunks <= 0:
                return
            sample = seconds / chunks
            self.per_chunk_s = (sample if self.per_chunk_s is None
                                else ALPHA * sample + (1 - ALPHA) * self.per_chunk_s)
            self.reads += 1

    def adopt(self, per_chunk_s: float, in_flight: int) -> None:
        """Take a measurement made elsewhere: the cache server reads its lower tiers and
        tells its engines what a chunk costs there and what is queued."""
        with self._lock:
            self.per_chunk_s, self.in_flight = per_chunk_s, in_flight

    def load_s(self, chunks: int) -> float | None:
        """Expected seconds to read ``chunks`` now (backlog included); None before any read."""
        with self._lock:
            if self.per_chunk_s is None:
                return None
            return self.per_chunk_s * (chunks + self.in_flight)


class PrefillCost:
    """Least-squares fit of forward-step time to ``tokens`` and ``tokens x context``."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=PREFILL_SAMPLES)
        self._coef: tuple[float, float] | None = None
        self._lock = threading.Lock()

    def observe(self, steps: list[tuple[int, int]], seconds: float) -> None:
        """One forward step: ``(context tokens before, new tokens)`` per request, its time."""
        tokens = sum(n for _, n in steps)
        if tokens < MIN_PREFILL_TOKENS or seconds <= 0:
            return
        work = sum(n * (c + n / 2) for c, n in steps)
        with self._lock:
            self._samples.append((float(tokens), float(work), seconds))
            self._coef = self._fit()

    def _fit(self) -> tuple[float, float] | None:
        if len(self._samples) < MIN_PREFILL_SAMPLES:
            return None
        data = np.array(self._samples)
        x, t = data[:, :2], data[:, 2]
        (a, b), *_ = np.linalg.lstsq(x, t, rcond=None)
        if a < 0 or b < 0:  # one term explains it alone: fit the better one by itself
            fits = []
            for column in (0, 1):
                coef = float(x[:, column] @ t / max(x[:, column] @ x[:, column], 1e-30))
                fits.append((float(np.sum((t - coef * x[:, column]) ** 2)), column, coef))
            _, column, coef = min(fits)
            a, b = (coef, 0.0) if column == 0 else (0.0, coef)
        return float(a), float(b)

    @property
    def known(self) -> bool:
        return self._coef is not None

    def seconds(self, context: int, tokens: int) -> float | None:
        """Expected time to compute ``tokens`` new tokens after ``context`` (None: unknown)."""
        coef = self._coef
        if coef is None or tokens <= 0:
            return None if coef is None else 0.0
        a, b = coef
        return a * tokens + b * tokens * (context + tokens / 2)


@dataclass
class Plan:
    """How many of the chunks found to claim, and the estimates behind the choice."""

    claim: int
    found: int
    load_s: float | None = None
    """Expected time to load the chunks found but not claimed."""
    recompute_s: float | None = None
    """Expected time to recompute them instead."""
    tier: str | None = None
    """The tier of the first chunk not claimed."""


class Planner:
    """The tier and prefill models of one engine, and the choice made from them."""

    def __init__(self, mode: str = AUTO, memory: str = "cpu") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown planner mode {mode!r}; known: {', '.join(MODES)}")
        self.mode = mode
        self.memory = memory
        self.prefill = PrefillCost()
        self.tiers: dict[str, TierCost] = {}
        self._lock = threading.Lock()

    def tier(self, name: str) -> TierCost:
        with self._lock:
            cost = self.tiers.get(name)
            if cost is None:
                cost = self.tiers[name] = TierCost()
            return cost

    def plan(self, sources: list[str], chunk_size: int, prompt_tokens: int) -> Plan:
        """Chunks to claim of ``sources`` (the tier of each leading chunk found) for a prompt
        of ``prompt_tokens`` tokens."""
        found = len(sources)
        if self.mode == LOAD or found == 0:
            return Plan(found, found)
        if self.mode == RECOMPUTE:
            return Plan(0, found)
        if not self.prefill.known or all(s == self.memory for s in sources):
            return Plan(found, found)
        counts: dict[str, int] = {}
        for source in sources:
            counts[source] = counts.get(source, 0) + 1
        costs: dict[str, float] = {}
        for name, count in counts.items():
            if name == self.memory:
                costs[name] = 0.0
                continue
            load = self.tier(name).load_s(count)
            if load is None:
                return Plan(found, found)  # never read yet: claim, and learn from the read
            costs[name] = load / count
        per_chunk = [costs[s] for s in sources]
        end = max(prompt_tokens, found * chunk_size)
        best, best_s = found, None
        for k in range(found, -1, -1):
            recompute = self.prefill.seconds(k * chunk_size, end - k * chunk_size) or 0.0
            total = sum(per_chunk[:k]) + recompute
            if best_s is None or total * MARGIN < best_s:
                best, best_s = k, total
        if best == found:
            return Plan(found, found)
        load_s = sum(per_chunk[best:])
        recompute_s = (self.prefill.seconds(best * chunk_size, (found - best) * chunk_size)
                       or 0.0)
        return Plan(best, found, load_s, recompute_s, sources[best])
