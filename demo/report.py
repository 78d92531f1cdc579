"""The demo's table (stdout) and plot (PNG)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from demo.client import Result


@dataclass
class RunSummary:
    name: str
    results: list[Result]
    wall_s: float
    hit_ratio: float

    def ttfts(self, repeated: bool | None = None) -> np.ndarray:
        return np.array([r.ttft_s for r in self.results
                         if repeated is None or r.request.repeated_prefix == repeated])

    def row(self) -> dict[str, float]:
        all_, rep = self.ttfts(), self.ttfts(True)
        tokens = sum(r.prompt_tokens + r.output_tokens for r in self.results)
        return {
            "requests": len(self.results),
            "ttft_mean_s": float(all_.mean()),
            "ttft_p90_s": float(np.percentile(all_, 90)),
            "repeated_ttft_mean_s": float(rep.mean()) if rep.size else float("nan"),
            "repeated_ttft_p90_s": float(np.percentile(rep, 90)) if rep.size else float("nan"),
            "requests_per_s": len(self.results) / self.wall_s,
            "tokens_per_s": tokens / self.wall_s,
            "hit_ratio": self.hit_ratio,
        }


def _seconds(value: float) -> str:
    return "-" if np.isnan(value) else f"{value:.3f}s"


def table(runs: list[RunSummary]) -> str:
    header = (f"{'run':<16}{'reqs':>6}{'TTFT mean':>11}{'TTFT p90':>10}{'repeated':>10}"
              f"{'rep p90':>9}{'req/s':>8}{'tok/s':>9}{'hit ratio':>11}")
    lines = [header, "-" * len(header)]
    for run in runs:
        r = run.row()
        lines.append(f"{run.name:<16}{r['requests']:>6}{r['ttft_mean_s']:>10.3f}s"
                     f"{r['ttft_p90_s']:>9.3f}s{_seconds(r['repeated_ttft_mean_s']):>10}"
                     f"{_seconds(r['repeated_ttft_p90_s']):>9}{r['requests_per_s']:>8.2f}"
                     f"{r['tokens_per_s']:>9.0f}{r['hit_ratio']:>10.1%}")
    return "\n".join(lines)


def same_answers(a: RunSummary, b: RunSummary) -> tuple[int, int]:
    """How many answers of ``a`` equal ``b``'s answer to the same (user, round), and of how many."""
    theirs = {(r.request.user, r.request.round): r.text for r in b.results}
    pairs = [(r.text, theirs.get((r.request.user, r.request.round))) for r in a.results]
    return sum(x == y for x, y in pairs), len(pairs)


def answers(a: RunSummary, b: RunSummary, width: int = 100) -> str:
    """Each question and its answer in run ``a``, marked with whether run ``b`` said the same."""
    theirs = {(r.request.user, r.request.round): r.text for r in b.results}
    lines = []
    for r in a.results:
        other = theirs.get((r.request.user, r.request.round))
        mark = "same" if other == r.text else "DIFFERS"
        lines.append(f"[{r.request.user} round {r.request.round}, {r.prompt_tokens} prompt tokens, "
                     f"{mark} in {b.name}] Q: {r.request.question}")
        lines.append("    A: " + " ".join(r.text.split())[:width * 3])
        if other is not None and other != r.text:
            lines.append(f"    {b.name}: " + " ".join(other.split())[:width * 3])
    return "\n".join(lines)


def plot(runs: list[RunSummary], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for run in runs:
        ttft = [r.ttft_s for r in run.results]
        line, = ax.plot(range(1, len(ttft) + 1), ttft, marker="o", label=run.name)
        new = [(i + 1, r.ttft_s) for i, r in enumerate(run.results)
               if not r.request.repeated_prefix]
        if new:  # hollow markers: requests whose prefix nobody sent before
            ax.plot(*zip(*new), linestyle="none", marker="o", markersize=9,
                    markerfacecolor="white", markeredgecolor=line.get_color())
    ax.plot([], [], linestyle="none", marker="o", markerfacecolor="white", markeredgecolor="gray",
            label="new prefix (hollow)")
    ax.set_xlabel("request (in order sent)")
    ax.set_ylabel("time to first token (s)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
