"""What ingesting costs (`mae bench ingest`), measured side by side in one run.

(a) ``index``: `mae index` over webdataset tars on the SeaweedFS S3 test server —
    tars of real-photo JPEGs (~500x375, q90) with ``.txt`` and ``.json`` members as
    img2dataset writes them. Per setting (header GETs without read-ahead, with
    read-ahead, ``--hash``), alternated over rounds: objects/s, requests and MiB
    read per GiB of tars indexed.
(b) ``shard``: `mae shard` of the same photos from a folder, one process vs Ray
    with 2 workers (a local cluster, started before timing): images/s and per core.
"""

from __future__ import annotations

import io
import json
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _photo_tars(root: Path, tars: int, per_tar: int) -> int:
    """img2dataset-style tars of real-photo crops; returns their total bytes."""
    from infra.testing.photos import bundled_photos, random_crop_jpeg

    photos = list(bundled_photos().values())
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for t in range(tars):
        with tarfile.open(root / f"{t:05d}.tar", "w") as tar:
            for i in range(per_tar):
                key = f"{t:05d}{i:04d}"
                jpeg = random_crop_jpeg(photos[(t * per_tar + i) % len(photos)], rng, (500, 375), 90)
                meta = json.dumps({"url": f"https://example.com/{key}.jpg", "caption": "a photo", "width": 500,
                                   "height": 375, "key": key}).encode()
                for ext, data in (("jpg", jpeg), ("txt", b"a photo of something"), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return sum(p.stat().st_size for p in root.glob("*.tar"))


def bench_index(tars: int = 16, per_tar: int = 200, rounds: int = 2, parallel: int = 16,
                read_ahead: int = 1536) -> dict[str, object]:
    from infra.testing.s3_server import SeaweedS3
    from pipeline.shards.index import IndexConfig, index_tars
    from pipeline.storage.config import StorageConfig

    settings = {"headers": IndexConfig(label_from="none", parallel=parallel),
                f"read_ahead_{read_ahead}": IndexConfig(label_from="none", parallel=parallel, read_ahead=read_ahead),
                "hash": IndexConfig(label_from="none", parallel=parallel, hash=True)}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory(prefix="mae-bench-index-") as tmp, SeaweedS3() as s3:
        total = _photo_tars(Path(tmp) / "tars", tars, per_tar)
        s3.create_bucket("wds")
        client = s3.client()
        for p in sorted((Path(tmp) / "tars").glob("*.tar")):
            client.upload_file(str(p), "wds", f"data/{p.name}")
        storage = StorageConfig(endpoint_url=s3.endpoint_url, options={
            "key": s3.access_key, "secret": s3.secret_key, "client_kwargs": {"region_name": "us-east-1"}})
        for r in range(rounds):
            for name, cfg in settings.items():
                cfg = IndexConfig(**{**cfg.__dict__, "storage": storage})
                t0 = time.perf_counter()
                summary = index_tars(f"s3://wds/data/{{00000..{tars - 1:05d}}}.tar", f"s3://wds/index-{name}-{r}",
                                     cfg)
                seconds = time.perf_counter() - t0
                results[name].append({"seconds": seconds, "requests": summary.requests, "read": summary.bytes_read})
    report: dict[str, object] = {"tars": tars, "samples": tars * per_tar, "gib": total / 2**30, "rounds": rounds}
    for name, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        read = runs[0]["read"]
        report[name] = {"objects_per_s": tars / seconds, "seconds": seconds, "requests": runs[0]["requests"],
                        "requests_per_sample": runs[0]["requests"] / (tars * per_tar),
                        "mib_read_per_gib": read / 2**20 / (total / 2**30), "fraction_read": read / total}
    return report


def _median_alternating(runs: dict[str, Callable[[int], float]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name, fn in runs.items():
            times[name].append(fn(r))
    return {name: statistics.median(t) for name, t in times.items()}


def bench_shard(images: int = 400, rounds: int = 2, shard_mb: int = 1) -> dict[str, object]:
    """One writer process vs Ray with 2 workers on the same folder; the cluster starts before timing."""
    from infra.testing.photos import write_photo_folder
    from pipeline.shards.tasks import RayTarget, connect
    from pipeline.shards.writer import ShardWriterConfig, write_shards

    with tempfile.TemporaryDirectory(prefix="mae-bench-shard-") as tmp:
        write_photo_folder(Path(tmp) / "photos", images, labelled=True)
        target = RayTarget(None, 2)
        t0 = time.perf_counter()
        connect(target)
        ray_start = time.perf_counter() - t0
        cfg1 = ShardWriterConfig(shard_bytes=shard_mb * 2**20, workers=1)
        cfg2 = ShardWriterConfig(shard_bytes=shard_mb * 2**20, workers=2)

        def timed(run: Callable[[str], object]) -> Callable[[int], float]:
            def go(r: int) -> float:
                t = time.perf_counter()
                run(f"{tmp}/out-{id(run)}-{r}")
                return time.perf_counter() - t
            return go

        medians = _median_alternating({
            "one_process": timed(lambda dest: write_shards(f"{tmp}/photos", dest, cfg1)),
            "ray_2_workers": timed(lambda dest: write_shards(f"{tmp}/photos", dest, cfg2, target))}, rounds)
    report: dict[str, object] = {"images": images, "rounds": rounds, "ray_start_s": ray_start}
    for name, cores in (("one_process", 1), ("ray_2_workers", 2)):
        rate = images / medians[name]
        report[name] = {"seconds": medians[name], "images_per_s": rate, "images_per_s_per_core": rate / cores}
    report["speedup"] = medians["one_process"] / medians["ray_2_workers"]
    return report
