"""One timed streaming run for ``train.bench.streaming``, in a fresh process:
``python -m train.bench.stream_child CONTENDER MODE URLS_JSON ENDPOINT WORKERS BATCH CACHE``.

Imports the contender's library first, then times building its dataset and
DataLoader and one pass over every sample; prints one JSON line. CPU time is the
process's and its (joined) DataLoader workers'.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.augment import AugmentConfig
from train.bench.pipeline import cpu_seconds, official_recipe

MiB = 2**20
AUG = AugmentConfig()


def official_recipe_uint8(data: bytes, rng: np.random.Generator) -> torch.Tensor:
    """The official MAE recipe in PIL on encoded bytes, to uint8 CHW: what a peer's
    user writes."""
    img = official_recipe(Image.open(io.BytesIO(data)), AUG, rng)
    return torch.from_numpy(np.asarray(img)).permute(2, 0, 1)


class _Decode:
    """Per-worker decoding with its own seeded RNG (picklable for the workers)."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)

    def __call__(self, data: bytes) -> torch.Tensor:
        return official_recipe_uint8(data, self.rng)


def _bytes_batch(samples: list) -> tuple[list[bytes], list[int]]:
    return [s[0] for s in samples], [int(s[1]) for s in samples]


def _e2e_batch(samples: list) -> tuple[torch.Tensor, list[int]]:
    return torch.stack([s[0] for s in samples]), [int(s[1]) for s in samples]


# -- contenders: (urls, endpoint, workers, batch, cache, mode) -> iterable of (images, labels)
def maescale(urls: dict, endpoint: str, workers: int, batch: int, cache: str, mode: str) -> Iterable:
    from pipeline.decode.cpu import CpuLoader, _RankEpoch
    from pipeline.loader import LoaderConfig, build_loader
    from pipeline.shards.tar_format import image_member, label_of
    from pipeline.storage.config import StorageConfig

    cfg = LoaderConfig(url=urls["shards"], batch_size=batch, num_workers=workers, normalize=False,
                       overlap_epochs=False,  # one pass, like each peer's
                       storage=StorageConfig(endpoint_url=endpoint or None, cache_dir=cache))
    if mode == "e2e":
        return ((b.images, b.labels) for b in build_loader(cfg, 0, 1))

    class BytesEpoch(_RankEpoch):  # the cpu backend's reader, workers and warm-up, without the decode
        def _batch(self, ids, samples):
            return [image_member(m) for _, _, m in samples], [label_of(m, self.classes) for _, _, m in samples]

    class BytesLoader(CpuLoader):
        epoch_class = BytesEpoch

    loader = BytesLoader(cfg, 0, 1, torch.device("cpu"))
    ids, _ = loader._rank_ids()
    return loader._planned_batches(ids, 0)


def raw_cat(urls: dict, endpoint: str, workers: int, batch: int, cache: str, mode: str) -> Iterable:
    """The ceiling: every shard fetched whole by s3fs in ``workers`` threads."""
    import concurrent.futures as cf

    from pipeline.storage.config import StorageConfig
    from pipeline.storage.store import ShardStore
    from pipeline.storage.urls import join

    store = ShardStore(urls["shards"], StorageConfig(endpoint_url=endpoint or None, cache_dir=cache))
    shards = store.read_manifest().shards
    with cf.ThreadPoolExecutor(max(1, workers)) as pool:
        for shard, data in zip(shards, pool.map(lambda s: store.fs.cat_file(join(store.root, s.name)), shards)):
            yield _RawShard(shard.samples, len(data)), None


class _RawShard:
    def __init__(self, samples: int, nbytes: int) -> None:
        self.samples, self.nbytes = samples, nbytes


def webdataset(urls: dict, endpoint: str, workers: int, batch: int, cache: str, mode: str) -> Iterable:
    import webdataset as wds

    from pipeline.shards.manifest import ShardManifest
    from pipeline.storage.config import StorageConfig
    from pipeline.storage.urls import filesystem

    storage = StorageConfig(endpoint_url=endpoint or None)
    fs, root = filesystem(urls["shards"], storage)
    manifest = ShardManifest.from_json(fs.cat_file(f"{root}/manifest.json"))
    wds.gopen_schemes["s3"] = _FsspecOpen(storage)  # WebDataset over fsspec
    shards = [f"{urls['shards']}/{s.name}" for s in manifest.shards]
    ds = wds.WebDataset(shards, shardshuffle=False, nodesplitter=wds.split_by_node,
                        workersplitter=wds.split_by_worker, empty_check=False).to_tuple("jpg", "cls")
    if mode == "e2e":
        ds = ds.map_tuple(_Decode(), lambda c: int(c))
    ds = ds.batched(batch, collation_fn=_e2e_batch if mode == "e2e" else _bytes_batch, partial=True)
    return DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None)


class _FsspecOpen:
    """WebDataset's opener for s3:// URLs: one s3fs client per process."""

    def __init__(self, storage) -> None:
        self.storage, self._fs, self._pid = storage, None, None

    def __call__(self, url: str, mode: str = "rb", bufsize: int = 8192, **kw):
        from pipeline.storage.urls import filesystem

        if self._pid != os.getpid():
            self._fs, _ = filesystem(url, self.storage, fresh=True)
            self._pid = os.getpid()
        return self._fs.open(url, "rb", block_size=8 * MiB)


def litdata(urls: dict, endpoint: str, workers: int, batch: int, cache: str, mode: str) -> Iterable:
    import litdata as ld

    if endpoint.startswith("http://"):  # obstore (LitData's fast path) refuses plain http: LitData's boto3 path
        import litdata.streaming.downloader as downloader

        downloader._OBSTORE_AVAILABLE = False
    decode = _Decode()
    transform = (lambda item: (decode(item["jpg"]), item["cls"])) if mode == "e2e" else (
        lambda item: (item["jpg"], item["cls"]))
    ds = ld.StreamingDataset(urls["litdata"], cache_dir=cache, transform=transform,
                             storage_options={"endpoint_url": endpoint} if endpoint else None)
    return ld.StreamingDataLoader(ds, batch_size=batch, num_workers=workers,
                                  collate_fn=_e2e_batch if mode == "e2e" else _bytes_batch)


def streaming(urls: dict, endpoint: str, workers: int, batch: int, cache: str, mode: str) -> Iterable:
    from train.bench.streaming import import_streaming

    if endpoint:
        os.environ["S3_ENDPOINT_URL"] = endpoint
    mds = import_streaming()
    decode = _Decode()

    class Dataset(mds.StreamingDataset):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return (decode(item["jpg"]) if mode == "e2e" else item["jpg"]), item["cls"]

    ds = Dataset(remote=urls["mds"], local=cache, batch_size=batch, shuffle=False)
    return DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=_e2e_batch if mode == "e2e" else _bytes_batch,
                      prefetch_factor=2 if workers else None)


CONTENDERS: dict[str, Callable[..., Iterable]] = {"maescale": maescale, "raw_cat": raw_cat, "webdataset": webdataset,
                                                  "litdata": litdata, "streaming": streaming}


def _count(batch) -> tuple[int, int]:
    images, labels = batch
    if isinstance(images, _RawShard):
        return images.samples, images.nbytes
    if isinstance(images, torch.Tensor):
        return len(images), 0
    return len(images), sum(len(b) for b in images)


def timed_pass(contender: str, mode: str, urls: dict, endpoint: str, workers: int, batch: int,
               cache: str) -> dict[str, float]:
    c0, t0 = cpu_seconds(), time.perf_counter()
    first, samples, nbytes = None, 0, 0
    for b in CONTENDERS[contender](urls, endpoint, workers, batch, cache, mode):
        n, k = _count(b)
        if n and first is None:
            first = time.perf_counter() - t0
        samples, nbytes = samples + n, nbytes + k
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"samples": samples, "mib": nbytes / MiB, "samples_per_s": samples / wall,
            "cpu_ms_per_image": 1e3 * cpu / samples,
            "cpu_ms_per_mib": 1e3 * cpu / (nbytes / MiB) if nbytes else None,  # e2e: images, not bytes, come out
            "first_batch_s": first or wall, "wall_s": wall}


def main(argv: list[str]) -> None:
    contender, mode, urls, endpoint, workers, batch, cache = argv
    {"litdata": lambda: __import__("litdata"), "webdataset": lambda: __import__("webdataset"),
     "streaming": lambda: __import__("train.bench.streaming", fromlist=["x"]).import_streaming(),
     "maescale": lambda: __import__("pipeline.decode.cpu", fromlist=["x"]),
     }.get(contender, lambda: __import__("s3fs"))()  # imports are not part of the timing, for anyone
    __import__("s3fs")
    print(json.dumps(timed_pass(contender, mode, json.loads(urls), endpoint, int(workers), int(batch), cache)))


if __name__ == "__main__":
    main(sys.argv[1:])
