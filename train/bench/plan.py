"""`mae bench plan`: what one rank's sample plan costs, from 1 M to 2 B samples, and
how fast a 200,000-shard manifest loads — side by side with the plain ways in one run.

Per dataset size (synthetic shard sizes, no data): a fresh ``SamplePlan`` until
one rank holds its epoch of sample ids (time: median of rounds; memory: the
tracemalloc peak, numpy included), the same after two elastic restarts, and —
up to ``reference_max`` samples — the materialized reference (plan version 1's
algorithm: the whole epoch per rank). Manifest: ``manifest.index`` vs parsing
``manifest.json``, both validated, alternated. Optionally a plot of time and
memory against the dataset size.
"""

from __future__ import annotations

import hashlib
import statistics
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from infra.options import option, require, require_positive
from pipeline.plan import PlanConfig, SamplePlan, reference_rank_sequence
from pipeline.shards.manifest import ShardInfo, ShardManifest
from pipeline.shards.manifest_index import encode_index, table_for
from pipeline.simulate import synthetic_shards
from train.bench.inputs import alternate

MiB = 2**20
IMAGENET = (1_281_167, 1_024, 1_024)
LADDER = ((1_000_000, 100, 4096), (10_000_000, 1_000, 4096), (100_000_000, 10_000, 4096),
          (400_000_000, 40_000, 4096), (1_000_000_000, 100_000, 4096), (2_000_000_000, 200_000, 4096))
# the targets: (samples, shards, world) -> (seconds, MiB)
TARGETS = {(2_000_000_000, 200_000, 4096): (2.0, 64.0), IMAGENET: (0.1, 8.0)}
INDEX_TARGET_S = 2.0


@dataclass(frozen=True)
class PlanBench:
    sizes: tuple[tuple[int, int, int], ...] = option((IMAGENET, *LADDER), "(samples, shards, ranks) per row")
    window_shards: int = option(4, "data.plan.window_shards")
    rounds: int = option(3, "timed repetitions (median)")
    reference_max: int = option(10_000_000, "largest dataset the materialized reference runs on")
    index_shards: int = option(200_000, "shards of the manifest whose loads are compared (0: skip)")

    def __post_init__(self) -> None:
        require_positive(self, "window_shards", "rounds")
        require(all(len(s) == 3 and 1 <= s[1] <= s[0] and s[2] >= 1 for s in self.sizes), "sizes",
                "must be (samples, shards, ranks) with 1 <= shards <= samples and ranks >= 1")
        require(self.index_shards >= 0, "index_shards", f"must be >= 0, got {self.index_shards}")


def _timed(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def bench_size(samples: int, shards: int, world: int, cfg: PlanBench) -> dict[str, object]:
    """One row: a rank's plan (fresh, and after two elastic restarts), and the reference."""
    sizes, _ = synthetic_shards(samples, shards, 1)
    plan_cfg = PlanConfig(seed=1, window_shards=cfg.window_shards)
    rank = world // 2
    fresh = lambda: SamplePlan(sizes, plan_cfg).rank_sequence(0, [[world, 0]], rank)  # noqa: E731
    per = -(-samples // world)
    hops = [[world, per // 3], [max(1, world * 3 // 4), per // 5], [world, 0]]
    elastic = lambda: SamplePlan(sizes, plan_cfg).rank_sequence(0, hops, rank)  # noqa: E731
    ids, _ = fresh()
    row: dict[str, object] = {"samples": samples, "shards": shards, "world": world, "rank_samples": len(ids),
                              "first_ids_s": _timed(fresh, cfg.rounds), "peak_mib": _peak(fresh) / MiB,
                              "elastic_s": _timed(elastic, cfg.rounds), "elastic_peak_mib": _peak(elastic) / MiB}
    if samples <= cfg.reference_max:
        reference = lambda: reference_rank_sequence(SamplePlan(sizes, plan_cfg), 0, [[world, 0]], rank)  # noqa: E731
        if not np.array_equal(reference()[0], ids):
            raise RuntimeError(f"the plan and its reference disagree at {samples} samples")
        row.update(reference_s=_timed(reference, cfg.rounds), reference_peak_mib=_peak(reference) / MiB)
        row.update(time_ratio=row["reference_s"] / row["first_ids_s"],
                   memory_ratio=row["reference_peak_mib"] / row["peak_mib"])
    target = TARGETS.get((samples, shards, world))
    if target:
        row["target"] = {"seconds": target[0], "mib": target[1],
                         "met": row["first_ids_s"] < target[0] and row["peak_mib"] < target[1]}
    return row


def synthetic_manifest_json(shards: int, samples_per_shard: int = 10_000) -> tuple[ShardManifest, bytes]:
    infos = [ShardInfo(f"shard-{i:06d}.tar", samples_per_shard, 256 * MiB, hashlib.sha256(b"%d" % i).hexdigest())
             for i in range(shards)]
    manifest = ShardManifest(infos, options={"format": "tar"})
    return manifest, manifest.to_json().encode()


def bench_index(shards: int, rounds: int) -> dict[str, float]:
    """Loading ``shards`` shards for a loader: the index (JSON hashed to check it is
    current) vs the JSON parsed and validated; alternated, medians."""
    manifest, text = synthetic_manifest_json(shards)
    index = encode_index(manifest, text)
    from_index, from_json = lambda: table_for(text, index, "bench"), lambda: table_for(text, None, "bench")  # noqa: E731
    if from_index().fingerprint() != from_json().fingerprint():
        raise RuntimeError("the index and the JSON give different shards")
    index_s, json_s = alternate(from_index, from_json, rounds)
    return {"shards": shards, "json_mib": len(text) / MiB, "index_mib": len(index) / MiB, "index_s": index_s,
            "json_s": json_s, "speedup": json_s / index_s, "index_peak_mib": _peak(from_index) / MiB,
            "met": index_s < INDEX_TARGET_S}


def bench_plan(cfg: PlanBench) -> dict[str, object]:
    SamplePlan([1], PlanConfig()).rank_sequence(0, [[1, 0]], 0)  # numpy's RNG module loads once per process
    rows = [bench_size(*size, cfg) for size in cfg.sizes]
    return {"window_shards": cfg.window_shards, "rounds": cfg.rounds, "rows": rows,
            "index": bench_index(cfg.index_shards, cfg.rounds) if cfg.index_shards else None}


def plot_scaling(report: dict[str, object], path: str) -> None:
    """Time to a rank's sample ids and its peak memory against the dataset size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted({r["world"] for r in report["rows"]})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, ref, label in ((axes[0], "first_ids_s", "reference_s", "seconds to one rank's sample ids"),
                                (axes[1], "peak_mib", "reference_peak_mib", "peak MiB of one rank's plan")):
        for world in worlds:  # one line per rank count of --sizes
            rows = sorted((r for r in report["rows"] if r["world"] == world), key=lambda r: r["samples"])
            ax.loglog([r["samples"] for r in rows], [r[key] for r in rows], "o-",
                      label=f"per-rank plan (v2), {world:,} ranks")
            done = [r for r in rows if ref in r]
            if done:
                ax.loglog([r["samples"] for r in done], [r[ref] for r in done], "s--",
                          label=f"whole epoch per rank (v1), {world:,} ranks")
        ax.set_xlabel("samples in the dataset")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
