"""data.overlap_epochs: the next epoch is set up (workers forked, DALI graph built,
first shards fetched) while the last batches of this one are consumed — and that
changes nothing a consumer can see but the wait at the epoch's start."""

import gc
import logging
import multiprocessing
import threading
import time
import weakref

import pytest
import torch
from tests.helpers.shards import flip_a_byte, jpeg_bytes, numbered_shards, write_raw_shards

from pipeline.augment import AugmentConfig
from pipeline.errors import ShardFetchError
from pipeline.loader import LoaderConfig, build_loader
from pipeline.plan import PlanConfig

SIZES = [10, 7, 12, 9]  # 38 samples: 10 batches of 4 an epoch, the last one partial


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("numbered")
    numbered_shards(root, SIZES, image_size=(96, 72))
    return str(root)


def _loader(url, backend="cpu", **kw):
    return build_loader(LoaderConfig(url=url, backend=backend, batch_size=4, num_workers=kw.pop("num_workers", 2),
                                     augment=AugmentConfig(img_size=32),
                                     plan=kw.pop("plan", PlanConfig(window_shards=2)), **kw), 0, 1)


def _epochs(loader, epochs: int) -> list[tuple[int, list[int], torch.Tensor]]:
    return [(loader.epoch, b.sample_ids.tolist(), b.images) for _ in range(epochs) for b in loader]


@pytest.fixture
def ours():
    """The worker processes this test forked (not ones an earlier test left)."""
    before = {p.pid for p in multiprocessing.active_children()}
    return lambda: [p for p in multiprocessing.active_children() if p.pid not in before]


def _gone(ours, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while ours() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not ours()


def _feed_threads() -> int:
    return sum(t.name == "dali-feed" and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize("backend", ["cpu", "dali"])
def test_an_epoch_started_early_yields_exactly_what_a_late_start_does(ds, backend, ours):
    late = _epochs(_loader(ds, backend, overlap_epochs=False), 3)
    early_loader = _loader(ds, backend)
    early = _epochs(early_loader, 3)
    assert [(e, ids) for e, ids, _ in early] == [(e, ids) for e, ids, _ in late]
    assert len(early) == 30 and all(torch.equal(a[2], b[2]) for a, b in zip(early, late))
    assert early_loader.stats.epochs_started_early == 3  # epochs 1, 2, and 3 (which nobody read)
    early_loader.close()
    assert _gone(ours) and _feed_threads() == 0


def test_the_next_epochs_workers_run_before_this_epoch_ends(ds, ours):
    loader = _loader(ds)  # 2 workers, lead 4 batches
    seen = [len(ours()) for _ in loader]
    assert seen[:5] == [2] * 5  # this epoch's workers only
    assert seen[6:] == [4] * 4  # and, from the 4th batch before the end, the next epoch's too
    first = next(iter(loader))  # epoch 1 runs on the workers already started
    assert loader.epoch == 1 and first.sample_ids.numel() == 4
    loader.close()
    assert _gone(ours)


def test_a_run_that_stops_in_an_epochs_last_batches_resumes_exactly(ds, ours):
    """A checkpoint taken after the next epoch started: the saved position is
    this epoch's, the early epoch is dropped as the loop stops, and both the loader
    that goes on and a fresh one resumed from the state yield the same rest of the
    epoch, then the same next epoch."""
    loader = _loader(ds)
    it = iter(loader)
    for _ in range(8):  # 2 batches before the end: epoch 1 was started
        next(it)
    assert loader.stats.epochs_started_early == 1 and len(ours()) == 4
    it.close()
    assert loader.epoch == 0 and loader.next_epoch.run is None and _gone(ours)
    state = loader.state_dict()
    resumed = _loader(ds)
    resumed.load_state_dict(state)
    went_on, again = _epochs(loader, 2), _epochs(resumed, 2)
    assert [(e, ids) for e, ids, _ in went_on] == [(e, ids) for e, ids, _ in again]
    assert [len(ids) for e, ids, _ in went_on if e == 0] == [4, 2]  # the rest of epoch 0: 38 = 9 * 4 + 2
    assert all(torch.equal(a[2], b[2]) for a, b in zip(went_on, again))
    assert loader.stats.epochs_started_early == 3  # epoch 1 again, then 2
    loader.close()
    resumed.close()
    assert _gone(ours)


@pytest.mark.parametrize("change", ["set_epoch", "load_state_dict"])
def test_moving_the_position_drops_an_early_epoch(ds, change, ours):
    loader, fresh = _loader(ds), _loader(ds, overlap_epochs=False)
    _epochs(loader, 1)
    assert len(ours()) == 2 and loader.next_epoch.position == (1, [[1, 0]])  # epoch 1's, started early
    if change == "set_epoch":
        loader.set_epoch(5)
        fresh.set_epoch(5)
    else:
        fresh.set_epoch(3)
        loader.load_state_dict(fresh.state_dict())
    assert _gone(ours)
    assert [ids for _, ids, _ in _epochs(loader, 1)] == [ids for _, ids, _ in _epochs(fresh, 1)]
    loader.close()


@pytest.mark.parametrize("backend", ["cpu", "dali"])
@pytest.mark.parametrize("held_by", ["nothing", "a_cycle"])
def test_a_loader_dropped_without_close_stops_its_early_epoch_at_once(ds, backend, held_by, ours):
    """Nothing the early epoch holds refers back to the loader: dropped, it is
    freed (at once, or by the cycle collector) and stops that epoch's workers
    or reader thread. A worker pool that the cycle collector frees itself waits
    out the workers' one-minute SIGTERM grace."""
    loader = _loader(ds, backend)
    _epochs(loader, 1)
    assert len(ours()) == (2 if backend == "cpu" else 0)
    assert _feed_threads() == (1 if backend == "dali" else 0)
    if held_by == "a_cycle":
        loader.itself = loader
    freed = weakref.ref(loader)
    t0 = time.monotonic()  # before the finalizer runs: that is where a hang would be
    del loader
    assert (freed() is None) == (held_by == "nothing")
    gc.collect()
    assert freed() is None and _gone(ours) and _feed_threads() == 0
    assert time.monotonic() - t0 < 5


def test_an_error_mid_epoch_drops_the_early_epoch(tmp_path, ours):
    """Epoch 1 was started at the first of 3 batches; the second batch's shard is
    corrupt: the error reaches the caller and no worker is left behind."""
    manifest = numbered_shards(tmp_path, [4, 4, 4])
    flip_a_byte(tmp_path / manifest.shards[1].name)
    loader = _loader(str(tmp_path), plan=PlanConfig(shuffle=False))
    with pytest.raises(ShardFetchError):
        _epochs(loader, 1)
    assert loader.stats.epochs_started_early == 1 and loader.next_epoch.run is None and _gone(ours)


def test_a_trainer_in_its_last_epoch_starts_no_next_one(ds, ours):
    from train.trainer import mark_last_epoch

    loader = _loader(ds)  # 10 batches an epoch
    mark_last_epoch(loader, steps_left=5, accum_steps=2, in_window=0)  # 10 micro-steps: this epoch covers them
    assert loader.last_epoch == 0
    _epochs(loader, 1)
    assert loader.stats.epochs_started_early == 0 and not ours()
    mark_last_epoch(loader, steps_left=6, accum_steps=2, in_window=1)  # 11 micro-steps: one more epoch
    assert loader.last_epoch is None
    _epochs(loader, 1)
    assert loader.stats.epochs_started_early == 1
    loader.close()


def test_the_workers_seeds_do_not_draw_from_the_training_loops_rng(ds):
    """An epoch started early forks its workers at another point of the loop: the
    global torch RNG (dropout, drop path: the loop's) must not move."""
    torch.manual_seed(7)
    before = torch.get_rng_state()
    loader = _loader(ds)
    _epochs(loader, 2)
    loader.close()
    assert torch.equal(torch.get_rng_state(), before)


def test_without_workers_there_is_nothing_to_start_early(ds):
    loader = _loader(ds, num_workers=0)
    assert len(_epochs(loader, 2)) == 20 and loader.stats.epochs_started_early == 0


def test_dali_decodes_an_early_epochs_first_batches_before_they_are_asked_for(tmp_path, monkeypatch):
    """Started early, the DALI graph runs on the next epoch's first two batches as
    soon as they are read — here including a sample that kills the decoder, which
    is still found, skipped and named as in a late start."""
    from pipeline.decode import dali as dali_backend
    from tests.pipeline.decode.test_dali import dht_broken_jpeg

    samples = [(f"{n:06d}", {"jpg": jpeg_bytes((96, 72), seed=n), "cls": str(n).encode()}) for n in range(20)]
    samples[1] = ("000001", {"jpg": dht_broken_jpeg(1), "cls": b"1"})  # in every epoch's first batch
    write_raw_shards(tmp_path, [samples[:10], samples[10:]])
    monkeypatch.setattr(dali_backend, "decoder_ready_jpeg", lambda data, policy: (data, 96, 72, None))

    def two_epochs(early: bool):
        loader = _loader(str(tmp_path), "dali", num_workers=1, overlap_epochs=early, max_corrupt_fraction=0.2,
                         plan=PlanConfig(shuffle=False))
        batches, primed = [], []
        for _ in range(2):
            for b in loader:
                batches.append((b.sample_ids.tolist(), b.images))
                time.sleep(0.05)  # a training step: the reader gets ahead
            run = loader.next_epoch.run
            primed.append(run is not None and run.poll.primed)
        loader.close()
        return batches, primed, dict(loader.stats.skipped)

    late, early = two_epochs(False), two_epochs(True)
    assert late[1] == [False, False] and early[1] == [True, True]
    assert [ids for ids, _ in early[0]] == [ids for ids, _ in late[0]]
    assert [i for ids, _ in early[0] for i in ids] == [i for i in range(20) if i != 1] * 2
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(early[0], late[0]))
    assert early[2] == late[2] == {"decode_failed": 2}


def test_dali_runs_nothing_early_on_first_batches_it_cannot_feed():
    """The early run waits for its first batches to be read, error-free and not
    empty; anything else is left to the epoch's own start, which reports it."""
    from pipeline.decode.dali import _Feed, _Prepared, _Threaded

    def batches(*kinds):
        for kind in kinds:
            if kind == "error":
                raise OSError("shard fetch failed")
            yield _Prepared(keys=["a"] if kind == "ok" else [])

    def ready(*kinds) -> bool:
        stream = _Threaded(batches(*kinds), 4)
        deadline = time.monotonic() + 5
        while len(stream.peek(4)) < len(kinds) + (kinds[-1] != "error") and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            return _Feed(stream, True).ready(2)
        finally:
            stream.close()

    assert ready("ok", "ok", "ok") and ready("ok", "ok")
    assert not ready("ok") and not ready("ok", "error") and not ready("ok", "empty", "ok")


_EXIT_PROBE = """
import sys, time, weakref
if sys.argv[2] == "finalizer-first":  # a weakref.finalize made before torch is imported: its exit hook runs last
    class Anything: pass
    kept = Anything()
    weakref.finalize(kept, print, "finalized", file=sys.stderr)
from pipeline.augment import AugmentConfig
from pipeline.loader import LoaderConfig, build_loader
loader = build_loader(LoaderConfig(url=sys.argv[1], batch_size=4, num_workers=2, augment=AugmentConfig(img_size=32)),
                      0, 1)
for _ in loader:
    pass
assert loader.next_epoch.run is not None  # the next epoch's workers run as the program ends, unclosed
print(time.monotonic(), flush=True)
"""


@pytest.mark.parametrize("order", ["plain", "finalizer-first"])
def test_a_program_that_ends_with_an_early_epoch_running_exits_at_once(ds, order):
    """At exit, multiprocessing SIGTERMs the workers it still has and waits for
    them; ours defer SIGTERM by a minute. The early epoch is closed first, whatever
    exit hooks the program registered before importing torch."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _EXIT_PROBE, ds, order], capture_output=True, text=True, timeout=120)
    ended = time.monotonic()
    assert out.returncode == 0, out.stderr[-2000:]
    assert ended - float(out.stdout.split()[-1]) < 10  # from the last line to the process gone


@pytest.mark.parametrize("backend", ["cpu", "dali"])
def test_an_epoch_that_cannot_start_early_starts_at_its_turn(ds, backend, monkeypatch, caplog):
    """Starting early is best effort: a failure there (a fork out of memory, a DALI
    build out of GPU memory beside the running pipeline) costs the current epoch
    nothing, and the next one starts at its turn, the same."""
    late = _epochs(_loader(ds, backend, overlap_epochs=False), 2)
    loader = _loader(ds, backend)
    cls = type(loader)
    if backend == "cpu":
        start = cls._start

        def failing(self, ids, epoch):
            if epoch == 1 and not failing.done:  # the early start of epoch 1 only
                failing.done = True
                raise OSError(12, "Cannot allocate memory")
            return start(self, ids, epoch)
        failing.done = False
        monkeypatch.setattr(cls, "_start", failing)
    else:
        pipeline = cls._pipeline

        def failing(self, source, batch_size, epoch, pipelined=True):
            if epoch == 1 and threading.current_thread().name == "dali-build" and not failing.done:
                failing.done = True
                raise RuntimeError("CUDA error: out of memory")
            return pipeline(self, source, batch_size, epoch, pipelined)
        failing.done = False
        monkeypatch.setattr(cls, "_pipeline", failing)
    with caplog.at_level(logging.WARNING):
        early = _epochs(loader, 2)
    assert failing.done
    assert ("could not start epoch 1 early (OSError" if backend == "cpu"
            else "DALI pipeline built early failed (RuntimeError: CUDA error: out of memory)") in caplog.text
    assert [(e, ids) for e, ids, _ in early] == [(e, ids) for e, ids, _ in late]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(early, late))
    loader.close()
