"""Fine-tuning and the paper's linear probe: the loop behind `mae finetune`.

One ``Finetuner`` per process, driven by ``train.finetune``: a ``ViTClassifier``
started from pretrained weights (or random init, the baseline), trained on
labelled shards through the same DeepSpeed engine (ZeRO 0-3), data pipeline,
crash-safe checkpoints and metrics as pretraining. Per optimizer step: lr from the
warmup + cosine schedule times each group's layer-decay scale; mixup/cutmix and
label smoothing on the device; soft-target cross-entropy. Per epoch (and at the
end): top-1/top-5 on the validation split, gathered over ranks and counted once
per sample, exported to the metrics file and Prometheus; the classifier is written
to ``checkpoint.dir/last`` and, when it is the best so far, ``checkpoint.dir/best``.

Resume is exact: the loader's position, the optimizer and each rank's RNG come
back from the checkpoint; mixing is keyed by the batch; building an iterator
(training or evaluation) never draws from the training RNG.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from infra.metrics import sink
from infra.redact import redact_tree
from infra.tracking import NullTracker, open_tracker
from model.classifier import ClassifierConfig, ViTClassifier, param_groups_lrd
from model.registry import model_config
from model.weights import CheckpointMismatchError, load_classifier_state_dict
from pipeline.augment import AugmentConfig
from pipeline.loader import Batch, Loader, LoaderConfig, build_loader
from pipeline.plan import PlanConfig
from train.checkpoint import CheckpointManager
from train.config import flat_config
from train.engine import adamw, build_engine, device_for, init_distributed, module_state_dict, release_engine, set_lr
from train.errors import EvalInputError, ResumeError, WeightsError, check_classes
from train.eval.finetune_config import FinetuneConfig
from train.eval.lars import LARS
from train.eval.mixup import mix_batch, soft_cross_entropy
from train.logfiles import open_log, write_run_summary
from train.recipe import Derived, derived, lr_at, micro_batches_per_epoch, same_global_batch
from train.rng import StepStreams
from train.run_lock import take_run_lock
from train.step_metrics import record_memory, start_prometheus, stop_prometheus
from train.trainer import StopSignal, _timed, mark_last_epoch
from train.update_guard import UpdateGuard
from train.weights.files import export_classifier
from train.weights.pretrained import read_weights

log = logging.getLogger(__name__)
GAUGE_INTERVAL_S = 1.0
EXPORTS = ("best", "last")


@dataclass
class FinetuneResult:
    step: int = 0
    epoch: int = 0
    stopped_by_signal: str | None = None
    nonfinite_skipped: int = 0
    images: int = 0
    images_per_s: float = 0.0
    wall_s: float = 0.0
    data_wait_s: float = 0.0
    init: str = "random"  # what the classifier started from: random, encoder, classifier
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)  # one per evaluation: epoch, step, top1, top5, loss, samples
    best_top1: float | None = None


def val_loader_config(cfg: FinetuneConfig) -> LoaderConfig:
    """The validation split read like the training one (backend, storage, image policy),
    with the evaluation transform: centre crop, no flip, manifest order."""
    aug = cfg.data.augment
    return replace(cfg.data, url=cfg.eval.url, batch_size=cfg.eval.batch_size, drop_last=False,
                   overlap_epochs=False,  # each evaluation reads epoch 0 again (set_epoch(0)): no next epoch
                   augment=AugmentConfig(img_size=cfg.img_size, deterministic=True,
                                         crop_fraction=cfg.eval.crop_fraction, mean=aug.mean, std=aug.std),
                   plan=PlanConfig(seed=cfg.data.plan.seed, shuffle=False, uneven="pad"))


def build_classifier(cfg: FinetuneConfig, num_classes: int) -> tuple[ViTClassifier, str]:
    """The classifier of the config (seeded init), started from ``model.weights``;
    returns it and what it started from ('random', 'encoder' or 'classifier')."""
    m = cfg.model
    torch.manual_seed(cfg.seed)  # the same init on every rank
    ccfg = ClassifierConfig.from_encoder(model_config(m.name), num_classes, img_size=cfg.img_size,
                                         drop_path=m.drop_path, global_pool=m.global_pool, head=m.head)
    model = ViTClassifier(ccfg)
    kind = "random"
    if m.weights:
        sd, _ = read_weights(m.weights)
        try:
            kind = load_classifier_state_dict(model, sd)
        except CheckpointMismatchError as e:
            raise WeightsError(f"{m.weights} does not fit {m.name} with {num_classes} classes: {e}") from None
    model.freeze_except_last(m.trainable_blocks)
    model.set_grad_checkpointing(m.grad_checkpointing)
    return model, kind


def optimizer_for(cfg: FinetuneConfig, model: ViTClassifier, lr: float) -> torch.optim.Optimizer:
    """AdamW (or the probe's LARS) over the layer-decayed groups of the trainable parameters."""
    groups = param_groups_lrd(model, cfg.optim.weight_decay, cfg.model.layer_decay)
    if not groups:
        raise EvalInputError("no trainable parameters (check model.trainable_blocks)")
    if cfg.optim.name == "lars":
        return LARS(groups, lr=lr, weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum)
    return adamw(cfg, groups, lr)


@contextmanager
def rng_kept():
    """Leave the torch RNG as it was (a DataLoader iterator draws its base seed from
    it: that must not shift drop path after a resume)."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def batches(loader: Loader) -> Iterator[Batch]:
    with rng_kept():
        it = iter(loader)
        first = next(it, None)  # the iterator (and its workers' seeds) is made on the first next()
    if first is None:
        return
    try:
        yield first
        yield from it
    finally:
        it.close()


def gather_rows(rows: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's (n_r, k) rows, concatenated in rank order, on every rank."""
    if world == 1:
        return rows
    n = torch.tensor([len(rows)], device=rows.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, rows.shape[1], dtype=rows.dtype, device=rows.device)
    padded[:len(rows)] = rows
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])


def accuracy_rows(logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, 4) float64 rows: sample id, top-1 correct, top-5 correct, cross-entropy."""
    logits = logits.float()
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    loss = F.cross_entropy(logits, labels, reduction="none")
    return torch.stack([ids.to(logits.device).double(), hit[:, 0].double(), hit.any(1).double(), loss.double()], 1)


def summarize(rows: torch.Tensor) -> dict[str, float]:
    """Accuracy over unique sample ids (the plan pads ranks with repeats)."""
    table = rows.cpu().numpy()
    _, first = np.unique(table[:, 0], return_index=True)
    kept = table[first]
    return {"top1": float(kept[:, 1].mean()), "top5": float(kept[:, 2].mean()), "loss": float(kept[:, 3].mean()),
            "samples": int(len(kept))}


class Finetuner:
    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.rank, self.local_rank, self.world = init_distributed(cfg.deepspeed)
        self.device = device_for(self.local_rank)
        self.lock = take_run_lock(cfg.checkpoint, self.rank)  # first: a second run on this dir stops here
        self.prometheus, self.metrics_file = None, None
        self.tracker = NullTracker()  # opened by run(), when the step a resume continues from is known
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        cfg = self.cfg
        self.prometheus = start_prometheus(cfg.metrics, self.rank, self.local_rank, self.world, cfg.data.backend,
                                           cfg.checkpoint.dir)
        self.loader = build_loader(cfg.data, self.rank, self.world, device=self.device)
        self.classes = self._classes(self.loader, cfg.data.url)
        self.num_classes = cfg.model.num_classes or len(self.classes)
        self.val_loader = build_loader(val_loader_config(cfg), self.rank, self.world, self.device) \
            if cfg.eval.url else None
        if self.val_loader is not None:
            check_classes(self.classes, cfg.data.url, self._classes(self.val_loader, cfg.eval.url), cfg.eval.url)
        else:
            check_classes(self.classes, cfg.data.url)
        model, kind = build_classifier(cfg, self.num_classes)
        self.model_cfg = model.cfg
        sizes = (sum(p.numel() for p in model.parameters() if p.requires_grad),
                 sum(p.numel() for p in model.parameters()))  # before ZeRO-3 partitions them
        self.derived: Derived = derived(cfg, self.world, micro_batches_per_epoch(cfg, self.loader.epoch_samples(), self.world))
        self.engine = build_engine(cfg, model, self.derived.lr, optimizer_for(cfg, model, self.derived.lr))
        self.ckpt = CheckpointManager(cfg.checkpoint, self._fingerprint(), self.rank, self.world, self.lock,
                                      cfg.faults.slow_save_s)
        self.streams = StepStreams(cfg.seed, self.rank, self.device)  # drop path: each rank its own saved stream
        self.metrics_file = open_log(cfg.log.metrics_file, "log.metrics_file") if self.rank == 0 else None
        self.result = FinetuneResult(init=kind)
        self._log_start(*sizes)

    def _fingerprint(self) -> dict[str, object]:
        """The config's fingerprint, and what the run made of it: the head's class count
        (the data's, unless model.num_classes says), the weights it started from and
        the validation set (its manifest's fingerprint: the best checkpoint is chosen
        by its scores, which another set's would not compare with). A resume that
        changes any is refused by name, before DeepSpeed loads a thing."""
        weights = self.cfg.model.weights
        if weights and "://" not in weights:
            weights = os.path.abspath(weights)
        validation = {"eval_manifest": self.val_loader.fingerprint} if self.val_loader is not None else {}
        return {**self.cfg.fingerprint(), "head_classes": self.num_classes, "weights": weights or None, **validation}

    def _classes(self, loader: Loader, url: str) -> list[str]:
        classes = loader.manifest.classes
        if not classes:
            raise EvalInputError(f"{url} has no labels (shard a folder with one subfolder per class)")
        if self.cfg.model.num_classes and len(classes) > self.cfg.model.num_classes:
            raise EvalInputError(f"{url} has {len(classes)} classes, model.num_classes is "
                                 f"{self.cfg.model.num_classes}")
        return list(classes)

    def _log_start(self, trainable: int, total: int) -> None:
        if self.rank != 0:
            return
        d, cfg = self.derived, self.cfg
        log.info("fine-tuning %s (%s init) for %d classes at %d px: %.2fM of %.2fM parameters trainable; world %d, "
                 "global batch %d, lr %.3g (blr %.3g, layer decay %.2f), %s, %.4g steps/epoch, %d steps (%d warmup), "
                 "ZeRO %d, %s", cfg.model.name, self.result.init, self.num_classes, cfg.img_size, trainable / 1e6,
                 total / 1e6, self.world, d.global_batch, d.lr, cfg.optim.blr,
                 cfg.model.layer_decay, cfg.optim.name, d.steps_per_epoch, d.total_steps, d.warmup_steps,
                 cfg.deepspeed.stage, cfg.deepspeed.precision)

    # ---------------------------------------------------------- checkpoints
    def resume(self) -> None:
        if not self.cfg.checkpoint.resume:
            if self.cfg.checkpoint.enabled:
                self.ckpt.refuse_an_earlier_run()
            return
        resumed = self.ckpt.resume(self.engine, same_global_batch(self.cfg, self.derived))
        if resumed is None:
            return
        try:
            state = resumed.meta["trainer"]
            self.loader.load_state_dict(state["loader"])
            self.result.nonfinite_skipped = int(state["nonfinite_skipped"])
            self.result.evals = list(state["evals"])
            self.result.best_top1 = state["best_top1"]
            if resumed.rng is not None:
                self.streams.load_state_dict(resumed.rng)
        except (KeyError, TypeError, ValueError) as e:
            raise ResumeError(f"checkpoint {self.ckpt.root / resumed.tag} has a malformed fine-tuning state "
                              f"({type(e).__name__}: {e})") from e
        self.result.step = resumed.step
        if resumed.rng is None:  # another world size: fresh streams for these ranks
            self.streams = StepStreams(self.cfg.seed, self.rank, self.device, step=resumed.step)

    def save(self) -> None:
        r = self.result
        meta = {"model": self.cfg.fingerprint()["model"], "epoch": self.loader.epoch,
                "config": redact_tree(self.cfg.to_dict()),
                "derived": asdict(self.derived),
                "trainer": {"loader": self.loader.state_dict(), "nonfinite_skipped": r.nonfinite_skipped,
                            "evals": r.evals, "best_top1": r.best_top1}}
        seconds = self.ckpt.save(self.engine, r.step, meta, self.streams.state_dict())
        sink().observe("mae_checkpoint_save_duration_seconds", seconds)

    # ----------------------------------------------------------------- loop
    def run(self, stop: StopSignal) -> FinetuneResult:
        """Train to ``total_steps`` epoch after epoch, evaluating as configured, or
        until a stop signal."""
        r, every = self.result, self.cfg.eval.every_epochs
        self.t_start = time.perf_counter()
        self._gauges_at = float("-inf")
        self.tracker = open_tracker(self.cfg.log, self.rank, self.cfg.checkpoint.dir, r.step, flat_config(self.cfg))
        self.guard = UpdateGuard(r, self.cfg.faults.max_nonfinite_in_row, self.cfg.checkpoint.every_steps,
                                 self.derived.total_steps, self.world, self.cfg.faults.inject_nonfinite_at)
        self.guard.say_if_nothing_left(self.rank)
        while r.step < self.derived.total_steps and r.stopped_by_signal is None:
            epoch = self.loader.epoch
            if self._train_epoch(stop) and (epoch + 1) % every == 0:
                self.evaluate(epoch)
        if r.stopped_by_signal is None and (not r.evals or r.evals[-1]["step"] != r.step):
            self.evaluate(self.loader.epoch)  # the end, mid-epoch (max_steps) or off the every_epochs grid
        r.epoch, r.wall_s = self.loader.epoch, time.perf_counter() - self.t_start
        r.images_per_s = r.images / max(r.wall_s, 1e-9)
        return r

    def _train_epoch(self, stop: StopSignal) -> bool:
        """One epoch (the rest of it after a resume); True if it ran to its end."""
        mark_last_epoch(self.loader, self.derived.total_steps - self.result.step, self.cfg.optim.accum_steps,
                        len(self.guard.window))
        if self.val_loader is not None and (self.loader.epoch + 1) % self.cfg.eval.every_epochs == 0:
            self.loader.last_epoch = self.loader.epoch  # an evaluation follows: no next epoch's workers idle through it
        with closing(batches(self.loader)) as it:
            for batch, wait, t0 in _timed(it):
                if self._micro_step(batch, wait, t0, stop) or self.result.step >= self.derived.total_steps:
                    return False
        return True

    def _micro_step(self, batch: Batch, wait: float, t0: float, stop: StopSignal) -> bool:
        """Forward, agree across ranks, backward/step; returns True to stop now."""
        cfg, r = self.cfg, self.result
        set_lr(self.engine, lr_at(r.step, self.derived, cfg.optim.min_lr))
        labels = self._labels(batch)
        images, targets, _ = mix_batch(cfg.mixup, batch.images, labels, self.num_classes, cfg.seed,
                                       self.loader.epoch, batch.sample_ids)
        with self.streams.model_stream():  # drop path draws from the saved stream
            logits = self.engine(images)  # bf16: the engine autocasts the forward
        loss = soft_cross_entropy(logits, targets)
        updated = self.guard.update(self.engine, loss, len(batch.keys), wait, stop.received is not None)
        if updated is None:
            return False
        boundary, stopping = updated
        sink().inc("mae_trainer_images_total", len(batch.keys))
        sink().observe("mae_data_wait_seconds", wait)
        sink().observe("mae_step_duration_seconds", time.perf_counter() - t0)
        if not boundary:
            return False
        self._record_step(self.guard.close_window(), batch)
        return self.guard.after_step(stopping, stop, cfg.checkpoint.enabled, self.save, self.device)

    def _labels(self, batch: Batch) -> torch.Tensor:
        labels = batch.labels.to(self.device, non_blocking=True)
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            key = batch.keys[int(bad.nonzero()[0])]
            raise EvalInputError(f"sample {key} has label {int(labels[bad][0])}, outside [0, {self.num_classes})")
        return labels

    def _record_step(self, loss: float, batch: Batch) -> None:
        r = self.result
        lr = lr_at(r.step - 1, self.derived, self.cfg.optim.min_lr)
        self._write({"step": r.step, "loss": loss, "lr": lr, "epoch": self.loader.epoch,
                     "ids": batch.sample_ids[:4].tolist()})
        self.tracker.scalars(r.step, {"train/loss": loss, "train/lr": lr, "train/epoch": self.loader.epoch})
        if self.rank == 0 and (r.step % self.cfg.log.every_steps == 0 or r.step == 1):
            log.info("step %d/%d epoch %d loss %.4f lr %.3g", r.step, self.derived.total_steps, self.loader.epoch,
                     loss, lr)
        now = time.perf_counter()
        if now - self._gauges_at >= GAUGE_INTERVAL_S or r.step == self.derived.total_steps:
            self._gauges_at = now
            for name, value in (("mae_loss", loss), ("mae_learning_rate", lr), ("mae_step", r.step),
                                ("mae_epoch", self.loader.epoch)):
                sink().set(name, value)
            record_memory(self.device)

    def _write(self, record: dict) -> None:
        if self.metrics_file:
            self.metrics_file.write(record)

    # ----------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict | None:
        """Top-1/top-5 and loss on the validation split; exports last (and best).
        Without a validation split only ``last`` is written."""
        if self.val_loader is None:
            self._export("last", {"epoch": epoch, "step": self.result.step})
            return None
        module = self.engine.module
        module.eval()
        rows = [torch.zeros(0, 4, dtype=torch.float64, device=self.device)]
        try:
            for batch in batches(self.val_loader):
                logits = self.engine(batch.images)
                rows.append(accuracy_rows(logits, self._labels(batch), batch.sample_ids))
        finally:
            module.train()
            self.val_loader.set_epoch(0)  # the same order every time
        r = self.result
        scores = {"epoch": epoch, "step": r.step, **summarize(gather_rows(torch.cat(rows), self.world))}
        best = r.best_top1 is None or scores["top1"] > r.best_top1
        r.best_top1 = scores["top1"] if best else r.best_top1
        r.evals.append(scores)
        self._report_eval(scores)
        self._export("last", scores)
        if best:
            self._export("best", scores)
        return scores

    def _report_eval(self, scores: dict) -> None:
        for name, key in (("mae_eval_top1_ratio", "top1"), ("mae_eval_top5_ratio", "top5"), ("mae_eval_loss", "loss")):
            sink().set(name, scores[key])
        sink().set("mae_eval_best_top1_ratio", self.result.best_top1)
        self._write({"eval": True, **scores, "best_top1": self.result.best_top1})
        self.tracker.scalars(scores["step"], {f"eval/{k}": scores[k] for k in ("top1", "top5", "loss")}
                             | {"eval/best_top1": self.result.best_top1})
        if self.rank == 0:
            log.info("eval after epoch %d (step %d): top-1 %.2f%%, top-5 %.2f%%, loss %.4f on %d samples "
                     "(best top-1 %.2f%%)", scores["epoch"], scores["step"], 100 * scores["top1"],
                     100 * scores["top5"], scores["loss"], scores["samples"], 100 * self.result.best_top1)

    def _export(self, which: str, scores: dict) -> None:
        """The classifier as ``checkpoint.dir/{best,last}/classifier.safetensors`` (every
        rank gathers, rank 0 writes)."""
        sd = module_state_dict(self.engine)
        if self.rank == 0:
            meta = {"model": self.cfg.model.name, "classes": self.classes, **scores}
            export_classifier(sd, self.model_cfg, Path(self.cfg.checkpoint.dir) / which / "classifier.safetensors",
                              meta)

    def write_summary(self) -> None:
        """``run_summary.json`` in the checkpoint dir (rank 0)."""
        if self.rank != 0:
            return
        r = self.result
        write_run_summary(self.cfg.checkpoint.dir, {
            **asdict(r), "losses": r.losses[-5:], "derived": asdict(self.derived), "classes": len(self.classes),
            "last_loss": r.losses[-1] if r.losses else math.nan})

    def close(self) -> None:
        for loader in (getattr(self, "loader", None), getattr(self, "val_loader", None)):
            if loader is not None:  # an epoch started early (a run that ended in an epoch's last batches)
                loader.close()
        self.tracker.close()
        if self.metrics_file:
            self.metrics_file.close()
        stop_prometheus(self.prometheus, self.cfg.metrics.linger_s,
                        self.result.stopped_by_signal if hasattr(self, "result") else None)
        if self.lock is not None:
            self.lock.release()
        release_engine(getattr(self, "engine", None))
