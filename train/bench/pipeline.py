"""`mae bench pipeline`: the data path measured side by side, in one run.

(a) bucket read bandwidth: plain ``s3fs cat`` of every shard vs the reader's
    verified, cached fetch of the same shard, interleaved shard by shard, against
    an S3 endpoint (the CLI starts SeaweedFS on loopback unless given a bucket),
    with the cache at its limit and while it fills;
(b) decode: each backend's (``--backend cpu|dali|ffcv|all``) images/sec and
    CPU-ms per image vs a baseline like the official MAE loader (one JPEG file per
    image, PIL decode, crop then bicubic resize, flip, float normalize in
    DataLoader workers), same images, same worker count, runs alternated;
(c) memory: peak RSS of a process streaming the whole bucket dataset through a
    cache several times smaller than the data;
(d) epoch boundaries: the wait for each epoch's first batch with the next epoch
    started early (``data.overlap_epochs``, the default) and late, alternated.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from infra.options import option, require, require_positive
from pipeline.augment import AugmentConfig, Normalizer, crop_and_flip, sample_rng
from pipeline.loader import DaliOptions, LoaderConfig, build_loader
from pipeline.shards.writer import ShardWriterConfig, write_shards
from pipeline.storage.cache import ShardCache
from pipeline.storage.config import StorageConfig
from pipeline.storage.store import ShardStore
from pipeline.storage.urls import filesystem, join
from train.bench.streaming import PEERS, bench_stream, format_stream
from train.errors import ConfigError

MiB = 2**20


def cpu_seconds() -> float:
    """CPU time of this process plus its finished (waited-for) children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def official_recipe(img: Image.Image, aug: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    """The official MAE recipe in PIL, as its users write it: RGB, RandomResizedCrop
    (crop, then a bicubic resize), flip."""
    img = img.convert("RGB")
    (x, y, w, h), flip = crop_and_flip(img.size[0], img.size[1], aug, rng)
    img = img.crop((x, y, x + w, y + h)).resize((aug.img_size,) * 2, Image.BICUBIC)
    return img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img


class PerFileBaseline(Dataset):
    """The official MAE recipe on per-file JPEGs: PIL open, RGB, RandomResizedCrop
    (crop, then bicubic resize), flip, ToTensor, Normalize — in each worker."""

    def __init__(self, paths: list[Path], aug: AugmentConfig) -> None:
        self.paths, self.aug = paths, aug
        self.normalize = Normalizer(aug.mean, aug.std)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with open(self.paths[i], "rb") as f:
            img = official_recipe(Image.open(f), self.aug, sample_rng(0, 0, i))
        return self.normalize(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None])[0]


def _timed(iterable) -> dict[str, float]:
    """One pass: images/s and CPU per image over all of it, and images/s after the
    first batch (a pass of a few thousand images is short next to a real epoch, so
    a start-up, DALI's graph and decoder set-up, weighs more here than in a run)."""
    cpu0, t0, n, first, first_n = cpu_seconds(), time.perf_counter(), 0, None, 0
    for batch in iterable:
        n += len(batch.keys) if hasattr(batch, "keys") else len(batch)
        if first is None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            first, first_n = time.perf_counter(), n
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    end = time.perf_counter()
    wall, cpu = end - t0, cpu_seconds() - cpu0
    after = end - first if first is not None else 0.0
    return {"images": n, "wall_s": wall, "images_per_s": n / wall, "cpu_ms_per_image": 1e3 * cpu / n,
            "first_batch_s": (first or end) - t0,
            "after_first_batch_images_per_s": (n - first_n) / after if after > 0 else 0.0}


DECODE_BACKENDS = ("cpu", "dali", "ffcv")


def medians(runs: dict[str, list[dict]], keys: tuple[str, ...]) -> dict[str, dict]:
    """Per contender: the median of each figure over its alternated runs, and the runs."""
    return {name: {**{k: statistics.median(r[k] for r in rs) for k in keys}, "runs": rs} for name, rs in runs.items()}


def dali_host_side(loader) -> Iterator:
    """One epoch of what the ``dali`` backend does on the host, without DALI: read
    each sample's bytes, check its JPEG header and plan its crop, build the
    external-source inputs. On a GPU node, where nvJPEG decodes, this is the
    whole host cost per image."""
    from pipeline.decode.dali import dali_inputs

    ids, _ = loader._rank_ids()
    for batch in loader._prepare(ids, 0):
        dali_inputs(batch, loader.plan_crops)
        yield batch


def dali_graph_only(loader) -> Iterator:
    """One epoch of the ``dali`` backend's own graph fed from memory: every batch's
    inputs are read, checked and planned first (not timed), then DALI decodes them
    and each output is handed to torch as the loader does. Beside the loader's
    figure and ``dali_host_side`` it says whether DALI's decoding or our feeding of
    it sets the rate (on a GPU: is nvJPEG the limit, or the host)."""
    from pipeline.decode.dali import dali_inputs

    ids, _ = loader._rank_ids()
    batches = list(loader._prepare(ids, 0))
    inputs = iter([dali_inputs(batch, loader.plan_crops) for batch in batches if batch.keys])  # as the loader feeds

    def run() -> Iterator:
        pipe = loader._pipeline(lambda: next(inputs), loader.config.batch_size, 0)
        for batch in batches:  # a batch whose every sample was skipped is not fed: it comes out empty
            decoded = loader._result(batch, pipe.run()[0] if batch.keys else None)
            decoded.images = loader._finish(decoded.images, decoded.ids)
            yield decoded

    return run()


def bench_decode(shards_url: str, beton_url: str | None, files: list[Path], batch: int, workers: int, rounds: int,
                 backends: tuple[str, ...] = ("cpu",), device: str = "cpu") -> dict[str, object]:
    """The per-file PIL baseline vs each backend, same images, same worker/thread
    count, alternated round by round. ``cpu`` runs twice: uint8 out (what a GPU run
    pays on the host: normalization happens on the device) and normalized on the
    host (a CPU-only run); ``dali`` and ``ffcv`` normalize themselves. FFCV's
    one-off JIT warm-up is reported apart (one untimed epoch first)."""
    cfg = LoaderConfig(url=shards_url, batch_size=batch, num_workers=workers, overlap_epochs=False)  # one pass each
    runners: dict[str, object] = {"per_file_pil_baseline": lambda: DataLoader(
        PerFileBaseline(files, cfg.augment), batch_size=batch, num_workers=workers, shuffle=True,
        persistent_workers=False)}
    if "cpu" in backends:
        runners["cpu_backend_uint8"] = lambda: build_loader(replace(cfg, normalize=False), 0, 1, device)
        runners["cpu_backend_host_normalize"] = lambda: build_loader(cfg, 0, 1, device)
    if "dali" in backends:
        dali = replace(cfg, backend="dali")
        runners["dali_backend"] = lambda: build_loader(dali, 0, 1, device)
        runners["dali_backend_whole"] = lambda: build_loader(replace(dali, dali=DaliOptions(decode="whole")), 0, 1,
                                                             device)
        runners["dali_host_side"] = lambda: dali_host_side(build_loader(dali, 0, 1, device))
        runners["dali_graph_only"] = lambda: dali_graph_only(build_loader(dali, 0, 1, device))
    warmup = {}
    if "ffcv" in backends:
        ffcv = build_loader(replace(cfg, backend="ffcv", url=beton_url), 0, 1, device)
        t0 = time.perf_counter()
        for _ in ffcv:  # JIT compile: once per process
            pass
        warmup["ffcv_first_epoch_s"] = time.perf_counter() - t0
        warmup["ffcv_jit_first_batch_s"] = ffcv.stats.warmup_s
        runners["ffcv_backend"] = lambda: ffcv
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    for _ in range(rounds):  # alternate A B C A B C so drift hits all alike
        for name, make in runners.items():
            runs[name].append(_timed(make()))
    out: dict[str, object] = {"warmup": warmup}
    out.update(medians(runs, ("images_per_s", "cpu_ms_per_image", "first_batch_s", "after_first_batch_images_per_s")))
    b = out["per_file_pil_baseline"]
    for name in runs:
        if name != "per_file_pil_baseline":
            out[name]["cpu_per_image_reduction"] = b["cpu_ms_per_image"] / out[name]["cpu_ms_per_image"]
            out[name]["throughput_ratio"] = out[name]["images_per_s"] / b["images_per_s"]
    return out


def _epoch_waits(loader, epochs: int, step_s: float) -> dict[str, object]:
    """``epochs`` epochs of ``loader`` behind a consumer that spends ``step_s`` per
    batch asleep (a GPU step: the host's cores stay the loader's). Each batch's
    wait; the first epoch's first batch is the run's start, not a boundary. The
    longest wait inside an epoch shows what starting the next one early costs
    the batch it is started at (a fork, a DALI graph built in a thread)."""
    starts, inside, t_run = [], [], time.perf_counter()
    for _ in range(epochs):
        first = True
        t0 = time.perf_counter()
        for _batch in loader:
            (starts if first else inside).append(time.perf_counter() - t0)
            first = False
            time.sleep(step_s)
            t0 = time.perf_counter()
    wall = time.perf_counter() - t_run
    loader.close()
    waited = sum(starts[1:]) + sum(inside)
    return {"boundary_wait_s": statistics.median(starts[1:]), "start_wait_s": starts[0],
            "in_epoch_median_wait_s": statistics.median(inside), "in_epoch_max_wait_s": max(inside),
            "batches": len(starts) + len(inside),
            "data_wait_fraction": waited / (wall - starts[0]), "boundary_waits_s": starts[1:]}


def bench_epochs(shards_url: str, batch: int, workers: int, rounds: int, backends: tuple[str, ...], device: str,
                 epochs: int, step_ms: float) -> dict[str, object]:
    """Per backend (``cpu``, ``dali``): the next epoch started early and late, in
    alternated rounds of ``epochs`` epochs each; medians over the rounds."""
    cfg = LoaderConfig(url=shards_url, batch_size=batch, num_workers=workers)
    runs: dict[str, list[dict]] = {}
    for _ in range(rounds):
        for backend in [b for b in backends if b in ("cpu", "dali")]:
            for early in (False, True):
                loader = build_loader(replace(cfg, backend=backend, overlap_epochs=early), 0, 1, device)
                runs.setdefault(f"{backend}_{'early' if early else 'late'}", []).append(
                    _epoch_waits(loader, epochs, step_ms / 1e3))
    out: dict[str, object] = {"epochs": epochs, "step_ms": step_ms, "rounds": rounds}
    out.update(medians(runs, ("boundary_wait_s", "in_epoch_median_wait_s", "in_epoch_max_wait_s",
                              "data_wait_fraction")))
    for backend in ("cpu", "dali"):
        if f"{backend}_early" in out:
            late, early = out[f"{backend}_late"], out[f"{backend}_early"]
            early["boundary_wait_vs_late"] = early["boundary_wait_s"] / late["boundary_wait_s"]
    return out


# The reader's levers, each one setting changed from the default (xxh3-128, 8 MiB
# ranges x 4): name -> StorageConfig changes.
READER_VARIANTS: dict[str, dict[str, object]] = {
    "reader": {},
    "reader_sha256": {"checksum": "sha256"},  # the verification every release before this one did
    "reader_client": {"direct_ranges": False},  # each range a get_object call, as before presigned ranges
    "reader_memory": {"cache_mode": "memory"},
    "reader_16mib_ranges": {"range_mib": 16},
    "reader_4mib_ranges": {"range_mib": 4},
}


class _Timer:
    """Wall and CPU seconds per name, summed over calls."""

    def __init__(self, names) -> None:
        self.seconds, self.cpu = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)

    def run(self, name: str, fn) -> None:
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        self.seconds[name] += time.perf_counter() - t0
        self.cpu[name] += time.process_time() - c0

    def rates(self, nbytes: int) -> dict[str, float]:
        out = {}
        for name in self.seconds:
            out[f"{name}_MiB_s"] = nbytes / self.seconds[name] / MiB
            out[f"{name}_client_cpu_ms_per_MiB"] = 1e3 * self.cpu[name] / (nbytes / MiB)
        out["reader_vs_raw"] = out["reader_MiB_s"] / out["raw_cat_MiB_s"]
        out["reader_cpu_vs_raw"] = out["reader_client_cpu_ms_per_MiB"] / out["raw_cat_client_cpu_ms_per_MiB"]
        return out


class _FetchCount:
    """Bytes a store downloaded: every measured read must be a real fetch, not a cache hit."""

    def __init__(self) -> None:
        self.bytes = 0

    def __call__(self, event: str, n: int) -> None:
        if event == "bytes_fetched":
            self.bytes += n


def bench_read(url: str, storage: StorageConfig, cache_dir: str, rounds: int) -> dict[str, object]:
    """Raw ``cat`` (to memory), raw ``cat`` + write to local disk, and the reader's
    verified fetch of the same shards, interleaved shard by shard, in two states:

    - *steady*: every disk cache at its limit (the largest shard), so each fetch evicts the
      last one, as when a dataset larger than the cache streams through it; one
      unmeasured pass fills the caches first. Each lever of ``READER_VARIANTS``.
    - *filling*: the default reader into an empty, unbounded cache, against raw cat:
      every byte lands on page-cache pages the node has not used yet.

    The order of the contenders rotates from shard to shard. Every measured reader
    call is checked to have downloaded its whole shard."""
    fs, root = filesystem(url, storage)
    shards = ShardStore(url, storage).read_manifest().shards
    if len(shards) < 2:
        raise ConfigError(f"the read part needs at least 2 shards, so that a cache of one shard misses on every read; "
                          f"the dataset has {len(shards)}: lower --shard-size or raise --images")
    shutil.rmtree(cache_dir, ignore_errors=True)  # every reader starts from an empty cache (a kept --workdir too)
    Path(cache_dir).mkdir(parents=True)
    limit = max(s.bytes for s in shards)  # the largest shard: any two are more (memory mode: the one it holds)

    def raw_cat(to_disk: bool = False):
        def read(shard):
            data = _check_len(fs.cat_file(join(root, shard.name)), shard)
            if to_disk:
                Path(f"{cache_dir}/raw.tar").write_bytes(data)
        return read

    def reader(store: ShardStore):
        return lambda shard: store.open_shard(shard).close()

    counts = {name: _FetchCount() for name in READER_VARIANTS}
    steady = {"raw_cat": raw_cat(), "raw_cat_to_disk": raw_cat(to_disk=True)} | {
        name: reader(ShardStore(url, replace(storage, cache_dir=f"{cache_dir}/steady-{name}",
                                             cache_limit_gb=limit / 2**30, **changes), counts[name]))
        for name, changes in READER_VARIANTS.items()}
    for shard in shards:  # fill every cache to its limit, unmeasured
        for read in steady.values():
            read(shard)
    timer, filling, total = _Timer(steady), _Timer(("raw_cat", "reader")), 0
    fill_count = _FetchCount()
    for c in counts.values():
        c.bytes = 0
    for r in range(rounds):
        fill = {"raw_cat": raw_cat(), "reader": reader(
            ShardStore(url, replace(storage, cache_dir=f"{cache_dir}/fill-{r}", cache_limit_gb=1024), fill_count))}
        for j, shard in enumerate(shards):
            for name, read in _rotated(list(steady.items()), j):
                timer.run(name, lambda: read(shard))
            for name, read in _rotated(list(fill.items()), j):
                filling.run(name, lambda: read(shard))
            total += shard.bytes
    missed = {name: c.bytes for name, c in [*counts.items(), ("filling", fill_count)] if c.bytes != total}
    if missed:
        raise RuntimeError(f"readers fetched other than the {total} bytes read ({missed}): a cache hit was timed")
    out: dict[str, object] = {"bytes": total, "cache_limit_MiB": limit / MiB, **timer.rates(total)}
    out["reader_vs_raw_to_disk"] = out["reader_MiB_s"] / out["raw_cat_to_disk_MiB_s"]
    out["filling"] = filling.rates(total)
    out["page_cache_write"] = page_cache_write_cost(Path(cache_dir) / "pages", limit)
    out["cache_commit"] = cache_commit_cost(Path(cache_dir) / "commits")
    return out


def cache_commit_cost(folder: Path, entries: int = 20_000, commits: int = 2_000,
                      shard_bytes: int = 16 * MiB) -> dict[str, float]:
    """CPU per commit into a full node cache of ``entries`` shards (sparse files: the
    sizes are real, the blocks are not written), listings included (enough commits
    for several), against one listing of its folder, which every commit made before
    the cache kept a ledger."""
    cache = ShardCache(folder, limit_bytes=entries * shard_bytes)
    for i in range(entries):
        with open(cache.dir / f"{hashlib.sha256(b'old%d' % i).hexdigest()}.tar", "wb") as f:
            f.truncate(shard_bytes)
    c0 = time.process_time()
    cache.evict()  # builds the ledger: one listing
    listing = time.process_time() - c0
    listings = 0
    evict = cache.evict

    def counted() -> int:
        nonlocal listings
        listings += 1
        return evict()

    cache.evict = counted  # type: ignore[method-assign]
    c0 = time.process_time()
    for i in range(commits):
        digest = hashlib.sha256(b"new%d" % i).hexdigest()
        tmp = cache.temp_path(digest)
        with open(tmp, "wb") as f:
            f.truncate(shard_bytes)
        cache.commit(digest, tmp)[1].close()
    per_commit = (time.process_time() - c0) / commits
    shutil.rmtree(folder)
    return {"entries": entries, "commits": commits, "listings": listings, "commit_cpu_ms": 1e3 * per_commit,
            "listing_cpu_ms": 1e3 * listing}


def page_cache_write_cost(folder: Path, nbytes: int, files: int = 4) -> dict[str, float]:
    """CPU-ms per MiB to write ``files`` new files of ``nbytes`` (pages the page
    cache takes from free memory), then to write them again after deleting them
    (pages just freed). On a VM whose balloon reports free pages to the host, the
    first costs a fault into the hypervisor per page."""
    folder.mkdir(parents=True, exist_ok=True)
    data = os.urandom(nbytes)
    out = {}
    for label in ("fresh", "recycled"):
        c0 = time.process_time()
        for i in range(files):
            (folder / f"{i}.bin").write_bytes(data)
        out[f"{label}_cpu_ms_per_MiB"] = 1e3 * (time.process_time() - c0) / (files * nbytes / MiB)
        for i in range(files):
            (folder / f"{i}.bin").unlink()
    return out


def _rotated(items: list, k: int) -> list:
    """``items`` starting at ``k`` (mod its length): each contender takes each place in
    the order in turn, so none always follows the same one."""
    k %= len(items)
    return items[k:] + items[:k]


def _check_len(data: bytes, shard) -> bytes:
    if len(data) != shard.bytes:
        raise OSError(f"{shard.name}: read {len(data)} bytes, manifest says {shard.bytes}")
    return data


RSS_CHILD = """
import json, resource, sys
from pipeline.loader import LoaderConfig, build_loader
from pipeline.plan import PlanConfig
from pipeline.storage.config import StorageConfig
url, cache, limit, endpoint = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
storage = StorageConfig(endpoint_url=endpoint or None, cache_dir=cache, cache_limit_gb=limit / 2**30,
                        prefetch_shards=1)
loader = build_loader(LoaderConfig(url=url, batch_size=32, num_workers=2, storage=storage, overlap_epochs=False,
                                   plan=PlanConfig(window_shards=1)), 0, 1)
def rss_mib():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
n, trace, total = 0, [], len(loader)
for i, b in enumerate(loader):
    n += len(b.keys)
    if (i + 1) % max(1, total // 4) == 0:
        trace.append(round(rss_mib()))
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"images": n, "main_peak_rss_MiB": me.ru_maxrss / 1024, "worker_peak_rss_MiB": kids.ru_maxrss / 1024,
                  "main_rss_trace_MiB": trace}))
"""


def bench_rss(url: str, endpoint: str | None, cache_limit: int, dataset_bytes: int) -> dict[str, object]:
    """Peak RSS of a fresh process streaming the whole dataset through a cache of
    ``cache_limit`` bytes (credentials from this process's environment)."""
    with tempfile.TemporaryDirectory(prefix="mae-rss-cache-") as cache:
        out = subprocess.run([sys.executable, "-c", RSS_CHILD, url, cache, str(cache_limit), endpoint or ""],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"RSS streaming run failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["cache_final_MiB"] = sum(p.stat().st_size for p in Path(cache).glob("*.tar")) / MiB
    result.update({"dataset_MiB": dataset_bytes / MiB, "cache_limit_MiB": cache_limit / MiB})
    return result


def photo_files(src: Path, count: int) -> list[Path]:
    """``count`` ImageNet-like JPEGs under ``src``: the ones already there when the
    count matches (a kept ``--workdir``), else freshly generated."""
    from infra.testing.photos import write_photo_folder

    files = sorted(src.rglob("*.jpg")) if src.exists() else []
    return files if len(files) == count else write_photo_folder(src, count, labelled=True)


def prepare_decode_data(work: Path, images: int, shard_bytes: int = 16 * MiB) -> None:
    """What ``run --parts decode --workdir work`` reads, made ahead (the GPU check
    builds it in the background while other sections use the GPU)."""
    photo_files(work / "src", images)
    write_shards(str(work / "src"), str(work / "shards"), ShardWriterConfig(shard_bytes=shard_bytes, workers=2))


PARTS = ("read", "decode", "rss", "stream", "epochs")


@dataclass(frozen=True)
class PipelineBench:
    images: int = option(2000, "ImageNet-like JPEGs made from the bundled photos")
    batch: int = option(64, "batch size")
    workers: int = option(2, "DataLoader workers (or DALI threads) for every decode path")
    rounds: int = option(2, "alternated rounds")
    shard_bytes: int = option(16 * MiB, "target bytes per shard")
    backends: tuple[str, ...] = option(("cpu",), "decode backends to compare with the baseline")
    device: str = option("cpu", "where batches go")
    parts: tuple[str, ...] = option(PARTS, "read, decode, rss, stream, epochs")
    epochs: int = option(4, "epochs: epochs per run")
    step_ms: float = option(150.0, "epochs: the consumer's time per batch, asleep (a GPU step leaves the host idle)")
    against: tuple[str, ...] = option((), "stream: peer libraries read side by side (litdata, webdataset, streaming)")

    def __post_init__(self) -> None:
        require_positive(self, "images", "batch", "rounds", "shard_bytes", "step_ms")
        require(self.epochs >= 2, "epochs", f"must be >= 2 (a boundary needs two epochs), got {self.epochs}")
        require(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        require(set(self.backends) <= {"cpu", "dali", "ffcv"}, "backends",
                f"must be cpu, dali or ffcv, got {self.backends}")
        require(bool(self.parts) and set(self.parts) <= set(PARTS), "parts", f"must be among {PARTS}, got {self.parts}")
        require(set(self.against) <= set(PEERS), "against", f"must be among {PEERS}, got {self.against}")


def run_pipeline_bench(cfg: PipelineBench, work: Path, bucket_url: str | None = None,
                       storage: StorageConfig = StorageConfig()) -> dict[str, object]:
    """Every part asked for, on images made under ``work``. ``read``, ``rss`` and
    ``stream`` write the shards to ``bucket_url`` (an object-store prefix reached
    with ``storage``) and need one."""
    unknown = set(cfg.parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown benchmark parts {sorted(unknown)}; valid: {', '.join(PARTS)}")
    src = work / "src"
    files = photo_files(src, cfg.images)
    report: dict[str, object] = {"images": len(files), "torch_threads": torch.get_num_threads(),
                                 "cpus": os.cpu_count(), "device": cfg.device}
    if {"read", "rss", "stream"} & set(cfg.parts):
        if bucket_url is None:
            raise ValueError("the read, rss and stream parts need an object-store prefix to write shards to")
        summary = write_shards(str(src), bucket_url, ShardWriterConfig(shard_bytes=cfg.shard_bytes, workers=2,
                                                                       storage=storage))
        if "read" in cfg.parts:
            report["read"] = bench_read(bucket_url, storage, str(work / "read-cache"), cfg.rounds)
        if "rss" in cfg.parts:
            report["rss"] = bench_rss(bucket_url, storage.endpoint_url,
                                      cache_limit=max(summary.manifest.total_bytes // 5, 2 * cfg.shard_bytes),
                                      dataset_bytes=summary.manifest.total_bytes)
        if "stream" in cfg.parts:
            report["stream"] = bench_stream(files, bucket_url, storage, work, cfg.against, cfg.workers, cfg.batch,
                                            cfg.rounds)
    shard_cfg = ShardWriterConfig(shard_bytes=cfg.shard_bytes, workers=2)
    if {"decode", "epochs"} & set(cfg.parts):
        write_shards(str(src), str(work / "shards"), shard_cfg)
    if "epochs" in cfg.parts:
        report["epochs"] = bench_epochs(str(work / "shards"), cfg.batch, cfg.workers, cfg.rounds, cfg.backends,
                                        cfg.device, cfg.epochs, cfg.step_ms)
    if "decode" in cfg.parts:
        beton = None
        if "ffcv" in cfg.backends:
            from pipeline.shards.beton import BetonOptions, write_beton

            write_beton(str(src), str(work / "beton"), shard_cfg, BetonOptions(workers=2))
            beton = str(work / "beton")
        report["decode"] = bench_decode(str(work / "shards"), beton, files, cfg.batch, cfg.workers, cfg.rounds,
                                        cfg.backends, cfg.device)
    return report


READ_LABELS = (("raw_cat", "raw s3fs cat (to memory)"), ("raw_cat_to_disk", "raw s3fs cat + write to disk"),
               ("reader", "reader: xxh3-128, 8 MiB ranges x 4"),
               ("reader_sha256", "  sha256 instead (as before)"),
               ("reader_client", "  each range through the S3 client"),
               ("reader_memory", "  cache_mode=memory (no disk write)"),
               ("reader_16mib_ranges", "  16 MiB ranges"),
               ("reader_4mib_ranges", "  4 MiB ranges"))
DECODE_LABELS = (("cpu_backend_uint8", "cpu backend, uint8 out (GPU run)"),
                 ("cpu_backend_host_normalize", "cpu backend, normalized on host"),
                 ("dali_backend", "dali backend, normalized"),
                 ("dali_backend_whole", "  decode='whole', crop on the device"),
                 ("dali_host_side", "dali host side only (read, check, feed)"),
                 ("dali_graph_only", "dali graph only (inputs read beforehand)"),
                 ("ffcv_backend", "ffcv backend, normalized"))


EPOCH_LABELS = (("cpu_late", "cpu backend, next epoch started late"),
                ("cpu_early", "cpu backend, started early (default)"),
                ("dali_late", "dali backend, next epoch started late"),
                ("dali_early", "dali backend, started early (default)"))


def _read_line(label: str, rates: dict, name: str) -> str:
    return (f"    {label:<44}{rates[name + '_MiB_s']:8.1f} MiB/s  client CPU "
            f"{rates[name + '_client_cpu_ms_per_MiB']:.2f} ms/MiB")


def format_report(r: dict) -> str:
    lines = [f"mae bench pipeline: {r['images']} JPEGs (~500x375, q90), {r['cpus']} CPUs, device {r['device']}"]
    if "read" in r:
        rd = r["read"]
        where = rd.get("where") or "SeaweedFS S3 on loopback (server and client share the CPUs)"
        lines.append(f"(a) bucket read, {where}; steady state: every disk cache at its limit "
                     f"({rd['cache_limit_MiB']:.0f} MiB), each fetch evicting the last:")
        lines += [_read_line(label, rd, name) for name, label in READ_LABELS]
        lines.append(f"    -> reader at {rd['reader_vs_raw']:.0%} of raw cat's MiB/s at {rd['reader_cpu_vs_raw']:.2f}x "
                     f"its CPU/MiB; {rd['reader_vs_raw_to_disk']:.0%} of cat+write")
        fill, pages = rd["filling"], rd["page_cache_write"]
        lines.append("  filling an empty cache (every byte on page-cache pages not used before):")
        lines += [_read_line(label, fill, name) for name, label in READ_LABELS if name in ("raw_cat", "reader")]
        lines.append(f"    -> reader at {fill['reader_vs_raw']:.0%} of raw cat's MiB/s at "
                     f"{fill['reader_cpu_vs_raw']:.2f}x its CPU/MiB")
        lines.append(f"  writing the page cache: {pages['fresh_cpu_ms_per_MiB']:.2f} CPU-ms/MiB on new pages, "
                     f"{pages['recycled_cpu_ms_per_MiB']:.2f} on pages just freed")
        cc = rd["cache_commit"]
        lines.append(f"  committing into a full cache of {cc['entries']:,} shards: {cc['commit_cpu_ms']:.2f} CPU-ms per "
                     f"commit ({cc['listings']} listings in {cc['commits']} commits); one listing of the folder, which "
                     f"every commit made before the ledger: {cc['listing_cpu_ms']:.1f} CPU-ms")
    if "decode" in r:
        dc = r["decode"]
        b = dc["per_file_pil_baseline"]
        lines.append(f"(b) decode + RandomResizedCrop 224 + flip, {b['runs'][0]['images']} images/run, median of "
                     f"{len(b['runs'])} alternated runs (CPU-ms/img = CPU cores per 1,000 img/s):")
        lines.append(f"    {'per-file PIL baseline (official MAE)':<36}{b['images_per_s']:8.1f} img/s "
                     f"{b['cpu_ms_per_image']:6.2f} CPU-ms/img")
        for name, label in DECODE_LABELS:
            if name in dc:
                c = dc[name]
                lines.append(f"    {label:<36}{c['images_per_s']:8.1f} img/s {c['cpu_ms_per_image']:6.2f} CPU-ms/img"
                             f"  -> {c['cpu_per_image_reduction']:.2f}x less CPU/img, "
                             f"{c['throughput_ratio']:.2f}x img/s; after a {c['first_batch_s']:.2f} s first batch "
                             f"{c['after_first_batch_images_per_s']:.0f} img/s")
        for name, secs in dc["warmup"].items():
            lines.append(f"    warm-up, not in the numbers above: {name} {secs:.1f} s")
    if "rss" in r:
        rss = r["rss"]
        lines.append(f"(c) streaming {rss['dataset_MiB']:.0f} MiB through a {rss['cache_limit_MiB']:.0f} MiB cache: "
                     f"main peak RSS {rss['main_peak_rss_MiB']:.0f} MiB, worker peak "
                     f"{rss['worker_peak_rss_MiB']:.0f} MiB, cache at end {rss['cache_final_MiB']:.0f} MiB, "
                     f"{rss['images']} images; main RSS at each quarter {rss['main_rss_trace_MiB']} MiB")
    if "stream" in r:
        lines += format_stream(r["stream"])
    if "epochs" in r:
        ep = r["epochs"]
        lines.append(f"(d) epoch boundaries: {ep['epochs']} epochs a run behind a {ep['step_ms']:.0f} ms step per "
                     f"batch (asleep), median of {ep['rounds']} alternated runs; the wait for each epoch's first batch:")
        for name, label in EPOCH_LABELS:
            if name in ep:
                e = ep[name]
                lines.append(f"    {label:<40}{e['boundary_wait_s']:7.3f} s at an epoch's start, "
                             f"{e['in_epoch_median_wait_s']:.3f} s median inside (longest "
                             f"{e['in_epoch_max_wait_s']:.3f} s); data wait "
                             f"{e['data_wait_fraction']:.1%} of the run")
                if "boundary_wait_vs_late" in e:
                    lines.append(f"    -> an epoch's start waits {e['boundary_wait_vs_late']:.2f}x as long as "
                                 "when it starts late")
    return "\n".join(lines)
