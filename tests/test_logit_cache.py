"""LogitCache: each (image, view) computed once, persisted, rebuilt when broken, shared by processes."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdsweep.core.logit_cache import LogitCache

N, V, C = 50, 6, 4


def fake_logits(indices: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """A deterministic 'teacher': distinct, fp16-representable logits per (image, view)."""
    base = (indices * V + views).double()[:, None] / 8.0
    return (base + torch.arange(C, dtype=torch.float64) / 4.0 - 10.0).float()


class Recorder:
    """compute() that records which pairs it was asked for."""

    def __init__(self):
        self.calls: list[list[tuple[int, int]]] = []

    def __call__(self, indices: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        self.calls.append(list(zip(indices.tolist(), views.tolist(), strict=True)))
        return fake_logits(indices, views)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return [p for call in self.calls for p in call]


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


@pytest.fixture(params=["disk", "memory"])
def make_cache(request, tmp_path):
    return lambda: LogitCache(tmp_path / "cache" if request.param == "disk" else None, N, V, C)


def test_computes_only_missing_pairs_and_returns_their_values(make_cache):
    cache, rec = make_cache(), Recorder()
    idx, views = t([3, 7, 3, 9]), t([0, 1, 0, 5])
    out = cache.get(idx, views, rec)
    assert out.dtype == torch.float32 and out.shape == (4, C)
    torch.testing.assert_close(out, fake_logits(idx, views), rtol=1e-3, atol=1e-3)
    # (3, 0) appears twice but is computed once.
    assert sorted(rec.pairs) == [(3, 0), (7, 1), (9, 5)]

    out2 = cache.get(t([7, 3, 11]), t([1, 0, 2]), rec)
    assert rec.calls[-1] == [(11, 2)]
    torch.testing.assert_close(out2, fake_logits(t([7, 3, 11]), t([1, 0, 2])), rtol=1e-3, atol=1e-3)

    n_calls = len(rec.calls)
    cache.get(t([11, 9]), t([2, 5]), rec)
    assert len(rec.calls) == n_calls  # nothing missing: no compute at all

    stats = cache.stats()
    assert stats == {"filled": 4, "total_passes": 4, "max_passes": 1, "views_per_image_mean": 4 / N}


def test_full_batch_hit_never_takes_the_lock(tmp_path):
    cache = LogitCache(tmp_path, N, V, C)
    cache.get(t([1, 2]), t([0, 0]), fake_logits)

    class CountingLock:
        entered = 0

        def __enter__(self):
            CountingLock.entered += 1

        def __exit__(self, *exc):
            return False

    cache._lock = CountingLock()
    cache.get(t([2, 1, 1]), t([0, 0, 0]), fake_logits)
    assert CountingLock.entered == 0
    cache.get(t([2, 3]), t([0, 0]), fake_logits)
    assert CountingLock.entered == 1


def test_rechecks_under_the_lock(tmp_path):
    # Simulate another process filling a pair between our first look and taking the lock.
    cache, other = LogitCache(tmp_path, N, V, C), LogitCache(tmp_path, N, V, C)
    rec = Recorder()

    class FillingLock:
        def __enter__(self):
            other.get(t([5]), t([5]), fake_logits)

        def __exit__(self, *exc):
            return False

    cache._lock = FillingLock()
    cache.get(t([5, 6]), t([5, 5]), rec)
    assert rec.pairs == [(6, 5)]
    assert cache.stats()["max_passes"] == 1


def test_persists_across_instances(tmp_path):
    first = LogitCache(tmp_path, N, V, C)
    first.get(t([0, 49]), t([0, 5]), fake_logits)
    del first
    rec = Recorder()
    second = LogitCache(tmp_path, N, V, C)
    out = second.get(t([49, 0]), t([5, 0]), rec)
    assert rec.calls == []
    torch.testing.assert_close(out, fake_logits(t([49, 0]), t([5, 0])), rtol=1e-3, atol=1e-3)
    assert second.stats()["filled"] == 2


@pytest.mark.parametrize(
    "damage",
    ["shape", "meta_garbage", "meta_version", "truncated_logits", "missing_passes", "no_meta"],
)
def test_mismatched_or_corrupt_files_are_rebuilt(tmp_path, caplog, damage):
    LogitCache(tmp_path, N, V, C).get(t([1, 2]), t([0, 0]), fake_logits)
    shape = (N, V, C)
    if damage == "shape":
        shape = (N, V + 1, C)
    elif damage == "meta_garbage":
        (tmp_path / "meta.json").write_text("{not json")
    elif damage == "meta_version":
        meta = json.loads((tmp_path / "meta.json").read_text())
        (tmp_path / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    elif damage == "truncated_logits":
        with open(tmp_path / "logits.f16", "r+b") as f:
            f.truncate(100)
    elif damage == "missing_passes":
        (tmp_path / "passes.u1").unlink()
    elif damage == "no_meta":
        (tmp_path / "meta.json").unlink()

    rec = Recorder()
    with caplog.at_level(logging.WARNING, logger="kdsweep.core.logit_cache"):
        cache = LogitCache(tmp_path, *shape)
    assert cache.stats()["filled"] == 0
    if damage != "no_meta":  # a cache that never finished being created is simply made
        assert "rebuilding" in caplog.text
    out = cache.get(t([1, 2]), t([0, 0]), rec)
    assert sorted(rec.pairs) == [(1, 0), (2, 0)]
    assert out.shape == (2, C)
    assert (tmp_path / "logits.f16").stat().st_size == shape[0] * shape[1] * shape[2] * 2


def test_intact_cache_is_not_rebuilt(tmp_path, caplog):
    LogitCache(tmp_path, N, V, C).get(t([1]), t([0]), fake_logits)
    with caplog.at_level(logging.WARNING, logger="kdsweep.core.logit_cache"):
        assert LogitCache(tmp_path, N, V, C).stats()["filled"] == 1
    assert caplog.text == ""


def test_bad_requests_and_bad_compute_results_raise_and_cache_nothing(make_cache):
    cache = make_cache()
    with pytest.raises(ValueError, match="view ids"):
        cache.get(t([0]), t([V]), fake_logits)
    with pytest.raises(ValueError, match="image indices"):
        cache.get(t([N]), t([0]), fake_logits)
    with pytest.raises(ValueError, match="must return"):
        cache.get(t([0, 1]), t([0, 0]), lambda i, v: torch.zeros(1, C))
    with pytest.raises(ValueError, match="non-finite"):
        cache.get(t([0]), t([0]), lambda i, v: torch.full((1, C), float("nan")))
    assert cache.stats()["filled"] == 0


def test_low_precision_compute_and_large_logits(make_cache):
    cache = make_cache()
    out = cache.get(t([0, 1]), t([0, 0]), lambda i, v: torch.tensor([[1e6, -1e6, 0.5, 2.0]] * 2).bfloat16())
    assert torch.isfinite(out).all() and out[0, 0] == 65504.0 and out[0, 2] == 0.5


# -- two processes on one path ------------------------------------------------------------


def _worker(path: str, requests: list[tuple[list[int], list[int]]], barrier, results) -> None:
    cache = LogitCache(Path(path), N, V, C)
    computed: list[tuple[int, int]] = []

    def slow_teacher(indices, views):
        computed.extend(zip(indices.tolist(), views.tolist(), strict=True))
        time.sleep(0.02)  # hold the lock long enough for the other process to contend
        return fake_logits(indices, views)

    barrier.wait()
    max_err = 0.0
    for idx, views in requests:
        out = cache.get(t(idx), t(views), slow_teacher)
        max_err = max(max_err, float((out - fake_logits(t(idx), t(views))).abs().max()))
    results.put((computed, max_err))


def test_two_processes_compute_each_pair_once(tmp_path):
    rng = np.random.default_rng(0)
    # Both workers ask for overlapping pairs (the first 120 in different orders) plus their own.
    shared = rng.permutation(N * V)[:120]
    own_a, own_b = rng.permutation(N * V)[120:150], rng.permutation(N * V)[150:180]

    def batches(pairs):
        return [
            ([int(p) // V for p in chunk], [int(p) % V for p in chunk])
            for chunk in np.array_split(pairs, 12)
        ]

    requests_a = batches(np.concatenate([shared, own_a]))
    requests_b = batches(np.concatenate([shared[::-1], own_b]))
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(str(tmp_path), reqs, barrier, results))
        for reqs in (requests_a, requests_b)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0

    requested = {(i, v) for reqs in (requests_a, requests_b) for idx, views in reqs for i, v in zip(idx, views, strict=True)}
    computed = [pair for pairs, _ in outcomes for pair in pairs]
    assert len(computed) == len(set(computed)) == len(requested)
    assert all(computed_by for computed_by, _ in outcomes)  # both did some of the work
    assert all(err < 1e-2 for _, err in outcomes)

    stats = LogitCache(tmp_path, N, V, C).stats()
    assert stats["max_passes"] == 1
    assert stats["filled"] == stats["total_passes"] == len(requested)


def test_lookup_serves_from_the_device_copy_and_picks_up_pairs_filled_elsewhere(tmp_path: Path):
    """lookup (the training loop's read) gathers from its device copy; pairs another process
    filled after that copy was made are loaded from the files, not recomputed."""
    mine, other = LogitCache(tmp_path, N, V, C), LogitCache(tmp_path, N, V, C)
    rec = Recorder()
    idx, views = torch.tensor([0, 1, 2]), torch.tensor([0, 5, 3])
    first = mine.lookup(idx, views, rec, (idx.numpy(), views.numpy()))
    assert torch.allclose(first, fake_logits(idx, views)) and len(rec.pairs) == 3
    other.get(torch.tensor([7]), torch.tensor([2]), fake_logits)  # another process fills (7, 2)
    both = torch.tensor([1, 7]), torch.tensor([5, 2])
    again = mine.lookup(*both, rec, (both[0].numpy(), both[1].numpy()))
    assert torch.allclose(again, fake_logits(*both)) and len(rec.pairs) == 3  # nothing recomputed
    with pytest.raises(ValueError, match="view ids"):
        bad = torch.tensor([0]), torch.tensor([V])
        mine.lookup(*bad, rec, (bad[0].numpy(), bad[1].numpy()))
