import tracemalloc
from collections import Counter

import numpy as np
import pytest

from pipeline.errors import ResumeStateError
from pipeline.plan import (PlanConfig, SamplePlan, SourceQuota, reference_rank_sequence, resume_segments)

SHARDS = [7, 13, 1, 9, 10, 4, 11, 8, 6]  # uneven on purpose; 69 samples


def _plan(**kw) -> SamplePlan:
    return SamplePlan(SHARDS, PlanConfig(**kw))


def _read(plan: SamplePlan, epoch: int, segments: list[list[int]]) -> list[int]:
    """What every rank reads across a resume chain: in segment ``[world, consumed]``
    each rank reads its first ``consumed`` samples, in the last one all of its block."""
    seen = []
    for i, (world, consumed) in enumerate(segments):
        for r in range(world):
            ids, _ = plan.rank_sequence(epoch, [*segments[:i], [world, 0]], r)
            seen += ids[:len(ids) if i == len(segments) - 1 else consumed].tolist()
    return seen


@pytest.mark.parametrize("seed", [0, 1, 17])
def test_epoch_order_is_a_deterministic_permutation(seed):
    plan = _plan(seed=seed)
    a, b = plan.epoch_order(3), _plan(seed=seed).epoch_order(3)
    assert np.array_equal(a, b)
    assert sorted(a.tolist()) == list(range(69))
    assert not np.array_equal(a, plan.epoch_order(4))  # reshuffled per epoch
    assert not np.array_equal(a, _plan(seed=seed + 1).epoch_order(3))
    assert not np.array_equal(a, np.arange(69))


def test_window_shuffle_mixes_across_shards_but_stays_within_windows():
    plan = _plan(window_shards=3)
    order = plan.epoch_order(0)
    shard_of, _ = plan.locate(order)
    layout = plan.layout(0)
    assert sorted(layout.shard.tolist()) == list(range(len(SHARDS)))  # every shard visited once
    windows = []
    for k in range(len(layout.window_start) - 1):
        a, b = layout.window_start[k], layout.window_start[k + 1]
        assert set(shard_of[a:b].tolist()) == set(layout.shard[3 * k:3 * k + 3].tolist())
        windows.append(shard_of[a:b])
    assert any(len(set(w[:5].tolist())) > 1 for w in windows)  # interleaved, not concatenated


def test_no_shuffle_is_identity():
    assert np.array_equal(_plan(shuffle=False).epoch_order(5), np.arange(69))


@pytest.mark.parametrize("world", [1, 2, 3, 8, 69, 100])
@pytest.mark.parametrize("uneven", ["pad", "drop"])
@pytest.mark.parametrize("seed", [0, 5])
def test_partition_is_disjoint_complete_and_equal(world, uneven, seed):
    plan = _plan(seed=seed, uneven=uneven)
    parts = [plan.rank_sequence(2, [[world, 0]], r)[0] for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # same steps on every rank: no hang at epoch end
    assert all(plan.rank_size(2, [[world, 0]], r) == (len(parts[r]), 0) for r in range(world))
    flat = np.concatenate(parts)
    if uneven == "drop":
        assert len(flat) == 69 // world * world
        assert len(set(flat.tolist())) == len(flat)  # disjoint
    else:
        assert set(flat.tolist()) == set(range(69))  # complete
        assert len(flat) == -(-69 // world) * world  # only the pad repeats
    again = [_plan(seed=seed, uneven=uneven).rank_sequence(2, [[world, 0]], r)[0] for r in range(world)]
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_ranks_read_few_shards():
    plan = _plan(window_shards=1)
    for r in range(3):
        ids, _ = plan.rank_sequence(0, [[3, 0]], r)
        assert len(set(plan.locate(ids)[0].tolist())) <= 5  # a third of 9 shards plus boundary shards


@pytest.mark.parametrize("old_world, new_world, consumed", [(2, 3, 10), (3, 2, 7), (8, 1, 3), (1, 8, 50), (4, 5, 0)])
@pytest.mark.parametrize("uneven", ["pad", "drop"])
def test_elastic_resume_sees_every_remaining_sample_exactly_once(old_world, new_world, consumed, uneven):
    plan = _plan(uneven=uneven)
    before = [plan.rank_sequence(1, [[old_world, 0]], r)[0][:consumed] for r in range(old_world)]
    seen = set(np.concatenate(before).tolist())
    segments = resume_segments([[old_world, consumed]], new_world)
    after = []
    for r in range(new_world):
        ids, start = plan.rank_sequence(1, segments, r)
        after.append(ids[start:])
    rest = np.concatenate(after).tolist()
    assert not seen & set(rest)  # nothing consumed comes back
    pool = 69 - len(seen)
    if uneven == "drop":
        assert len(rest) == len(set(rest)) == pool // new_world * new_world
    else:
        assert seen | set(rest) == set(range(69))
        assert len(rest) - len(set(rest)) == len(rest) - pool < new_world  # only the pad repeats


def test_same_world_resume_continues_the_identical_sequence():
    plan = _plan()
    full, _ = plan.rank_sequence(0, [[2, 0]], 1)
    ids, start = plan.rank_sequence(0, resume_segments([[2, 12]], 2), 1)
    assert np.array_equal(ids[start:], full[12:])


def test_two_elastic_hops():
    plan = _plan(uneven="pad")
    s1 = plan.rank_sequence(0, [[2, 0]], 0)[0][:5].tolist() + plan.rank_sequence(0, [[2, 0]], 1)[0][:5].tolist()
    seg = resume_segments([[2, 5]], 3)
    s2 = sum((plan.rank_sequence(0, seg, r)[0][:4].tolist() for r in range(3)), [])
    seg = resume_segments([[2, 5], [3, 4]], 1)
    ids, start = plan.rank_sequence(0, seg, 0)
    s3 = ids[start:].tolist()
    assert set(s1 + s2 + s3) == set(range(69))
    assert len(s1) + len(s2) + len(s3) == 69


def _random_case(rng: np.random.Generator, epoch: int) -> tuple[SamplePlan, list[list[int]]]:
    """A random dataset (empty and tiny shards included), mix of up to three
    sources (down- and up-sampled), window, policy and resume chain of 1-4
    segments, each rank consuming part of its block."""
    n_shards = int(rng.integers(1, 40))
    sizes = rng.integers(0, 30, n_shards) * (rng.random(n_shards) > 0.1)
    sizes[0] = max(sizes[0], 1)
    cfg = PlanConfig(seed=int(rng.integers(2**32)), window_shards=int(rng.integers(1, 6)),
                     uneven=str(rng.choice(["pad", "drop"])), shuffle=bool(rng.random() < 0.9))
    bounds = [0, *sorted(set(rng.integers(1, max(2, n_shards), int(rng.integers(0, 3))).tolist()) - {n_shards}),
              n_shards]
    quotas = [SourceQuota(a, b, int(rng.integers(0, 3 * sizes[a:b].sum() + 1))) for a, b in zip(bounds, bounds[1:])]
    plan = SamplePlan(sizes, cfg, quotas if len(quotas) > 1 or rng.random() < 0.5 else None)
    segments: list[list[int]] = []
    for _ in range(int(rng.integers(1, 5))):
        world = int(rng.integers(1, 12))
        per, _ = plan.rank_size(epoch, [*segments, [world, 0]], 0)
        segments.append([world, int(rng.integers(0, per + 1))])
    segments[-1][1] = 0
    return plan, segments


@pytest.mark.parametrize("case_seed", range(12))
def test_rank_sequences_equal_the_materialized_reference(case_seed):
    """The per-rank computation gives exactly what materializing the whole epoch
    and splitting it (plan version 1's algorithm) gives, on random sizes, mixes,
    windows, policies, world sizes and resume chains."""
    rng = np.random.default_rng(case_seed)
    for _ in range(25):
        epoch = int(rng.integers(0, 5))
        plan, segments = _random_case(rng, epoch)
        for depth in range(1, len(segments) + 1):
            seg = segments[:depth]
            for r in range(seg[-1][0]):
                got, start = plan.rank_sequence(epoch, seg, r)
                want, want_start = reference_rank_sequence(plan, epoch, seg, r)
                assert np.array_equal(got, want) and start == want_start, (plan.shard_sizes, plan.quotas, seg, r)


@pytest.mark.parametrize("case_seed", range(8))
def test_every_planned_sample_once_across_any_resume_chain(case_seed):
    """Across a random chain of restarts on other world sizes, the samples read are
    the epoch's, each once, except pads (fewer than the world size in each segment
    whose ranks read that far) or the last segment's dropped tail."""
    rng = np.random.default_rng(100 + case_seed)
    for _ in range(25):
        plan, segments = _random_case(rng, 1)
        seen, epoch = Counter(_read(plan, 1, segments)), Counter(plan.epoch_order(1).tolist())
        assert sum(epoch.values()) == plan.epoch_total and max(epoch.values(), default=1) == 1
        if plan.config.uneven == "drop":
            assert max(seen.values(), default=1) == 1 and set(seen) <= set(epoch)
            assert 0 <= len(epoch) - len(seen) < segments[-1][0]
        else:
            assert set(seen) == set(epoch)
            assert 0 <= sum(seen.values()) - len(epoch) <= sum(w - 1 for w, _ in segments)  # only pads repeat


def test_mixing_reads_each_sources_exact_quota_with_up_and_down_sampling():
    sizes = [50] * 4 + [20] * 10 + [7, 9]  # three sources: 200, 200, 16 samples
    quotas = [SourceQuota(0, 4, 30), SourceQuota(4, 14, 520), SourceQuota(14, 16, 16)]
    plan = SamplePlan(sizes, PlanConfig(seed=3), quotas)
    for epoch in range(3):
        order = plan.epoch_order(epoch)
        assert len(order) == len(set(order.tolist())) == 566  # each (sample, pass) once
        assert np.bincount(plan.source_of(order), minlength=3).tolist() == [30, 520, 16]
        per_sample = Counter(plan.sample_of(order[plan.source_of(order) == 1]).tolist())
        assert set(per_sample.values()) == {2, 3} and len(per_sample) == 200  # 2.6 passes: every sample 2-3 times
        down = plan.sample_of(order[plan.source_of(order) == 0])
        assert len(set(plan.locate(down)[0].tolist())) == 1  # 30 of 200: one shard fetched, not four
    firsts = {tuple(sorted(plan.sample_of(plan.epoch_order(e)[plan.source_of(plan.epoch_order(e)) == 0]).tolist()))
              for e in range(6)}
    assert len(firsts) > 1  # down-sampling picks other samples each epoch


def test_upsampled_reads_are_distinct_ids_of_the_same_sample():
    plan = SamplePlan([4, 4], PlanConfig(), [SourceQuota(0, 2, 20)])
    order = plan.epoch_order(0)
    assert len(set(order.tolist())) == 20 and order.max() >= 8  # pass 1 and 2 ids lie above the 8 samples
    assert sorted(Counter(plan.sample_of(order).tolist()).values()) == [2] * 4 + [3] * 4
    shard, index = plan.locate(order)
    assert np.array_equal(shard * 4 + index, plan.sample_of(order))


def test_mixed_plan_splits_evenly_and_resumes_elastically():
    plan = SamplePlan([30, 30, 5, 5, 5], PlanConfig(seed=1, window_shards=2),
                      [SourceQuota(0, 2, 45), SourceQuota(2, 5, 40)])
    sizes = {plan.rank_size(0, [[3, 0]], r)[0] for r in range(3)}
    assert sizes == {29}  # 85 samples, padded to 87
    seen = _read(plan, 0, resume_segments([[3, 7]], 5))
    assert Counter(seen) - Counter(plan.epoch_order(0).tolist()) == Counter(seen[-(len(seen) - 85):]) or len(seen) == 85
    assert set(seen) == set(plan.epoch_order(0).tolist()) and 0 <= len(seen) - 85 < 5


def test_a_rank_never_materializes_the_epoch():
    """50 M samples in 5,000 shards over 512 ranks: one rank's plan needs its own
    ~98k ids and O(shards) arrays, far below the 400 MB one epoch order takes."""
    sizes = [10_000] * 5_000
    tracemalloc.start()
    try:
        plan = SamplePlan(sizes, PlanConfig(seed=7))
        ids, _ = plan.rank_sequence(0, [[512, 0]], 300)
        again, start = plan.rank_sequence(0, resume_segments([[512, 1000]], 384), 200)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(ids) == 50_000_000 // 512 + 1 and len(again) > 0
    assert peak < 40 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert len(np.unique(ids)) == len(ids)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="uneven"):
        PlanConfig(uneven="wrap")
    with pytest.raises(ValueError, match="outside world size"):
        _plan().rank_sequence(0, [[2, 0]], 2)
    with pytest.raises(ValueError, match="at least one shard"):
        SamplePlan([])
    with pytest.raises(ValueError, match="has no samples"):
        SamplePlan([0, 5], quotas=[SourceQuota(0, 1, 3), SourceQuota(1, 2, 5)])
    with pytest.raises(ResumeStateError, match="35 each"):
        _plan().rank_sequence(0, [[2, 36]], 0)  # more consumed than a rank's block
    for bad in ([], [[0, 1]], [["2", 0]], [[2, -1]], [[2, 0, 1]], "[[2, 0]]"):
        with pytest.raises(ResumeStateError, match="segments"):
            _plan().rank_sequence(0, bad, 0)
