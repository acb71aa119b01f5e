"""`mae shard SRC DEST --format beton`: the same sources as an FFCV ``.beton``.

Two passes. (1) The tar-shard writer validates every image (the same rejects,
conversions, labels and keys as ``--format tar``) into a local staging folder —
resumable. (2) FFCV's ``DatasetWriter`` reads those validated samples and writes
``dataset.beton``; it runs in its own process group under a watchdog, because
FFCV's writer hangs forever instead of failing when a worker dies: if the file
stops growing for ``stall_timeout_s`` (or the whole write exceeds
``timeout_s``) the writer is killed and a clear error raised. The finished file
is uploaded atomically beside a manifest (one "shard": the .beton, with its
sha256, so loaders stage and verify it like any shard) and ``dataset.keys`` (the
sample key of each record, in order).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np
from tqdm import tqdm

from infra.options import option, require, require_positive, require_positive_or_none, require_text
from pipeline.decode.jpeg import JPEG_MAX_SIDE  # FFCV also keeps each side in a uint16
from pipeline.errors import BetonWriteError
from pipeline.images import ImagePolicy, load_pixels, open_image
from pipeline.shards.manifest import ShardInfo, ShardManifest
from pipeline.shards.manifest_index import write_manifest
from pipeline.shards.tar_format import image_member, index_tar, label_of, read_members
from pipeline.shards.writer import ShardWriterConfig, WriteSummary, write_shards
from pipeline.storage.objects import MANIFEST_HASHES, ObjectFolder, file_digests
from pipeline.storage.store import ShardStore
from pipeline.storage.urls import join

log = logging.getLogger(__name__)
BETON_NAME = "dataset.beton"
KEYS_NAME = "dataset.keys"
STARTUP_GRACE_S = 120.0  # importing ffcv and starting its workers, before the file exists


@dataclass(frozen=True)
class BetonOptions:
    jpeg_quality: int = option(90, "FFCV stores its own re-encoded JPEGs at this quality")
    max_side: int | None = option(None, "FFCV max_resolution: shrink the longer side to this")
    workers: int = option(1, "FFCV writer processes")
    stall_timeout_s: float = option(300.0, "the .beton has not grown for this long: the writer hung")
    timeout_s: float | None = option(None, "the whole write (None: no limit)")
    staging_dir: str | None = option(None, "pass-1 tar shards (default: a temporary folder)")

    def __post_init__(self) -> None:
        require(1 <= self.jpeg_quality <= 100, "jpeg_quality", f"must be in [1, 100], got {self.jpeg_quality}")
        require_positive(self, "workers", "stall_timeout_s")
        require_positive_or_none(self, "max_side", "timeout_s")
        require_text(self, "staging_dir")


class ValidatedSamples:
    """Indexable ``(RGB uint8 HxWx3, label)`` over local tar shards written by the
    validating writer, in manifest order; what FFCV's writer iterates."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.manifest = ShardStore(folder).read_manifest()
        self.index = []
        for shard in self.manifest.shards:
            with open(join(folder, shard.name), "rb") as f:
                self.index += [(shard.name, entry) for entry in index_tar(f, shard.name)]

    def __len__(self) -> int:
        return len(self.index)

    def keys(self) -> list[str]:
        return [f"{name}/{entry.key}" for name, entry in self.index]

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        name, entry = self.index[i]
        with open(join(self.folder, name), "rb") as f:
            members = read_members(f, entry)
        img, _ = open_image(image_member(members), ImagePolicy(min_side=1, max_pixels=2**40))  # validated in pass 1
        return np.asarray(load_pixels(img), dtype=np.uint8), label_of(members, len(self.manifest.classes))


def write_beton(src: str, dest: str, cfg: ShardWriterConfig, opts: BetonOptions) -> WriteSummary:
    folder = ObjectFolder(dest, cfg.storage)
    folder.prepare(cfg.create_bucket)  # before any work: a misspelled bucket fails now
    with tempfile.TemporaryDirectory(prefix="mae-beton-") as tmp:
        staging = opts.staging_dir or os.path.join(tmp, "validated")
        log.info("pass 1: validating images into %s", staging)
        summary = write_shards(src, staging, replace(cfg, with_meta=False))
        samples = ValidatedSamples(staging)
        if not len(samples):
            raise BetonWriteError(f"no usable images in {src}; nothing to write")
        local = os.path.join(tmp, BETON_NAME)
        log.info("pass 2: FFCV writer, %d images -> %s", len(samples), BETON_NAME)
        run_ffcv_writer(staging, local, opts, len(samples))
        info = ShardInfo(BETON_NAME, len(samples), os.path.getsize(local),
                         **file_digests(local, algorithms=MANIFEST_HASHES))
        folder.put_file(local, BETON_NAME)
        folder.put_bytes(KEYS_NAME, ("\n".join(samples.keys()) + "\n").encode())
        options = {**cfg.options(), "format": "beton", "keys": KEYS_NAME, "jpeg_quality": opts.jpeg_quality,
                   "max_side": opts.max_side}
        manifest = ShardManifest(shards=[info], classes=summary.manifest.classes, rejects=summary.manifest.rejects,
                                 options=options)
        write_manifest(folder, manifest)  # its index first, the JSON last
    summary.manifest = manifest
    return summary


def run_ffcv_writer(folder: str, out: str, opts: BetonOptions, samples: int) -> None:
    """FFCV's writer in its own process group, killed if it stalls or overruns.
    Until the output file appears (imports, numba) the allowance is longer."""
    job = json.dumps({"folder": folder, "out": out, "quality": opts.jpeg_quality, "max_side": opts.max_side,
                      "workers": opts.workers})
    with tempfile.TemporaryFile("w+") as log_file, tqdm(unit="B", unit_scale=True, desc="FFCV writer",
                                                        disable=not sys.stderr.isatty()) as bar:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.shards.beton", job], start_new_session=True,
                                stdout=log_file, stderr=subprocess.STDOUT, text=True)
        start = last_change = time.monotonic()
        last_size = -1
        reason = None
        while proc.poll() is None:
            time.sleep(0.25)
            size = os.path.getsize(out) if os.path.exists(out) else -1
            now = time.monotonic()
            if size != last_size:
                bar.update(max(size, 0) - max(last_size, 0))
                last_size, last_change = size, now
            allowance = opts.stall_timeout_s + (STARTUP_GRACE_S if size < 0 else 0)
            if now - last_change > allowance:
                reason = f"made no progress for {allowance:.0f} s"
            elif opts.timeout_s is not None and now - start > opts.timeout_s:
                reason = f"did not finish within {opts.timeout_s:.0f} s"
            if reason:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
        if reason is None and proc.returncode == 0 and os.path.exists(out):
            return
        log_file.seek(0)
        tail = "\n".join(log_file.read().strip().splitlines()[-8:])
    if os.path.exists(out):
        os.unlink(out)  # never leave a partial .beton behind
    raise BetonWriteError(f"FFCV writer {reason or f'exited with status {proc.returncode}'} "
                          f"after {time.monotonic() - start:.0f} s on {samples} images; its last output:\n{tail}")


def _writer_main(job: dict) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    dataset = ValidatedSamples(job["folder"])
    # a longer side would overflow FFCV's uint16 and kill its worker, which hangs the writer
    side = min(job["max_side"] or JPEG_MAX_SIDE, JPEG_MAX_SIDE)
    fields = {"image": RGBImageField(write_mode="jpg", max_resolution=side, jpeg_quality=job["quality"]),
              "label": IntField()}
    DatasetWriter(job["out"], fields, num_workers=job["workers"]).from_indexed_dataset(dataset, chunksize=32)


if __name__ == "__main__":
    _writer_main(json.loads(sys.argv[1]))
