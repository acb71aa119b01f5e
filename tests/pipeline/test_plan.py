import numpy as np
import pytest

from pipeline.plan import PlanConfig, SamplePlan, resume_segments

SHARDS = [7, 13, 1, 9, 10, 4, 11, 8, 6]  # uneven on purpose; 69 samples


def _plan(**kw) -> SamplePlan:
    return SamplePlan(SHARDS, PlanConfig(**kw))


@pytest.mark.parametrize("seed", [0, 1, 17])
def test_epoch_order_is_a_deterministic_permutation(seed):
    plan = _plan(seed=seed)
    a, b = plan.epoch_order(3), _plan(seed=seed).epoch_order(3)
    assert np.array_equal(a, b)
    assert sorted(a.tolist()) == list(range(69))
    assert not np.array_equal(a, plan.epoch_order(4))  # reshuffled per epoch
    assert not np.array_equal(a, np.arange(69))


def test_window_shuffle_mixes_across_shards_but_stays_within_windows():
    plan = _plan(window_shards=3)
    order = plan.epoch_order(0)
    shard_of, _ = plan.locate(order)
    # walk windows: each window's samples come from exactly 3 shards (the last may have fewer)
    pos, windows = 0, []
    rng = np.random.default_rng([0, 0])
    shard_order = rng.permutation(len(SHARDS))
    for start in range(0, len(SHARDS), 3):
        ws = shard_order[start:start + 3]
        n = sum(SHARDS[s] for s in ws)
        assert set(shard_of[pos:pos + n].tolist()) == set(ws.tolist())
        windows.append(shard_of[pos:pos + n])
        pos += n
    # within a window the shards are interleaved, not concatenated
    assert any(len(set(w[:5].tolist())) > 1 for w in windows)


def test_no_shuffle_is_identity():
    assert np.array_equal(_plan(shuffle=False).epoch_order(5), np.arange(69))


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("uneven", ["pad", "drop"])
@pytest.mark.parametrize("seed", [0, 5])
def test_partition_is_disjoint_complete_and_equal(world, uneven, seed):
    plan = _plan(seed=seed, uneven=uneven)
    parts = [plan.rank_sequence(2, [[world, 0]], r)[0] for r in range(world)]
    lengths = {len(p) for p in parts}
    assert len(lengths) == 1  # same steps on every rank: no hang at epoch end
    flat = np.concatenate(parts)
    if uneven == "drop":
        assert len(flat) == 69 // world * world
        assert len(set(flat.tolist())) == len(flat)  # disjoint
    else:
        assert set(flat.tolist()) == set(range(69))  # complete
        assert len(flat) == -(-69 // world) * world
        assert len(flat) - len(set(flat.tolist())) == len(flat) - 69  # only the pad repeats
    # deterministic
    again = [_plan(seed=seed, uneven=uneven).rank_sequence(2, [[world, 0]], r)[0] for r in range(world)]
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_ranks_read_few_shards():
    plan = _plan(window_shards=1)
    for r in range(3):
        ids, _ = plan.rank_sequence(0, [[3, 0]], r)
        shards = set(plan.locate(ids)[0].tolist())
        assert len(shards) <= 5  # a third of 9 shards plus boundary shards


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


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="uneven"):
        PlanConfig(uneven="wrap")
    with pytest.raises(ValueError, match="outside world size"):
        _plan().rank_sequence(0, [[2, 0]], 2)
    with pytest.raises(ValueError, match="at least one shard"):
        SamplePlan([])
