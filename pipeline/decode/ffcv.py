"""The `ffcv` decode backend: FFCV's JIT-compiled loader over a ``.beton``.

The dataset is one ``.beton`` (``mae shard --format beton``); on an object store
it is staged to the local shard cache first (FFCV memory-maps local files only),
with a progress bar and its sha256 checked like any shard. The order is still
the sample plan's: one FFCV loader per process walks ``Sequential`` order over
the indices the plan gives this rank for the epoch (rank and world size from the
initialised process group, as for every backend), so ranks, resume and
every-sample-once behave exactly as with ``cpu`` and ``dali``. FFCV's own
``distributed=True`` split is not used: its order cannot resume mid-epoch.

Per batch: ``RandomResizedCropRGBImageDecoder`` (scale, ratio) or, in
deterministic mode, a centre square crop, then a coin-flip mirror; images leave
FFCV as uint8 CHW (``ToDevice`` on a GPU) and are normalized on the device. The
first batch of each process pays numba's JIT compile (~20-30 s on 2 cores); it
is logged and kept in ``stats.warmup_s``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

import numpy as np
import torch

from infra.metrics import sink
from pipeline.decode.base import DecodedBatch, PlannedLoader
from pipeline.errors import ManifestError, PipelineError

_threads = torch.get_num_threads()
from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.reader import Reader  # noqa: E402
from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType  # noqa: E402
from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage  # noqa: E402

torch.set_num_threads(_threads)  # importing ffcv sets it to 1 for the whole process

log = logging.getLogger(__name__)
THREAD_POLL_S = 0.002  # how often a consumer waiting on an empty queue looks at FFCV's loader thread


def check_beton(path: str, samples: int) -> None:
    """A ``.beton`` whose header, tables and sample pointers fit the file and the
    manifest's sample count: FFCV trusts them, and a lying one aborted the process
    (an OpenCV assertion), hung its loader thread or ended in a numpy traceback."""
    size = os.path.getsize(path)

    def refuse(problem: str) -> ManifestError:
        return ManifestError(f"{path}: {problem}; write it again with mae shard --format beton")

    if size < HeaderType.itemsize:
        raise refuse(f"{size} bytes, shorter than a .beton header")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION or header["num_fields"] != 2:
        raise refuse(f"format version {header['version']} with {header['num_fields']} fields, not version "
                     f"{CURRENT_VERSION} with an image and a label")
    if header["num_samples"] != samples:
        raise refuse(f"its header holds {header['num_samples']} samples, the manifest {samples}")
    if not header["alloc_table_ptr"] <= size or (size - header["alloc_table_ptr"]) % ALLOC_TABLE_TYPE.itemsize:
        raise refuse(f"its allocation table at byte {header['alloc_table_ptr']} does not fit the file")
    try:
        reader = Reader(path)
    except Exception as e:  # noqa: BLE001 - FFCV's reader asserts and indexes whatever the header says
        raise refuse(f"unreadable tables ({type(e).__name__}: {e})") from None
    image = reader.metadata["f0"]
    if len(image) != samples or reader.field_names != ["image", "label"]:
        raise refuse(f"fields {reader.field_names} over {len(image)} samples, not image and label over {samples}")
    table = reader.alloc_table
    ends = table["ptr"].astype(np.float64) + table["size"]
    if len(table) and (ends.max() > header["alloc_table_ptr"] or table["sample_id"].max() >= samples):
        raise refuse("a sample's pages lie outside the file")
    if samples and (image["data_ptr"].max() >= header["alloc_table_ptr"] or image["width"].min() == 0
                    or image["height"].min() == 0):
        raise refuse("an image points outside the file or has no pixels")


class FfcvLoader(PlannedLoader):
    """FFCV decode + augmentation behind the Loader protocol."""

    dataset_format = "beton"

    def __init__(self, config, rank: int, world_size: int, device: torch.device) -> None:
        super().__init__(config, rank, world_size, device)
        if len(self.manifest.tables) > 1:
            raise ManifestError("the ffcv backend reads one .beton; mix data.sources of tar shards with backend cpu "
                                "or dali")
        self.store = self.manifest.stores[0]
        keys_name = self.manifest.options.get("keys")
        self.keys = self.store.read_keys(keys_name) if keys_name else []
        if len(self.keys) != self.manifest.total_samples:
            raise ManifestError(f"{config.url}: {keys_name} lists {len(self.keys)} keys for "
                             f"{self.manifest.total_samples} samples")
        self._ffcv: Loader | None = None

    def _loader(self) -> Loader:
        if self._ffcv is None:
            cfg, aug = self.config, self.config.augment
            path = self.store.local_path(self.manifest.shards[0], progress=True)
            check_beton(str(path), self.manifest.total_samples)
            self._built_at = time.perf_counter()
            S = aug.img_size
            if aug.deterministic:
                image = [CenterCropRGBImageDecoder((S, S), ratio=aug.crop_fraction)]
            else:
                image = [RandomResizedCropRGBImageDecoder((S, S), scale=aug.scale, ratio=aug.ratio),
                         RandomHorizontalFlip(aug.flip_prob)]
            image.append(ToTensor())
            if self.device.type == "cuda":
                image.append(ToDevice(self.device, non_blocking=True))
            image.append(ToTorchImage(channels_last=False))
            self._ffcv = Loader(str(path), batch_size=cfg.batch_size, num_workers=max(1, cfg.num_workers),
                                order=OrderOption.SEQUENTIAL, drop_last=False, os_cache=True,
                                seed=cfg.plan.seed, pipelines={"image": image,
                                                               "label": [IntDecoder(), ToTensor(), Squeeze()]})
            torch.set_num_threads(_threads)
        return self._ffcv

    def _batches(self, ids: np.ndarray, epoch: int) -> Iterator[DecodedBatch]:
        if not len(ids):
            return
        first = self._ffcv is None
        loader = self._loader()
        loader.traversal_order.indices = self.plan.sample_of(ids).astype(np.uint64)  # Sequential walks exactly these
        bs = self.config.batch_size
        for j, (images, labels) in enumerate(_while_alive(iter(loader))):
            if first:
                first = False
                self.stats.warmup_s = time.perf_counter() - self._built_at
                log.info("ffcv: first batch after %.1f s (numba JIT compile, once per process)", self.stats.warmup_s)
            batch_ids = ids[j * bs:(j + 1) * bs]
            if len(images) != len(batch_ids):
                raise RuntimeError(f"ffcv returned {len(images)} images for a planned batch of {len(batch_ids)}")
            if not self.config.normalize and self.device.type == "cpu":
                images = images.clone()  # FFCV reuses its output buffers a few batches later
            sink().inc("mae_pipeline_images_decoded_total", len(batch_ids), backend="ffcv")
            keys = [self.keys[g] for g in self.plan.sample_of(batch_ids).tolist()]
            yield DecodedBatch(images, labels.reshape(-1).long(), keys,
                               torch.from_numpy(batch_ids.astype(np.int64)), len(batch_ids))


def _while_alive(epoch: Iterator) -> Iterator:
    """The batches of FFCV's epoch iterator, a thread that ends the epoch by queueing
    None. One that dies of an exception queues nothing, and its consumer would wait
    forever: here that is an error, raised as soon as the thread is gone."""
    while True:
        while epoch.output_queue.empty():
            if not epoch.is_alive():
                if epoch.output_queue.empty():  # anything it queued before it ended is still handed out
                    epoch.close()
                    raise PipelineError("ffcv: its loader thread stopped before the end of the epoch (its error is "
                                        "printed above); no batch can follow")
                break
            epoch.join(THREAD_POLL_S)
        try:
            yield next(epoch)
        except StopIteration:
            return
