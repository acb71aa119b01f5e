"""The `dali` decode backend: NVIDIA DALI decodes, crops, resizes, flips and
normalizes — on the GPU (nvJPEG, ``device='mixed'``) or, without one, on the CPU.

Feed: our own shard stream, not DALI's ``readers.webdataset``. A thread reads
each planned batch through the shard cache (``pipeline.decode.reader``, shared
with the ``cpu`` backend), checks every image's bytes and hands the batch to
``fn.external_source``; DALI decodes it with its own thread pool while the next
batch is read. This keeps everything the sample plan guarantees (rank split,
every sample once, exact mid-epoch resume) and the cache's retries and
checksums, and it is where bad samples can be stopped — DALI's readers follow
their own order and die on a bad file.

Crops: by default (``dali.crop='plan'``) the crop box and flip of each sample come
from the plan's per-sample RNG — the very boxes the ``cpu`` backend uses — and
``fn.decoders.image_slice`` decodes only that region (ROI decode). Crops then do
not change when a run resumes or a pipeline is rebuilt after a bad sample.
``dali.crop='random'`` uses ``fn.decoders.image_random_crop`` and
``fn.random.coin_flip`` with DALI's own RNG instead (same distribution, but a
resume or rebuild draws new crops). ``dali.decode='whole'`` decodes every image
whole and crops it on the device instead (the same boxes): the hardware JPEG
decoder of A100/H100/H200 decodes whole images, and ROI decode may leave its
share to the hybrid CPU+GPU path. Which is faster is the GPU check's to measure.

EXIF orientation: not applied (``adjust_orientation=False``). The shard writer
turns images upright; like the ``cpu`` backend, DALI reads stored pixels, so a
crop box computed from the stored size always fits.

Corrupt samples: DALI cannot skip one — a decode error kills the pipeline. So
(1) bytes are checked before they reach DALI: JPEG header parses, size within
the policy, end-of-image marker present; other formats and CMYK are re-encoded
to RGB JPEG on the host (counted as converted); (2) if a decode still fails, the
pipeline is rebuilt, every batch that was in flight is decoded again one sample
at a time in a single-sample pipeline to find the bad ones, which are skipped (counted
and named, reason ``decode_failed``), and the stream goes on in plan order.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from infra.metrics import sink
from pipeline.augment import crop_and_flip, sample_rng
from pipeline.decode.base import DecodedBatch, PlannedLoader
from pipeline.decode.jpeg import decoder_ready_jpeg
from pipeline.decode.reader import read_batches
from pipeline.images import BadImage
from pipeline.shards.tar_format import image_member, label_of

log = logging.getLogger(__name__)
PREFETCH_BATCHES = 2  # host-side batches read ahead of DALI
DALI_OUT_DTYPES = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT}


@dataclass
class _Prepared:
    """One planned batch as fed to DALI, and what the loader reports for it."""

    data: list[np.ndarray] = field(default_factory=list)  # encoded JPEGs
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    flips: list[bool] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    planned: int = 0
    skips: list[tuple[str, str]] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)

    def drop(self, bad: set[int]) -> _Prepared:
        keep = [i for i in range(len(self.keys)) if i not in bad]
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        return _Prepared(pick(self.data), pick(self.boxes), pick(self.flips), pick(self.labels), pick(self.keys),
                         pick(self.ids), self.planned, self.skips + [(self.keys[i], "decode_failed") for i in sorted(bad)],
                         self.converted)

    def one(self, i: int) -> _Prepared:
        return _Prepared([self.data[i]], [self.boxes[i]], [self.flips[i]], [self.labels[i]], [self.keys[i]], [self.ids[i]])


class _Feed:
    """What DALI's external_source pulls from: batches to feed again after a
    rebuild first, then the reader's stream. Remembers what is in flight."""

    def __init__(self, stream: Iterator[_Prepared], plan_crops: bool) -> None:
        self.stream, self.plan_crops = stream, plan_crops
        self.refeed: deque[_Prepared] = deque()
        self.inflight: deque[_Prepared] = deque()  # fed, output not yet taken (in order)

    def __call__(self) -> tuple:
        while True:
            batch = self.refeed.popleft() if self.refeed else next(self.stream, None)
            if batch is None:
                raise StopIteration
            self.inflight.append(batch)
            if batch.keys:  # DALI does not take empty batches; they are reported in order
                return dali_inputs(batch, self.plan_crops)


def dali_inputs(batch: _Prepared, plan_crops: bool) -> tuple:
    if not plan_crops:  # DALI draws crops and flips
        return (batch.data,)
    flips = [np.array(f, dtype=np.int32) for f in batch.flips]
    anchors = [np.array(b[:2], dtype=np.float32) for b in batch.boxes]
    shapes = [np.array(b[2:], dtype=np.float32) for b in batch.boxes]
    return batch.data, anchors, shapes, flips


class DaliLoader(PlannedLoader):
    """DALI decode + augmentation behind the Loader protocol."""

    normalizes = True

    def __init__(self, config, rank: int, world_size: int, device: torch.device) -> None:
        super().__init__(config, rank, world_size, device)
        self.gpu = self.device.type == "cuda"
        self.device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if self.gpu else None
        self.plan_crops = config.dali.crop == "plan" or config.augment.deterministic
        self.rebuilds = 0
        # RandAugment runs on DALI's uint8 output, on the same device (torch ops, no
        # PIL): DALI then stops at uint8 and normalization follows RandAugment.
        self.normalizes = config.normalize and not config.augment.rand_augment

    # -- the DALI graph
    def _pipeline(self, source: Callable[[], tuple], batch_size: int, pipelined: bool = True):
        cfg, aug = self.config, self.config.augment
        decode = {"device": "mixed", "hw_decoder_load": cfg.dali.hw_decoder_load} if self.gpu else {"device": "cpu"}
        decode["adjust_orientation"] = False  # pixels as stored, as every backend (pipeline.images); boxes fit them
        S = aug.img_size
        if self.normalizes:
            norm = {"dtype": DALI_OUT_DTYPES[self.dtype], "mean": [m * 255 for m in aug.mean],
                    "std": [s * 255 for s in aug.std]}
        else:
            norm = {"dtype": types.UINT8}

        whole = cfg.dali.decode == "whole"
        box = {"axis_names": "WH", "normalized_anchor": False, "normalized_shape": False}
        draw = {"random_area": list(aug.scale), "random_aspect_ratio": list(aug.ratio), "num_attempts": 10}

        @pipeline_def(batch_size=batch_size, num_threads=max(1, cfg.num_workers), device_id=self.device_id,
                      seed=hash((cfg.plan.seed, self.epoch, self.rank, self.rebuilds)) % 2**31,
                      prefetch_queue_depth=2 if pipelined else 1, exec_pipelined=pipelined, exec_async=pipelined)
        def graph():
            if self.plan_crops:
                jpegs, anchor, shape, flip = fn.external_source(source=source, num_outputs=4, batch=True)
                if whole:
                    images = fn.slice(fn.decoders.image(jpegs, output_type=types.RGB, **decode), anchor, shape, **box)
                else:
                    images = fn.decoders.image_slice(jpegs, anchor, shape, output_type=types.RGB, **box, **decode)
            else:
                (jpegs,) = fn.external_source(source=source, num_outputs=1, batch=True)
                if whole:
                    images = fn.random_resized_crop(fn.decoders.image(jpegs, output_type=types.RGB, **decode),
                                                    size=[S, S], interp_type=types.INTERP_CUBIC, antialias=True,
                                                    **draw)
                else:
                    images = fn.decoders.image_random_crop(jpegs, output_type=types.RGB, **draw, **decode)
                flip = fn.random.coin_flip(probability=aug.flip_prob)
            if self.plan_crops or not whole:
                images = fn.resize(images, resize_x=S, resize_y=S, interp_type=types.INTERP_CUBIC, antialias=True)
            return fn.crop_mirror_normalize(images, mirror=flip, output_layout="CHW", **norm)

        pipe = graph()
        pipe.build()
        return pipe

    # -- host side: read and check bytes
    def _prepare(self, ids: np.ndarray, epoch: int) -> Iterator[_Prepared]:
        cfg = self.config
        for batch_ids, samples in read_batches(self, ids, range(-(-len(ids) // cfg.batch_size))):
            out = _Prepared(planned=len(batch_ids))
            for gid, name, members in samples:
                try:
                    label = label_of(members, len(self.manifest.classes))
                    data, width, height, mode_reason = decoder_ready_jpeg(image_member(members), cfg.images)
                except BadImage as e:
                    out.skips.append((name, e.reason))
                    continue
                if mode_reason:
                    out.converted.append(mode_reason)
                box, flip = crop_and_flip(width, height, cfg.augment, sample_rng(cfg.plan.seed, epoch, gid))
                out.data.append(np.frombuffer(data, dtype=np.uint8))
                out.boxes.append(box)
                out.flips.append(flip)
                out.labels.append(label)
                out.keys.append(name)
                out.ids.append(gid)
            yield out

    def _batches(self, ids: np.ndarray, epoch: int) -> Iterator[DecodedBatch]:
        feed = _Feed(_threaded(self._prepare(ids, epoch), PREFETCH_BATCHES), self.plan_crops)
        pipe = self._pipeline(feed, self.config.batch_size)
        try:
            while True:
                try:
                    (out,) = pipe.run()
                except StopIteration:
                    if any(b.keys for b in feed.inflight):
                        raise RuntimeError("DALI stopped with batches still in flight; samples would be lost") from None
                    while feed.inflight:  # empty batches fed after the last real one
                        yield self._result(feed.inflight.popleft(), None)
                    return
                except RuntimeError as e:  # a decode failed: the pipeline object is dead
                    del pipe
                    self._recover(feed, e)
                    pipe = self._pipeline(feed, self.config.batch_size)
                    continue
                while not feed.inflight[0].keys:
                    yield self._result(feed.inflight.popleft(), None)
                yield self._result(feed.inflight.popleft(), out)
        finally:
            feed.stream.close()

    def _recover(self, feed: _Feed, error: RuntimeError) -> None:
        """Find the samples DALI cannot decode among the batches in flight, drop
        them, and queue those batches to be fed again to a new pipeline."""
        self.rebuilds += 1
        sink().inc("mae_pipeline_rebuilds_total", backend="dali")
        lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
        after = lines.index("encountered:") + 1 if "encountered:" in lines else len(lines) - 1
        first_line = lines[after] if lines else type(error).__name__
        log.warning("DALI decode failed (%s); rebuilding the pipeline and probing %d in-flight batches",
                    first_line, len(feed.inflight))
        bad = [self._undecodable(batch) for batch in feed.inflight]
        if not any(bad):  # not a bad sample (e.g. out of memory): retrying would fail forever
            raise RuntimeError(f"DALI pipeline failed and no in-flight sample is undecodable: {first_line}") from error
        cleaned = [batch.drop(b) for batch, b in zip(feed.inflight, bad)]
        feed.inflight.clear()
        feed.refeed.extendleft(reversed(cleaned))

    def _undecodable(self, batch: _Prepared) -> set[int]:
        bad: set[int] = set()
        single = None  # a pipeline of batch size 1, rebuilt after each failure
        holder: list[tuple] = []
        for i in range(len(batch.keys)):
            holder[:] = [dali_inputs(batch.one(i), self.plan_crops)]
            if single is None:
                single = self._pipeline(lambda: holder[0], 1, pipelined=False)
            try:
                single.run()
            except RuntimeError:
                bad.add(i)
                single = None
        return bad

    # -- DALI output -> torch
    def _result(self, batch: _Prepared, out) -> DecodedBatch:
        cfg = self.config
        S = cfg.augment.img_size
        if out is None:
            images = torch.empty(0, 3, S, S, device=self.device, dtype=self.dtype if self.normalizes else torch.uint8)
        else:
            images = self._to_torch(out.as_tensor())
            if self.normalizes and images.dtype != self.dtype:
                images = images.to(self.dtype)
        sink().inc("mae_pipeline_images_decoded_total", len(batch.keys), backend="dali")
        return DecodedBatch(images, torch.tensor(batch.labels, dtype=torch.int64), batch.keys,
                            torch.tensor(batch.ids, dtype=torch.int64), batch.planned, batch.skips, batch.converted)

    def _to_torch(self, tensor) -> torch.Tensor:
        if not self.gpu:
            return torch.from_numpy(np.array(tensor))  # a copy: DALI reuses its buffers
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=self.device)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(self.device))  # device to device
        return out


def _threaded(items: Iterator, depth: int) -> Iterator:
    """Run a generator in a background thread, ``depth`` items ahead; errors are
    re-raised in the consumer. Closing the returned generator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((done, e))
        finally:
            items.close()

    thread = threading.Thread(target=work, name="dali-feed", daemon=True)
    thread.start()

    def consume() -> Iterator:
        try:
            while True:
                item, error = q.get()
                if item is done:
                    if error is not None:
                        raise error
                    return
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)

    return consume()
