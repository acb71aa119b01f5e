"""`mae bench pipeline --parts stream [--against litdata,webdataset,streaming]`:
streaming the same images from the same S3 server, side by side.

Every contender reads the same JPEGs (and labels) from one bucket — maescale and
WebDataset our tar shards, LitData and MosaicML Streaming their own formats written
from the same files — with the same DataLoader worker count and batch size, from a
cold local cache, in a fresh process per run (``train.bench.stream_child``), rounds
interleaved. Two modes:

- ``bytes``: each sample's encoded bytes and label reach the main process (no
  decode): the data path alone;
- ``e2e``: decode + RandomResizedCrop(224, 0.2-1) + flip to uint8 (CHW) in the
  workers: maescale with its ``cpu`` backend; the peers with the official MAE
  recipe in PIL, which is what their documentation shows.

Measured per run: samples/s, CPU-ms per image and per MiB of image bytes (user +
system of the process and its workers), and the time from building the dataset
(libraries already imported) to the first batch. ``raw_cat`` is the ceiling: the
same shards fetched whole by plain s3fs, two threads, nothing parsed.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.storage.config import StorageConfig
from pipeline.storage.urls import filesystem

PEERS = ("litdata", "webdataset", "streaming")
MODES = ("bytes", "e2e")
CHUNK = "16MB"  # the peers' chunk size: our shard size


def peer_available(name: str) -> bool:
    """Whether a peer library is installed (the ``bench`` extra)."""
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _samples(files: list[Path]) -> list[tuple[Path, int]]:
    """(file, label) in the order the shard writer would see them: labels index the
    sorted class folders."""
    classes = sorted({f.parent.name for f in files})
    return [(f, classes.index(f.parent.name)) for f in sorted(files)]


def _litdata_item(item: tuple[str, int]) -> dict[str, object]:
    return {"jpg": Path(item[0]).read_bytes(), "cls": int(item[1])}


def prepare_litdata(files: list[Path], url: str, storage: StorageConfig, work: Path) -> None:
    """The images in LitData's optimized format, uploaded to ``url``."""
    import litdata

    local = work / "litdata"
    if not (local / "index.json").exists():
        start_method = multiprocessing.get_start_method(allow_none=True)
        try:
            litdata.optimize(fn=_litdata_item, inputs=[(str(f), y) for f, y in _samples(files)],
                             output_dir=str(local), chunk_bytes=CHUNK, num_workers=1, mode="overwrite")
        finally:  # optimize() sets 'spawn' process-wide; the rest of the benchmark runs as it would have
            multiprocessing.set_start_method(start_method, force=True)
    _upload(local, url, storage)


def prepare_mds(files: list[Path], url: str, storage: StorageConfig, work: Path) -> None:
    """The images in MosaicML Streaming's MDS format, uploaded to ``url``."""
    import_streaming()
    from streaming import MDSWriter

    local = work / "mds"
    if not (local / "index.json").exists():
        with MDSWriter(out=str(local), columns={"jpg": "bytes", "cls": "int"}, size_limit=CHUNK) as out:
            for f, y in _samples(files):
                out.write({"jpg": f.read_bytes(), "cls": y})
    _upload(local, url, storage)


def _upload(local: Path, url: str, storage: StorageConfig) -> None:
    fs, root = filesystem(url, storage)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"{root}/{p.relative_to(local)}")


def import_streaming():
    """``import streaming`` (MosaicML). Its package imports ``streaming.vision``
    (torchvision datasets) on import; where torchvision cannot be imported (this
    CPU torch build has no matching torchvision) that one subpackage is registered
    as an empty module first. The benchmark never uses it: it reads bytes through
    ``streaming.StreamingDataset``."""
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):
        import types

        sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))
    import streaming

    return streaming


def _run_child(contender: str, mode: str, urls: dict[str, str], endpoint: str | None, workers: int, batch: int,
               cache: str) -> dict[str, float]:
    args = [sys.executable, "-m", "train.bench.stream_child", contender, mode, json.dumps(urls), endpoint or "",
            str(workers), str(batch), cache]
    out = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"stream run {contender}/{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_stream(files: list[Path], bucket_url: str, storage: StorageConfig, work: Path, against: tuple[str, ...],
                 workers: int, batch: int, rounds: int) -> dict[str, object]:
    """maescale, the raw ceiling and each peer in ``against``, both modes, rounds
    interleaved (A B C D, A B C D, ...); medians of the rounds."""
    base = bucket_url.rstrip("/")
    urls = {"shards": base, "litdata": f"{base}-litdata", "mds": f"{base}-mds"}
    if "litdata" in against:
        prepare_litdata(files, urls["litdata"], storage, work)
    if "streaming" in against:
        prepare_mds(files, urls["mds"], storage, work)
    runs: dict[str, list[dict[str, float]]] = {}
    order = [("raw_cat", "bytes")] + [(c, m) for m in MODES for c in ("maescale", *against)]
    for _ in range(rounds):
        for contender, mode in order:
            with tempfile.TemporaryDirectory(prefix="mae-stream-cache-", dir=work) as cache:
                run = _run_child(contender, mode, urls, storage.endpoint_url, workers, batch, cache)
            runs.setdefault(f"{contender}/{mode}", []).append(run)
    # raw cat counts whole tars; every other contender the image bytes it hands over: per MiB of images for all
    image_mib = runs["maescale/bytes"][0]["mib"]
    for r in runs["raw_cat/bytes"]:
        r["cpu_ms_per_mib"] = r["cpu_ms_per_mib"] * r["mib"] / image_mib
    out: dict[str, object] = {"workers": workers, "batch": batch, "rounds": rounds, "versions": _versions(against)}
    for name, rs in runs.items():
        out[name] = {k: statistics.median(r[k] for r in rs) if rs[0][k] is not None else None
                     for k in rs[0] if k != "samples"}
        out[name].update(samples=rs[0]["samples"], runs=rs)
    for mode in MODES:
        peers = [out[f"{p}/{mode}"] for p in against]
        if peers:
            best = max(peers, key=lambda r: r["samples_per_s"])
            ours = out[f"maescale/{mode}"]
            out[f"{mode}_vs_fastest_peer"] = {"samples_per_s": ours["samples_per_s"] / best["samples_per_s"],
                                             "cpu_ms_per_image": ours["cpu_ms_per_image"] / best["cpu_ms_per_image"]}
    return out


def _versions(against: tuple[str, ...]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = {"maescale": "maescale", "s3fs": "s3fs", "litdata": "litdata", "webdataset": "webdataset",
             "streaming": "mosaicml-streaming"}
    out = {}
    for key in ("maescale", "s3fs", *against):
        try:
            out[key] = version(names[key])
        except PackageNotFoundError:
            out[key] = "unknown"
    return out


def format_stream(r: dict) -> list[str]:
    lines = [f"(d) streaming the same JPEGs from one S3 server, {r['workers']} workers, batch {r['batch']}, cold cache, "
             f"median of {r['rounds']} interleaved rounds ({', '.join(f'{k} {v}' for k, v in r['versions'].items())}):"]
    for mode in MODES:
        lines.append("  bytes only:" if mode == "bytes" else "  end to end (decode + RandomResizedCrop 224 + flip, uint8):")
        for name, row in r.items():
            if isinstance(row, dict) and name.endswith(f"/{mode}"):
                per_mib = f"{row['cpu_ms_per_mib']:6.1f} CPU-ms/MiB " if row["cpu_ms_per_mib"] is not None else ""
                lines.append(f"    {name.split('/')[0]:<12}{row['samples_per_s']:8.0f} samples/s {per_mib}"
                             f"{row['cpu_ms_per_image']:6.2f} CPU-ms/img  first batch {row['first_batch_s']:.2f} s")
        vs = r.get(f"{mode}_vs_fastest_peer")
        if vs:
            lines.append(f"    -> maescale {vs['samples_per_s']:.2f}x the fastest peer's samples/s at "
                         f"{vs['cpu_ms_per_image']:.2f}x its CPU per image")
    return lines
