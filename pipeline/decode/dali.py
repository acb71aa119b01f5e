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

import concurrent.futures as cf
import functools
import logging
import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from infra.metrics import sink
from pipeline.augment import crop_and_flip, sample_rng
from pipeline.decode.base import DecodedBatch, EpochRun, PlannedLoader
from pipeline.decode.jpeg import decoder_ready_jpeg
from pipeline.decode.reader import PlannedData, read_batches
from pipeline.images import BadImage
from pipeline.shards.tar_format import image_member, label_of

log = logging.getLogger(__name__)
PREFETCH_BATCHES = 2  # host-side batches read ahead of DALI
PIPELINE_DEPTH = 2  # batches DALI runs ahead (prefetch_queue_depth)
BUILD_WAIT_S = 60  # how long closing an epoch waits for its pipeline's build
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

    def ready(self, n: int) -> bool:
        """The next ``n`` batches are read, and each has samples to decode."""
        head = [] if self.refeed else self.stream.peek(n)
        return len(head) == n and all(error is None and isinstance(item, _Prepared) and item.keys
                                      for item, error in head)

    def __call__(self) -> tuple:
        while True:
            batch = self.refeed.popleft() if self.refeed else next(self.stream, None)
            if batch is None:
                raise StopIteration
            self.inflight.append(batch)
            if batch.keys:  # DALI does not take empty batches; they are reported in order
                return dali_inputs(batch, self.plan_crops)


def _release(feed: _Feed, primer: _Primer) -> None:
    """An epoch's reader thread stopped and, if the epoch never took its pipeline,
    that pipeline dropped once built: a build still running in its thread is
    waited for, not left to the interpreter's end. (A pipeline taken is the run's
    alone: ``_recover`` can drop a dead one.)"""
    feed.stream.close()
    built, primer.built = primer.built, None
    if built is None:
        return
    try:
        built.exception(timeout=BUILD_WAIT_S)
    except cf.TimeoutError:
        log.warning("a DALI pipeline build still runs after %d s; leaving it", BUILD_WAIT_S)


class _Primer:
    """An epoch's DALI graph, built in a thread, and run on the epoch's first
    batches as soon as it is built and they are read, for an epoch started early:
    polled between the batches of the epoch before, it never waits, and it leaves
    an epoch whose build failed, or whose first batches hold an error, an end or
    nothing to decode, to start as usual (and report it there)."""

    def __init__(self, built: cf.Future, feed: _Feed) -> None:
        self.built: cf.Future | None = built
        self.feed, self.primed = feed, False

    def __call__(self) -> None:
        built = self.built
        if (built is not None and not self.primed and built.done() and built.exception() is None
                and self.feed.ready(PIPELINE_DEPTH)):
            built.result().schedule_run()  # feeds PIPELINE_DEPTH batches, which are there, and starts decoding
            self.primed = True

    def take(self) -> tuple:
        """The pipeline (waiting for its build; raising its error), and whether it
        was run already; the primer lets go of it."""
        built, self.built = self.built, None
        return built.result(), self.primed


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
    def _pipeline(self, source: Callable[[], tuple], batch_size: int, epoch: int, pipelined: bool = True):
        cfg, aug = self.config, self.config.augment
        decode = {"device": "mixed", "hw_decoder_load": cfg.dali.hw_decoder_load} if self.gpu else {"device": "cpu"}
        decode["adjust_orientation"] = False  # pixels as stored, as every backend (pipeline.images); boxes fit them
        S = aug.img_size
        if self.normalizes:
            norm = {"dtype": DALI_OUT_DTYPES[self.dtype], "mean": [m * 255 for m in aug.mean],
                    "std": [s * 255 for s in aug.std]}
        else:
            norm = {"dtype": types.UINT8}

        whole, plan_crops = cfg.dali.decode == "whole", self.plan_crops  # the graph holds no reference to self
        box = {"axis_names": "WH", "normalized_anchor": False, "normalized_shape": False}
        draw = {"random_area": list(aug.scale), "random_aspect_ratio": list(aug.ratio), "num_attempts": 10}

        @pipeline_def(batch_size=batch_size, num_threads=max(1, cfg.num_workers), device_id=self.device_id,
                      seed=hash((cfg.plan.seed, epoch, self.rank, self.rebuilds)) % 2**31,
                      prefetch_queue_depth=PIPELINE_DEPTH if pipelined else 1, exec_pipelined=pipelined,
                      exec_async=pipelined)
        def graph():
            if plan_crops:
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
            if plan_crops or not whole:
                images = fn.resize(images, resize_x=S, resize_y=S, interp_type=types.INTERP_CUBIC, antialias=True)
            return fn.crop_mirror_normalize(images, mirror=flip, output_layout="CHW", **norm)

        pipe = graph()
        pipe.build()
        return pipe

    # -- host side: read and check bytes
    def _prepare(self, ids: np.ndarray, epoch: int) -> Iterator[_Prepared]:
        return prepared_batches(self.data, ids, epoch)

    def overlap_lead(self) -> int:
        return PREFETCH_BATCHES + PIPELINE_DEPTH  # read ahead on the host, and DALI's own queue

    def _start(self, ids: np.ndarray, epoch: int) -> EpochRun:
        """The host reader thread started and the DALI graph building in a thread
        (on a GPU, the decoder's set-up: most of an epoch's start; started early,
        the epoch before goes on meanwhile). Started early, the graph also runs
        on the first batches once they are read (``_Primer``). Neither thread
        holds the loader (see PlannedLoader.next_epoch): the run holds it weakly,
        and it runs only while the loader iterates."""
        feed = _Feed(_Threaded(self._prepare(ids, epoch), PREFETCH_BATCHES), self.plan_crops)
        built: cf.Future = cf.Future()
        build = functools.partial(type(self)._pipeline, weakref.proxy(self), feed, self.config.batch_size, epoch)

        def building() -> None:
            try:
                built.set_result(build())
            except BaseException as e:  # noqa: BLE001 - raised where the epoch takes its pipeline
                built.set_exception(e)

        threading.Thread(target=building, name="dali-build", daemon=True).start()
        primer = _Primer(built, feed)
        return EpochRun(type(self)._run(weakref.proxy(self), feed, primer, epoch),
                        functools.partial(_release, feed, primer), primer)

    def _run(self, feed: _Feed, primer: _Primer, epoch: int) -> Iterator[DecodedBatch]:
        """The epoch's batches; its reader thread is stopped by the run's release
        (``_release``), which closing the run always calls after this."""
        try:
            pipe, primed = primer.take()
        except Exception as e:  # noqa: BLE001 - e.g. out of memory beside the epoch before's pipeline, now gone
            log.warning("DALI pipeline built early failed (%s: %s); building it again", type(e).__name__, e)
            pipe, primed = self._pipeline(feed, self.config.batch_size, epoch), False
        while True:
            try:
                if not primed:
                    pipe.schedule_run()  # with outputs(): what pipe.run() does
                primed = False
                (out,) = pipe.outputs()
            except StopIteration:
                if any(b.keys for b in feed.inflight):
                    raise RuntimeError("DALI stopped with batches still in flight; samples would be lost") from None
                while feed.inflight:  # empty batches fed after the last real one
                    yield self._result(feed.inflight.popleft(), None)
                return
            except RuntimeError as e:  # a decode failed: the pipeline object is dead
                del pipe
                self._recover(feed, e)
                pipe = self._pipeline(feed, self.config.batch_size, epoch)
                continue
            while not feed.inflight[0].keys:
                yield self._result(feed.inflight.popleft(), None)
            yield self._result(feed.inflight.popleft(), out)

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
                single = self._pipeline(lambda: holder[0], 1, self.epoch, pipelined=False)  # probes decoding only
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


def prepared_batches(data: PlannedData, ids: np.ndarray, epoch: int) -> Iterator[_Prepared]:
    """Each planned batch's bytes read and checked, and its crops planned, as DALI
    is fed them: on a GPU node, the whole host side. It holds ``data``, not the
    loader (its thread would keep a dropped loader alive)."""
    cfg, classes = data.config, len(data.manifest.classes)
    for batch_ids, samples in read_batches(data, ids, range(-(-len(ids) // cfg.batch_size))):
        out = _Prepared(planned=len(batch_ids))
        for gid, name, members in samples:
            try:
                label = label_of(members, classes)
                jpeg, width, height, mode_reason = decoder_ready_jpeg(image_member(members), cfg.images)
            except BadImage as e:
                out.skips.append((name, e.reason))
                continue
            if mode_reason:
                out.converted.append(mode_reason)
            box, flip = crop_and_flip(width, height, cfg.augment, sample_rng(cfg.plan.seed, epoch, gid))
            out.data.append(np.frombuffer(jpeg, dtype=np.uint8))
            out.boxes.append(box)
            out.flips.append(flip)
            out.labels.append(label)
            out.keys.append(name)
            out.ids.append(gid)
        yield out


class _Threaded:
    """Items of a generator, made in a background thread ``depth`` ahead; its
    errors are raised in the consumer. ``close()`` stops the thread, also when
    nothing was taken (an epoch started early and then dropped)."""

    _DONE = object()

    def __init__(self, items: Iterator, depth: int) -> None:
        self.items = items
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.finished = False
        self.thread = threading.Thread(target=self._work, name="dali-feed", daemon=True)
        self.thread.start()

    def _put(self, entry: tuple) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for item in self.items:
                if not self._put((item, None)):
                    return
            self._put((self._DONE, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put((self._DONE, e))
        finally:
            self.items.close()

    def __iter__(self) -> _Threaded:
        return self

    def peek(self, n: int) -> list[tuple]:
        """The next ``n`` (item, error) entries made, without taking them."""
        with self.q.mutex:
            return list(self.q.queue)[:n]

    def __next__(self):
        if self.finished:
            raise StopIteration
        item, error = self.q.get()
        if item is self._DONE:
            self.close()
            if error is not None:
                raise error
            raise StopIteration
        return item

    def close(self) -> None:
        if self.stop.is_set():  # once: a reader stuck in a fetch costs one wait, not one per caller
            return
        self.finished = True
        self.stop.set()
        self.thread.join(timeout=5)
