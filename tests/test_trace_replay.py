"""Trace loading, Belady, truncation and the ``kvcore trace replay`` CLI (small traces)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvcore.cli.main import main
from kvcore.trace.belady import belady_hits
from kvcore.trace.format import TraceError, load_trace, parse_trace
from kvcore.trace.replay import prepare, replay, to_keys
from kvcore.trace.synth import conversations, documents, sessions, to_jsonl
from kvcore.trace.truncate import Truncation, request_blocks


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text(text)
    return path


def test_parse_and_errors_name_the_line() -> None:
    reqs = parse_trace(['{"timestamp": 1, "input_length": 700, "output_length": 2, '
                        '"hash_ids": [5, 6]}', ""])
    assert reqs[0].hash_ids == (5, 6) and reqs[0].input_length == 700
    with pytest.raises(TraceError, match="line 3"):
        parse_trace(['{"hash_ids": [1]}', "", "{not json"])
    with pytest.raises(TraceError, match="line 1.*hash_ids"):
        parse_trace(['{"timestamp": 0}'])


def test_belady_beats_or_ties_lru_and_respects_capacity() -> None:
    reqs = documents(300, seed=3)
    blocks, _, _ = prepare(reqs)
    keys = to_keys(blocks)
    for capacity in (20, 200):
        hits, total = belady_hits(blocks, capacity)
        lru = replay(keys, capacity, "lru")
        assert total == lru.blocks
        assert hits >= lru.hit_blocks
    assert belady_hits([[1, 2], [1, 2]], 0) == (0, 4)
    assert belady_hits([[1, 2], [1, 2]], 2) == (2, 4)


@pytest.mark.parametrize("make", [conversations, documents])
def test_default_policy_not_worse_than_lru(make) -> None:  # type: ignore[no-untyped-def]
    blocks, _, _ = prepare(make(1500, seed=1))
    keys = to_keys(blocks)
    unique = len({b for row in blocks for b in row})
    capacity = unique // 8
    ours = replay(keys, capacity, "prefix_value")
    lru = replay(keys, capacity, "lru")
    assert ours.hit_ratio >= lru.hit_ratio * 0.99


def test_truncation_rekeys_and_stable_mode_keeps_hits() -> None:
    reqs = conversations(400, seed=2, active=8)
    short = Truncation(2048, "tail")
    blocks, _ = request_blocks(reqs[-1], short)
    assert len(blocks) <= 4
    before = [r for r in reqs if r.input_length > 2048][0]
    tail, kept = request_blocks(before, short)
    assert kept == 2048 and all(derived for derived, _ in tail)
    assert request_blocks(before, short) == (tail, kept)  # deterministic
    stable_blocks, stable_kept = request_blocks(before, Truncation(2048, "stable"))
    assert stable_kept <= 2048 and stable_blocks[0] == (False, before.hash_ids[0])
    ratios = {}
    for mode in ("tail", "stable"):
        rows, _, _ = prepare(reqs, Truncation(2048, mode))
        ratios[mode] = replay(to_keys(rows), 10_000, "lru").hit_ratio
    assert ratios["stable"] > ratios["tail"]


def test_cli_replay_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, to_jsonl(documents(200, seed=5)))
    assert main(["trace", "replay", "--trace", str(path), "--capacity-blocks", "100",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == "prefix_value"
    for name in ("hit_ratio", "lru_hit_ratio", "belady_hit_ratio"):
        assert 0.0 <= out[name] <= 1.0
    assert out["hit_ratio"] <= out["belady_hit_ratio"] + 1e-9
    assert load_trace(path)[0].hash_ids


def test_cli_malformed_record_names_line(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '{"hash_ids": [1, 2]}\n{"hash_ids": [1, -4]}\n')
    assert main(["trace", "replay", "--trace", str(path), "--capacity-blocks", "4"]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and str(path) in err


def test_sessions_shape_one_off_and_returning() -> None:
    """Most blocks of the session trace are never asked again, and sessions come back after
    long gaps carrying their whole history."""
    reqs = sessions(3000, seed=4)
    uses: dict[int, int] = {}
    for r in reqs:
        for b in r.hash_ids:
            uses[b] = uses.get(b, 0) + 1
    assert sum(1 for n in uses.values() if n == 1) > 0.6 * len(uses)
    last_seen: dict[tuple[int, ...], int] = {}
    long_returns = 0
    for t, r in enumerate(reqs):
        for cut in range(len(r.hash_ids) - 1, 0, -1):
            earlier = last_seen.get(r.hash_ids[:cut])
            if earlier is not None:
                long_returns += t - earlier >= 100
                break
        last_seen[r.hash_ids] = t
    assert long_returns > 100
    assert sessions(50, seed=4) == reqs[:50]  # deterministic per seed


@pytest.mark.parametrize("policy", ["lru", "s3fifo", "arc", "prefix_value"])
def test_cli_synth_then_replay_each_policy(policy: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sessions.jsonl"
    assert main(["trace", "synth", "sessions", "--requests", "400", "--seed", "2",
                 "--out", str(path)]) == 0
    assert len(load_trace(path)) == 400
    assert main(["trace", "replay", "--trace", str(path), "--capacity-blocks", "200",
                 "--policy", policy, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == policy and out["requests"] == 400
    assert 0.0 < out["hit_ratio"] <= out["belady_hit_ratio"] + 1e-9
    assert out["lru_hit_ratio"] > 0.0


def test_saved_prefill_weighs_later_blocks_more(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A block deep in a prompt costs more to recompute (attention over all before it): the
    saved share of prefill time is reported beside the hit ratio, for Belady too."""
    from kvcore.trace.replay import prefix_cost

    assert prefix_cost(0) == 0.0
    assert prefix_cost(2, block_tokens=16, attention_tokens=16) == 2 + 2  # 1.5 + 2.5
    assert prefix_cost(64) - prefix_cost(63) > prefix_cost(1) - prefix_cost(0)
    path = write(tmp_path, to_jsonl(documents(300, seed=8)))
    assert main(["trace", "replay", "--trace", str(path), "--capacity-blocks", "200",
                 "--policy", "lru", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.0 < out["saved_prefill_ratio"] == out["lru_saved_prefill_ratio"]
    assert out["saved_prefill_ratio"] <= 1.0 and out["belady_saved_prefill_ratio"] > 0.0
    # leading runs are hit: the saved share of time is below the share of blocks
    assert out["saved_prefill_ratio"] < out["hit_ratio"]
