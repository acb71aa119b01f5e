"""The pretraining loop: one ``Trainer`` per process, driven by ``train.pretrain``.

Build (process group, metrics, loader, model, DeepSpeed engine, checkpoints), then
``run``: epoch after epoch until ``total_steps`` or a stop signal, with one
all-reduce per micro-step that agrees on the mean loss, a non-finite loss on any
rank, and a stop signal on any rank — so every rank skips, saves and stops at the
same step.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import time
import warnings
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from infra.metrics import sink
from infra.redact import redact_tree
from infra.tracking import NullTracker, open_tracker
from model.flops import encoder_speedup_flop_ratio, train_step_flops
from model.registry import create_model, model_config
from pipeline.loader import Batch, Loader, build_loader
from train.checkpoint import CheckpointManager
from train.config import RunConfig, flat_config
from train.engine import any_rank, build_engine, device_for, init_distributed, release_engine, set_lr
from train.errors import ResumeError
from train.logfiles import open_log, write_run_summary
from train.recipe import Derived, derived, lr_at, micro_batches_per_epoch, same_global_batch
from train.rng import StepStreams
from train.run_lock import take_run_lock
from train.signals import STOP_SIGNALS
from train.speedup import peak_flops_for
from train.step_metrics import EncoderTimer, GradNorm, StepClock, record_memory, start_prometheus, stop_prometheus
from train.update_guard import UpdateGuard

log = logging.getLogger(__name__)
FIXED_BATCH_SEED = 1234
GAUGE_INTERVAL_S = 1.0


@dataclass
class RunResult:
    step: int = 0
    epoch: int = 0
    stopped_by_signal: str | None = None
    nonfinite_skipped: int = 0
    images: int = 0
    images_per_s: float = 0.0  # all ranks, over the whole run (first steps included)
    peak_memory_bytes: int | None = None  # CUDA allocator peak on rank 0
    mfu: float | None = None  # model FLOPs / peak bf16 FLOPs of the card, where known
    wall_s: float = 0.0
    data_wait_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    fixed_batch_loss: float | None = None  # loss on fixed_batch() at the end: export must reproduce it


class StopSignal:
    """SIGTERM, SIGINT, SIGUSR1 (Slurm's usual warning signal) and SIGHUP (a closed
    terminal) set a flag the loop checks every step (all ranks agree on it through
    the per-step all-reduce, so every rank saves at the same step). A SIGHUP that
    the process ignores (``nohup``) stays ignored. A second SIGINT (Ctrl-C again)
    ends the process at once, exit 130, without saving: the way out of a start-up
    that hangs."""

    SIGNALS = STOP_SIGNALS

    def __init__(self, saves: bool = True) -> None:
        self.received: str | None = None
        self.saves = saves  # checkpoint.enabled: what the stop does
        self._old = {}

    def __enter__(self) -> StopSignal:
        for sig in self.SIGNALS:
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            # At once and whatever the process is doing, as kill -9 would (every save
            # is atomic); the LOCK left behind names a dead process: the next run takes it.
            os.write(2, b"SIGINT twice: stopping now, without saving\n")
            os._exit(130)
        self.received = signal.Signals(signum).name
        log.warning("%s received: %s at the end of this step, then exiting", self.received,
                    "saving a checkpoint" if self.saves else "stopping (checkpoint.enabled=false: nothing is saved)")

    def on_any_rank(self, world: int, device: torch.device) -> tuple[bool, str | None]:
        """(whether any rank has received a stop signal, the one this rank received):
        an all-reduce, so every rank must call it at the same point."""
        return any_rank(self.received is not None, world, device), self.received

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def fixed_batch(cfg: RunConfig, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch and mask noise: the trained model's loss on it is recorded, and
    an export of the checkpoint must give the same loss."""
    g = torch.Generator().manual_seed(FIXED_BATCH_SEED)
    mcfg = model_config(cfg.model.name, img_size=cfg.data.augment.img_size)
    imgs = torch.randn(n, 3, mcfg.img_size, mcfg.img_size, generator=g)
    return imgs, torch.rand(n, mcfg.num_patches, generator=g)


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.rank, self.local_rank, self.world = init_distributed(cfg.deepspeed)
        self.device = device_for(self.local_rank)
        self.lock = take_run_lock(cfg.checkpoint, self.rank)  # first: a second run on this dir stops here
        try:
            self._build()
        except BaseException:
            self._release_lock()
            raise

    def _release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed * 1000 + self.rank)  # model init (DeepSpeed broadcasts rank 0's weights)
        self.streams = StepStreams(cfg.seed, self.rank, self.device)
        self.prometheus = self._start_metrics()  # before the loader: its workers inherit the sink
        self.loader = build_loader(cfg.data, self.rank, self.world, device=self.device)
        img_size = cfg.data.augment.img_size
        model = create_model(cfg.model.name, img_size=img_size, norm_pix_loss=cfg.model.norm_pix_loss)
        self.num_patches = model.patch_embed.num_patches
        model.set_grad_checkpointing(cfg.model.grad_checkpointing)
        self.derived: Derived = derived(cfg, self.world, micro_batches_per_epoch(cfg, self.loader.epoch_samples(), self.world))
        self._measure_speedup()
        self.engine = build_engine(cfg, model, self.derived.lr)
        self.encoder_timer = EncoderTimer(self.engine.module, self.device)
        self.forward = torch.compile(self.engine) if cfg.model.compile else self.engine
        dataset = self.loader.state_dict().get("dataset", cfg.data.backend)
        self.ckpt = CheckpointManager(cfg.checkpoint, cfg.fingerprint(dataset), self.rank, self.world, self.lock,
                                      cfg.faults.slow_save_s)
        self.metrics_file = open_log(cfg.log.metrics_file, "log.metrics_file") if self.rank == 0 else None
        ids_dir = cfg.log.sample_ids_dir
        self.ids_file = open_log(ids_dir and Path(ids_dir) / f"samples_rank{self.rank:05d}.jsonl", "log.sample_ids_dir")
        self.result = RunResult()
        self.micro_steps = 0  # micro-steps of the whole run (restored on resume)
        self.tracker = NullTracker()  # opened by run(), when the step a resume continues from is known
        if self.rank == 0:
            d = self.derived
            log.info("world %d, global batch %d (micro %d x accum %d x world), lr %.3g (blr %.3g), "
                     "%.4g steps/epoch, %d steps (%d warmup), ZeRO stage %d, %s",
                     self.world, d.global_batch, cfg.data.batch_size, cfg.optim.accum_steps, d.lr,
                     cfg.optim.blr, d.steps_per_epoch, d.total_steps, d.warmup_steps,
                     cfg.deepspeed.stage, cfg.deepspeed.precision)

    def _start_metrics(self):
        prom = start_prometheus(self.cfg.metrics, self.rank, self.local_rank, self.world, self.cfg.data.backend,
                                self.cfg.checkpoint.dir)
        if prom is None:
            return None
        mcfg = model_config(self.cfg.model.name, img_size=self.cfg.data.augment.img_size)
        sink().set("mae_encoder_speedup_flop_ratio", encoder_speedup_flop_ratio(mcfg, self.cfg.model.mask_ratio))
        return prom

    def _measure_speedup(self) -> None:
        """Time a few steps of MAE vs the mask-token baseline on this run's model,
        micro-batch and device; export the ratio (the paper's Table 2, measured)."""
        m = self.cfg.metrics
        if not (m.measure_speedup if m.measure_speedup is not None else self.device.type == "cuda"):
            return
        from train.speedup import SpeedupConfig, measure_speedup

        report = measure_speedup(SpeedupConfig(
            model=self.cfg.model.name, batch=self.cfg.data.batch_size, steps=m.speedup_steps, warmup=1,
            dtype="bf16" if self.cfg.deepspeed.precision == "bf16" else "fp32", device=str(self.device),
            mask_ratio=self.cfg.model.mask_ratio, seed=self.cfg.seed, img_size=self.cfg.data.augment.img_size))
        sink().set("mae_encoder_speedup_ratio", report["measured_speedup"])
        if self.rank == 0:
            log.info("encoder speedup on this run's model and device: %.2fx measured, %.2fx FLOP ratio",
                     report["measured_speedup"], report["flop_ratio"])
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def resume(self) -> None:
        """Continue from the newest checkpoint that verifies: step, data position and
        random streams, so the next step is the one the uninterrupted run took."""
        if not self.cfg.checkpoint.resume:
            if self.cfg.checkpoint.enabled:
                self.ckpt.refuse_an_earlier_run()
            return
        resumed = self.ckpt.resume(self.engine, same_global_batch(self.cfg, self.derived))
        if resumed is None:
            return
        state = resumed.meta["trainer"]
        try:
            self.micro_steps = int(state["micro_steps"])
            self.result.nonfinite_skipped = int(state["nonfinite_skipped"])
            self.loader.load_state_dict(state["loader"])
            if resumed.rng is not None:
                self.streams.load_state_dict(resumed.rng)
        except (KeyError, TypeError, ValueError) as e:
            raise ResumeError(f"checkpoint {self.ckpt.root / resumed.tag} has a malformed trainer state "
                              f"({type(e).__name__}: {e})") from e
        self.result.step = resumed.step
        if resumed.rng is None:  # another world size: the saved streams do not map onto these ranks
            self.streams = StepStreams(self.cfg.seed, self.rank, self.device, step=resumed.step)
            if self.rank == 0:
                log.warning("elastic resume from %d to %d ranks: every remaining sample is seen once, but batches, "
                            "mask noise and losses differ from an uninterrupted run", resumed.meta["world_size"],
                            self.world)
        if self.cfg.data.backend == "dali" and self.cfg.data.dali.crop == "random" and self.rank == 0:
            log.warning("data.dali.crop=random: DALI's own crop RNG is not saved, so crops after this resume differ "
                        "from the uninterrupted run (data.dali.crop=plan resumes exactly)")

    def save(self) -> None:
        r = self.result
        meta = {"model": self.cfg.model.name, "epoch": self.loader.epoch, "config": redact_tree(self.cfg.to_dict()),
                "derived": asdict(self.derived),
                "trainer": {"micro_steps": self.micro_steps, "nonfinite_skipped": r.nonfinite_skipped,
                            "loader": self.loader.state_dict()}}
        seconds = self.ckpt.save(self.engine, r.step, meta, self.streams.state_dict())
        sink().observe("mae_checkpoint_save_duration_seconds", seconds)

    def run(self, stop: StopSignal) -> RunResult:
        """Train to ``total_steps`` (epoch after epoch), or until a stop signal."""
        r = self.result
        self.t_start = time.perf_counter()
        self._gauges_at = float("-inf")
        self.guard = UpdateGuard(r, self.cfg.faults.max_nonfinite_in_row, self.cfg.checkpoint.every_steps,
                                 self.derived.total_steps, self.world, self.cfg.faults.inject_nonfinite_at)
        self.guard.say_if_nothing_left(self.rank)
        self.tracker = open_tracker(self.cfg.log, self.rank, self.cfg.checkpoint.dir, r.step, flat_config(self.cfg))
        self.clock, self.grad_norm = StepClock(), GradNorm(self.engine, enabled=self.tracker.active)
        while r.step < self.derived.total_steps and r.stopped_by_signal is None:
            mark_last_epoch(self.loader, self.derived.total_steps - r.step, self.cfg.optim.accum_steps,
                            len(self.guard.window))
            with closing(iter(self.loader)) as it:  # an exception shuts the loader's workers down
                for batch, wait, t0 in _timed(it):
                    if self._micro_step(batch, wait, t0, stop) or r.step >= self.derived.total_steps:
                        break
        r.epoch, r.wall_s = self.loader.epoch, time.perf_counter() - self.t_start
        if r.losses:
            self._record_step(r.losses[-1], force=True)
        self._throughput()
        if r.stopped_by_signal is None:
            r.fixed_batch_loss = self.fixed_batch_loss()
        return r

    def _throughput(self) -> None:
        r = self.result
        r.images_per_s = r.images / max(r.wall_s, 1e-9)
        if self.device.type == "cuda":
            r.peak_memory_bytes = torch.cuda.max_memory_allocated(self.device)
            peak = peak_flops_for(self.device, None)
            mcfg = model_config(self.cfg.model.name, img_size=self.cfg.data.augment.img_size)
            if peak:
                per_image = train_step_flops(mcfg, 1, self.cfg.model.mask_ratio)
                r.mfu = per_image * r.images_per_s / (peak * self.world)

    def _micro_step(self, batch: Batch, wait: float, t0: float, stop: StopSignal) -> bool:
        """Forward, agree across ranks, backward/step; returns True to stop now."""
        cfg, r = self.cfg, self.result
        set_lr(self.engine, lr_at(r.step, self.derived, cfg.optim.min_lr))
        noise = self.streams.mask_noise(len(batch.keys), self.num_patches)
        with self.streams.model_stream(), warnings.catch_warnings():
            if not batch.keys:  # only corrupt samples: the forward still runs (ZeRO-3 gathers in it), its loss NaN
                warnings.simplefilter("ignore")
            loss, _, _ = self.forward(batch.images, cfg.model.mask_ratio, noise)  # bf16: the engine autocasts
        self._log_ids(batch)
        self.micro_steps += 1
        updated = self.guard.update(self.engine, loss, len(batch.keys), wait, stop.received is not None,
                                    self.grad_norm)
        if updated is None:
            return False
        boundary, stopping = updated
        self._record_micro_step(len(batch.keys), wait, t0)
        if not boundary:
            return False
        step_loss = self.guard.close_window()
        self._log_step(step_loss, batch, wait, t0)
        self._record_step(step_loss)
        return self.guard.after_step(stopping, stop, cfg.checkpoint.enabled, self.save, self.device)

    def _log_ids(self, batch: Batch) -> None:
        if self.ids_file:
            record = {"micro": self.micro_steps, "step": self.result.step + 1, "epoch": self.loader.epoch,
                      "ids": batch.sample_ids.tolist()}
            self.ids_file.write(record)

    def _record_micro_step(self, images: int, wait: float, t0: float) -> None:
        sink().inc("mae_trainer_images_total", images)
        self.clock.micro_step(images * self.world, wait)
        sink().observe("mae_data_wait_seconds", wait)
        sink().observe("mae_step_duration_seconds", time.perf_counter() - t0)
        self.encoder_timer.flush()

    def _record_step(self, loss: float, force: bool = False) -> None:
        """Gauges, at most once a second (scrapes are 1-15 s apart) and at the end."""
        now = time.perf_counter()
        if not force and now - self._gauges_at < GAUGE_INTERVAL_S:
            return
        self._gauges_at = now
        sink().set("mae_loss", loss)
        sink().set("mae_learning_rate", lr_at(self.result.step - 1, self.derived, self.cfg.optim.min_lr))
        sink().set("mae_step", self.result.step)
        sink().set("mae_epoch", self.loader.epoch)
        record_memory(self.device)

    def _log_step(self, loss: float, batch: Batch, wait: float, t0: float) -> None:
        r = self.result
        ids = hashlib.sha1(batch.sample_ids.numpy().tobytes()).hexdigest()[:12]
        lr = lr_at(r.step - 1, self.derived, self.cfg.optim.min_lr)
        images_per_s, wait_fraction = self.clock.step()
        record = {"step": r.step, "loss": loss, "lr": lr, "epoch": self.loader.epoch,
                  "step_time_s": time.perf_counter() - t0, "data_wait_s": wait, "ids": ids,
                  "images_per_s": images_per_s, "data_wait_fraction": wait_fraction, "time": time.time()}
        self.tracker.scalars(r.step, {"train/loss": loss, "train/lr": lr, "train/images_per_s": images_per_s,
                                      "train/data_wait_fraction": wait_fraction, "train/epoch": self.loader.epoch,
                                      "train/grad_norm": self.grad_norm.last})
        if self.metrics_file:
            self.metrics_file.write(record)
        if self.rank == 0 and (r.step % self.cfg.log.every_steps == 0 or r.step == 1):
            log.info("step %d/%d epoch %d loss %.4f lr %.3g data wait %.0f%%", r.step, self.derived.total_steps,
                     self.loader.epoch, loss, lr, 100 * r.data_wait_s / max(1e-9, time.perf_counter() - self.t_start))

    @torch.no_grad()
    def fixed_batch_loss(self) -> float:
        imgs, noise = fixed_batch(self.cfg)
        module = self.engine.module
        was_training = module.training
        module.eval()
        loss, _, _ = self.engine(imgs.to(self.device), self.cfg.model.mask_ratio, noise.to(self.device))
        module.train(was_training)
        return float(loss)

    def write_summary(self) -> None:
        """``run_summary.json`` in the checkpoint dir (rank 0): the result, the last
        losses and the derived values."""
        if self.rank != 0:
            return
        r = self.result
        write_run_summary(self.cfg.checkpoint.dir, {**asdict(r), "losses": r.losses[-5:],
                                                    "derived": asdict(self.derived)})

    def close(self) -> None:
        self.loader.close()  # the next epoch's workers, if a run that ended in an epoch's last batches started them
        self.tracker.close()
        self.encoder_timer.close()
        for f in (self.metrics_file, self.ids_file):
            if f:
                f.close()
        stop_prometheus(self.prometheus, self.cfg.metrics.linger_s, self.result.stopped_by_signal)
        self._release_lock()
        release_engine(getattr(self, "engine", None))


def mark_last_epoch(loader: Loader, steps_left: int, accum_steps: int, in_window: int) -> None:
    """Tell the loader whether the run reads past this epoch: if this epoch's
    remaining batches cover the micro-steps the run still needs, no next epoch is
    started early (data.overlap_epochs) only to be dropped at the end. A batch
    skipped as corrupt or non-finite can make the run need one more: that epoch
    then starts at its turn, as without overlap."""
    loader.last_epoch = loader.epoch if len(loader) >= steps_left * accum_steps - in_window else None


def _timed(it):
    """Yield (batch, seconds waited for it, time the wait started)."""
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield batch, time.perf_counter() - t0, t0
