"""`mae simulate`: its download and cache predictions against a real run on a real S3
server, and cases whose traffic is known by hand."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from tests.helpers.cli import run_mae
from tests.helpers.shards import log_downloads, numbered_shards

from pipeline.augment import AugmentConfig
from pipeline.loader import LoaderConfig, build_loader
from pipeline.plan import PlanConfig, SamplePlan, SourceQuota
from pipeline.simulate import (ReaderSettings, SimulationConfig, report_lines, simulate, simulate_data,
                               synthetic_shards)
from pipeline.storage.config import StorageConfig
from pipeline.storage.store import ShardStore

SHARDS, PER_SHARD = 16, 6


def _measured_run(tmp_path: Path, monkeypatch, url: str, shard_bytes: int, *, workers: int, prefetch: int,
                  cache_shards: float) -> list[list[tuple[str, str, int]]]:
    """Two ranks (each its own node, its own cache) read two epochs through the real
    loader; every shard download is logged (from DataLoader workers too). Each epoch
    starts at its turn, as the simulation models it (data.overlap_epochs would fetch
    the next epoch's first shards a few batches early, logged in the epoch before)."""
    log = tmp_path / f"downloads-{workers}-{prefetch}.log"
    log_downloads(monkeypatch, log, lambda store, shard: f"{store.cache.dir.name} {shard.name} {shard.bytes}")
    for rank in range(2):
        cfg = LoaderConfig(url=url, batch_size=4, num_workers=workers, augment=AugmentConfig(img_size=16),
                           overlap_epochs=False,
                           plan=PlanConfig(window_shards=2, seed=3),
                           storage=StorageConfig(cache_dir=str(tmp_path / f"cache-{workers}-{prefetch}-{rank}"),
                                                 cache_limit_gb=cache_shards * shard_bytes / 2**30,
                                                 prefetch_shards=prefetch))
        loader = build_loader(cfg, rank=rank, world_size=2)
        for _ in range(2):
            for _ in loader:
                pass
            with open(log, "a") as f:
                f.write("epoch\n")
    epochs: list[list[tuple[str, str, int]]] = [[], []]
    marks = 0
    for line in log.read_text().splitlines():
        if line == "epoch":
            marks += 1
        else:
            cache, name, size = line.split()
            epochs[marks % 2].append((cache, name, int(size)))
    return epochs


@pytest.mark.integration
@pytest.mark.parametrize("workers, prefetch, cache_shards", [(0, 1, 4.5), (2, 2, 6), (0, 0, 3.5)])
def test_the_replay_predicts_a_real_runs_downloads_within_ten_percent(workers, prefetch, cache_shards, tmp_path,
                                                                      monkeypatch, s3_env):
    """16 shards on SeaweedFS, window 2, a cache of a few shards per node, two
    epochs: downloads, bytes and re-downloads (shards evicted, then needed again)
    per epoch, predicted vs measured."""
    m = numbered_shards(tmp_path / "ds", [PER_SHARD] * SHARDS)
    shard_bytes = m.shards[0].bytes
    assert {s.bytes for s in m.shards} == {shard_bytes}
    s3_env.create_bucket(f"sim{workers}{prefetch}")
    client = s3_env.client()
    for p in (tmp_path / "ds").iterdir():
        client.upload_file(str(p), f"sim{workers}{prefetch}", f"ds/{p.name}")
    measured = _measured_run(tmp_path, monkeypatch, f"s3://sim{workers}{prefetch}/ds", shard_bytes,
                             workers=workers, prefetch=prefetch, cache_shards=cache_shards)
    settings = ReaderSettings(batch_size=4, readers=max(1, workers), keep_open=3, prefetch=prefetch,
                              cache_limit_bytes=int(cache_shards * shard_bytes))
    sizes, nbytes = np.full(SHARDS, PER_SHARD), np.full(SHARDS, shard_bytes)
    report = simulate(lambda: SamplePlan(sizes, PlanConfig(window_shards=2, seed=3)), nbytes, settings,
                      SimulationConfig(world_size=2, ranks_per_node=1, epochs=2, nodes=2))
    seen: set[tuple[str, str]] = set()
    for epoch, real in enumerate(measured):
        predicted = report.epochs[epoch]
        redownloads = sum((c, n) in seen for c, n, _ in real)
        seen |= {(c, n) for c, n, _ in real}
        assert abs(predicted.bytes - sum(b for _, _, b in real)) <= 0.1 * sum(b for _, _, b in real)
        assert abs(predicted.downloads - len(real)) <= max(1, 0.1 * len(real)), (predicted, len(real))
        assert abs(predicted.redownloads - redownloads) <= max(1, 0.1 * redownloads), (predicted, redownloads)
    assert sum(t.redownloads for t in report.epochs) > 0  # the cache limit mattered
    assert report.per_rank(0, "samples") == SHARDS * PER_SHARD // 2


def _settings(**kw) -> ReaderSettings:
    return ReaderSettings(**{"batch_size": 8, "readers": 1, "keep_open": 3, "prefetch": 1,
                             "cache_limit_bytes": 10**12, **kw})


def test_with_room_for_everything_each_shard_is_downloaded_once():
    sizes, nbytes = synthetic_shards(2_000, 40, 1000)
    report = simulate(lambda: SamplePlan(sizes, PlanConfig(window_shards=2)), nbytes, _settings(),
                      SimulationConfig(world_size=4, ranks_per_node=4, epochs=3))
    assert [t.downloads for t in report.epochs] == [40, 0, 0]
    assert report.epochs[0].bytes == 40_000 and report.epochs[0].samples == 2_000
    assert report.per_rank(0, "bytes") == 10_000 and report.epochs[1].hits > 0


def test_a_cache_smaller_than_what_readers_hold_open_is_flagged():
    sizes, nbytes = synthetic_shards(2_000, 40, 1000)
    report = simulate(lambda: SamplePlan(sizes, PlanConfig(window_shards=4)), nbytes,
                      _settings(keep_open=5, cache_limit_bytes=3000), SimulationConfig(world_size=2, ranks_per_node=2))
    assert report.peak_pinned_bytes >= 5000 > report.settings.cache_limit_bytes
    assert report.peak_cache_bytes >= 5000
    # prefetched shards stay pinned until used: however small the cache, none is fetched twice in an epoch
    assert (report.epochs[0].downloads, report.epochs[0].redownloads) == (40, 0)
    text = "\n".join(report_lines(report, "test"))
    assert "the cache ran over its limit" in text and "raise data.storage.cache_limit_gb" in text


def test_down_sampling_a_source_downloads_only_the_shards_it_reads():
    sizes = np.full(60, 50)
    nbytes = np.full(60, 1000)
    quotas = [SourceQuota(0, 10, 500), SourceQuota(10, 60, 120)]  # all of A; 120 of B's 2,500 samples
    report = simulate(lambda: SamplePlan(sizes, PlanConfig(), quotas), nbytes, _settings(),
                      SimulationConfig(world_size=1, ranks_per_node=1, epochs=1))
    assert report.epochs[0].downloads == 10 + 3  # B: two whole shards and part of a third


def test_the_bandwidth_a_target_needs():
    sizes, nbytes = synthetic_shards(8_000, 80, 10**6)
    report = simulate(lambda: SamplePlan(sizes), nbytes, _settings(),
                      SimulationConfig(world_size=16, ranks_per_node=8, nodes=2, target_images_per_s=1600))
    # a node reads its 4,000 samples' 40 shards (40 MB) per epoch at 800 img/s: 5 s, 8 MB/s = 0.064 Gbit/s
    assert report.epochs[0].bytes == 2 * 40 * 10**6
    assert report.node_gbit_needed(0) == pytest.approx(0.064)


def test_mae_simulate_reads_manifests_only(tmp_path, capsys, monkeypatch):
    numbered_shards(tmp_path / "a", [5] * 6)
    numbered_shards(tmp_path / "b", [3] * 4)

    def no_data(*a, **k):
        raise AssertionError("the simulator read a shard")

    monkeypatch.setattr(ShardStore, "local_path", no_data)
    monkeypatch.setattr(ShardStore, "open_shard", no_data)
    out = run_mae(capsys, "simulate", f"data.sources=[{{url: {tmp_path / 'a'}, weight: 1}}, "
                                      f"{{url: {tmp_path / 'b'}, samples: 24}}]", "data.epoch_samples=54",
                  "--world", "3", "--ranks-per-node", "3", "--target-ips", "100")
    assert out.code == 0, out.err
    assert "a: 30 of 30 samples/epoch in 6 shards, b: 24 of 12 samples/epoch in 4 shards" in out.out
    assert "per rank" in out.out and "at 100 img/s" in out.out
    out = run_mae(capsys, "simulate", f"data.url={tmp_path / 'a'}", "--world", "2", "--json")
    report = json.loads(out.out)
    assert report["epochs"][0]["samples"] == 30 and report["first_batch_seconds"] > 0


def test_synthetic_simulation_needs_no_dataset(capsys):
    out = run_mae(capsys, "simulate", "--world", "64", "--samples", "1e6", "--shards", "1000", "--shard-bytes",
                  "100MB", "--epochs", "1")
    assert out.code == 0 and "synthetic: 1,000,000 samples in 1,000 shards" in out.out
    assert "plan         one rank" in out.out


def test_a_fine_tuning_config_is_simulated_by_its_own_schema(capsys):
    args = ("--world", "2", "--samples", "1000", "--json")
    tuned = json.loads(run_mae(capsys, "simulate", "--config", "finetune_tiny_cpu", "data.batch_size=24", *args).out)
    assert tuned["settings"]["batch_size"] == 24 and tuned["epochs"][0]["samples"] == 1000
    # a mistake is named by the schema the file is written for
    out = run_mae(capsys, "simulate", "--config", "finetune_tiny_cpu", "mixup.bogus=1", *args)
    assert out.code == 2 and "unknown config key mixup.bogus; valid keys here: cutmix_alpha" in out.err
    out = run_mae(capsys, "simulate", "--config", "tiny_cpu", "optim.bogus=1", *args)
    assert out.code == 2 and "unknown config key optim.bogus; valid keys here: accum_steps" in out.err


def test_simulate_data_measures_the_manifest_load(tmp_path):
    numbered_shards(tmp_path / "a", [4] * 3)
    report, what = simulate_data(LoaderConfig(url=str(tmp_path / "a"), num_workers=0), SimulationConfig(world_size=1),
                                 started=time.perf_counter())
    assert report.config.manifest_seconds > 0 and what.startswith("a: 12 of 12")
