"""`mae chaos`: a soak that kills a tiny pretraining over and over and proves nothing changed.

1. Real-photo shards go to an S3 server (moto, behind the fault layer of
   ``infra.testing.s3_faults``); a clean run (no faults, no kills) trains on them.
2. The same run again with ``fault_rate`` of object GETs failing (503, 500, resets,
   truncated bodies, stalls past the read timeout), SIGKILLed ``kills`` times — at a
   random step, or (every other kill) inside a checkpoint save — and relaunched
   each time on a fresh shard cache, as a replacement node would be.
3. The audit: every step's loss identical to the clean run's (and on every replay of
   a step), the final weights identical, every sample of every epoch seen exactly
   once across the ranks (per-sample ids logged by each rank), and no checkpoint
   lost — each relaunch resumed from the newest complete checkpoint its
   predecessor left, and every checkpoint left at the end verifies.

The figures (kills survived, faults injected, samples lost or duplicated) are
written to ``WORKDIR/chaos_report.json``; ``ChaosReport.ok`` is the verdict.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from infra.files import claim_folder
from infra.net import free_port
from infra.options import option, require, require_choice, require_positive, require_text
from infra.testing.processes import kill_tree
from train.checkpoint import COMPLETE, complete_tags, latest_complete, tag_for, verify
from train.errors import CheckpointIntegrityError, TrainError

log = logging.getLogger(__name__)
BUCKET = "maescale-chaos"
MICRO_BATCH = 8
EVERY_STEPS = 2  # a checkpoint every 2 steps: many saves to kill inside
SLOW_SAVE_S = 0.4  # the window inside each save of the faulted run
FAULT_KINDS = ("slowdown", "error500", "reset", "truncate", "stall")  # stalls outlast the 1 s read timeout
MARKER = ".mae-chaos"  # a workdir holding it was made by mae chaos and may be emptied
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "fake", "AWS_SECRET_ACCESS_KEY": "fake-secret", "AWS_DEFAULT_REGION": "us-east-1"}


class ChaosError(TrainError):
    """The soak could not run (a launch failed or hung); the message shows its log."""


@dataclass(frozen=True)
class ChaosConfig:
    workdir: str = option("chaos", "where data, runs, logs and chaos_report.json go (emptied first: a new or empty "
                                   "folder, or one an earlier soak made)")
    kills: int = option(6, "SIGKILLs at random points; every other one inside a checkpoint save")
    epochs: int = option(3, "epochs of the tiny run (a kill costs ~3 of its 8 steps per epoch: kills <= 2 x epochs)")
    images: int = option(128, "real-photo crops in the dataset (even: 2 ranks, no padding)")
    ranks: int = option(2, "processes per launch (torchrun, gloo)")
    stage: int = option(2, "ZeRO stage")
    backend: str = option("cpu", "decode backend: cpu or dali")
    fault_rate: float = option(0.1, "share of object GETs that fail: 503, 500, reset, truncated body, stall")
    seed: int = option(0, "kill points and faults")
    launch_timeout_s: float = option(300.0, "a launch that runs longer is a hang")

    def __post_init__(self) -> None:
        require_text(self, "workdir")
        require_positive(self, "epochs", "images", "ranks", "launch_timeout_s")
        require(self.kills >= 0, "kills", f"must be >= 0, got {self.kills}")
        # each kill lands after the launch's first checkpoint, so each costs the run ~2 steps of progress
        require(self.kills == 0 or 2 * self.kills + 3 <= self.steps, "kills",
                f"must be at most {max(0, (self.steps - 3) // 2)} for a run of {self.steps} steps (epochs x images / "
                f"(ranks x {MICRO_BATCH})), got {self.kills}: raise epochs or images")
        require(0 <= self.fault_rate < 1, "fault_rate", f"must be in [0, 1), got {self.fault_rate}")
        require(self.images % (self.ranks * MICRO_BATCH) == 0, "images",
                f"must be a multiple of ranks x {MICRO_BATCH} (whole batches, no padding), got {self.images}")
        require_choice(self, "backend", ("cpu", "dali"))
        require_choice(self, "stage", (0, 1, 2, 3))

    @property
    def steps_per_epoch(self) -> int:
        return self.images // (self.ranks * MICRO_BATCH)

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclass
class ChaosReport:
    kills_asked: int = 0
    fault_rate: float = 0.0
    kills: int = 0  # SIGKILLs survived (the run was relaunched and went on)
    kills_in_save: int = 0
    launches: int = 0
    faults: dict[str, int] = field(default_factory=dict)  # injected, by kind
    object_gets: int = 0
    steps: int = 0
    epochs: int = 0
    samples_lost: int = 0  # over every epoch, summed over ranks
    samples_duplicated: int = 0
    loss_mismatches: list[int] = field(default_factory=list)  # steps whose loss differs from the clean run
    sample_mismatches: int = 0  # micro-steps that read other samples than the clean run's
    weights_identical: bool = False
    checkpoints_lost: list[str] = field(default_factory=list)
    resumed_from: list[int] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        """Nothing changed, and the soak did what it says: every kill asked for, a
        relaunch that resumed from a checkpoint, faults injected when asked for."""
        tested = (self.kills == self.kills_asked and (not self.kills or any(self.resumed_from))
                  and (not self.fault_rate or sum(self.faults.values()) > 0))
        return tested and not (self.samples_lost or self.samples_duplicated or self.loss_mismatches
                               or self.sample_mismatches or self.checkpoints_lost) and self.weights_identical

    def summary(self) -> str:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "none"
        return "\n".join([
            f"kills survived       {self.kills} of {self.kills_asked} ({self.kills_in_save} inside a checkpoint "
            f"save), {self.launches} launches",
            f"faults injected      {sum(self.faults.values())} of {self.object_gets} object GETs ({faults})",
            f"steps, epochs        {self.steps}, {self.epochs}; resumed from steps {self.resumed_from}",
            f"samples lost / dup   {self.samples_lost} / {self.samples_duplicated}",
            f"losses vs clean run  {'identical' if not self.loss_mismatches else f'differ at {self.loss_mismatches}'}",
            f"samples vs clean run "
            f"{f'differ at {self.sample_mismatches} micro-steps' if self.sample_mismatches else 'identical'}",
            f"final weights        {'identical' if self.weights_identical else 'DIFFER'}",
            f"checkpoints lost     {len(self.checkpoints_lost)} {self.checkpoints_lost or ''}".rstrip(),
            f"verdict              {'PASS' if self.ok else 'FAIL'} in {self.wall_s:.0f}s",
        ])


# ------------------------------------------------------------------ set-up
def write_dataset(cfg: ChaosConfig, s3, root: Path) -> str:
    """Real-photo shards uploaded to the bucket; returns the dataset URL."""
    from infra.testing.photos import write_photo_folder
    from pipeline.shards.writer import ShardWriterConfig, write_shards

    write_photo_folder(root / "src", cfg.images, size=(64, 48), seed=cfg.seed)
    write_shards(str(root / "src"), str(root / "shards"), ShardWriterConfig(shard_bytes=8_000))
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    for p in sorted((root / "shards").iterdir()):
        client.upload_file(str(p), BUCKET, f"shards/{p.name}")
    return f"s3://{BUCKET}/shards"


def launch_command(cfg: ChaosConfig, url: str, endpoint: str, run: Path, cache: Path, *extra: str) -> list[str]:
    overrides = [
        f"data.url={url}", f"data.storage.endpoint_url={endpoint}", f"data.storage.cache_dir={cache}",
        "data.storage.cache_limit_gb=0.00002",  # ~20 KB: shards are evicted and fetched again every epoch
        "data.storage.read_timeout_s=1.0", "data.storage.retry.base_delay_s=0.05", "data.storage.retry.max_attempts=10",
        f"data.backend={cfg.backend}", f"data.batch_size={MICRO_BATCH}", "data.num_workers=1",
        f"schedule.max_steps={cfg.steps}", "optim.lr=1.0e-3", "schedule.warmup_epochs=0.5",
        f"deepspeed.stage={cfg.stage}", f"checkpoint.dir={run / 'ckpt'}", f"checkpoint.every_steps={EVERY_STEPS}",
        "checkpoint.keep_last=2", f"log.metrics_file={run / 'metrics.jsonl'}", f"log.sample_ids_dir={run / 'ids'}",
        "log.every_steps=1", *extra]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg.ranks), "--master_port",
            str(free_port()), "-m", "train.pretrain", "--config", "tiny_cpu", *overrides]


@contextlib.contextmanager
def launched(cmd: list[str], log_path: Path) -> Iterator[subprocess.Popen]:
    """A launch (torchrun and its ranks, in their own session so a kill takes them
    all), killed on the way out if it still runs: a Ctrl-C or an error in the soak
    must not leave it training."""
    env = {**os.environ, **CREDENTIALS}
    with open(log_path, "w") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()


def finish(proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait()
        rc = "hung"
    if rc != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise ChaosError(f"chaos: a launch failed ({rc}); last lines of {log_path}:\n{tail}")


# ------------------------------------------------------------------ killing
def log_size(metrics: Path) -> int:
    try:
        return metrics.stat().st_size
    except FileNotFoundError:
        return 0


def steps_done(metrics: Path, offset: int = 0) -> int:
    """The last step rank 0 logged past byte ``offset`` of the log (0 before the first)."""
    try:
        with open(metrics, "rb") as f:
            f.seek(offset)
            lines = f.read().decode("utf-8", "replace").splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a line cut by a kill
    return 0


def kill_point(cfg: ChaosConfig, rng: random.Random, resumed: int, in_save: bool) -> int:
    """Where the next kill lands: after this launch wrote at least one checkpoint (so
    every relaunch must resume from a newer one) — 1 or 2 steps past it, or inside
    the save that follows it (the final save included)."""
    first = resumed + EVERY_STEPS  # the first checkpoint this launch writes
    if in_save:
        return min(first + EVERY_STEPS, cfg.steps)
    return min(first + rng.randint(1, EVERY_STEPS), cfg.steps - 1)


def wait_and_kill(proc: subprocess.Popen, run: Path, step: int, in_save: bool, timeout_s: float,
                  offset: int, started: float) -> bool:
    """SIGKILL the launcher and its ranks at the point; False if the run ended first.
    Only this launch's own progress counts: steps it logged past byte ``offset`` of
    the shared log, a save folder changed since ``started`` (unix time) — not what
    an earlier launch left."""
    partial = run / "ckpt" / tag_for(step)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if in_save and _saving(partial, started):
            break
        if not in_save and steps_done(run / "metrics.jsonl", offset) >= step:
            break
        time.sleep(0.01)
    if proc.poll() is not None:
        return False
    kill_tree(proc.pid)
    proc.wait()
    return True


def _saving(partial: Path, since: float) -> bool:
    """A save into ``partial`` is under way: files in it, not complete, changed since ``since``."""
    try:
        return (partial.stat().st_mtime >= since and not (partial / COMPLETE).exists()
                and any(partial.iterdir()))
    except FileNotFoundError:
        return False


def resumed_step(log_path: Path) -> int:
    """The step a launch resumed from (0: started fresh), from its log."""
    found = re.findall(r"resumed from \S+ \(step (\d+)\)", log_path.read_text(errors="replace"))
    return int(found[0]) if found else 0


# ------------------------------------------------------------------ audit
def per_step(metrics: Path) -> dict[int, list[float]]:
    """Every loss logged for each step (a replayed step appears more than once)."""
    losses: dict[int, list[float]] = defaultdict(list)
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # cut by a kill
        losses[int(rec["step"])].append(float(rec["loss"]))
    return losses


def micro_records(ids_dir: Path) -> dict[tuple[int, int], list[dict]]:
    """(rank, micro-step) -> every record of it."""
    records: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for path in sorted(ids_dir.glob("samples_rank*.jsonl")):
        rank = int(path.stem.removeprefix("samples_rank"))
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            records[(rank, int(rec["micro"]))].append(rec)
    return records


def audit_samples(cfg: ChaosConfig, chaos: Path, clean: Path) -> tuple[int, int, list[str]]:
    """(lost, duplicated, problems): every sample once per epoch; replays and the
    clean run read the same ids at every micro-step."""
    got, ref = micro_records(chaos / "ids"), micro_records(clean / "ids")
    problems = [f"micro-step {k} read other samples than the clean run" for k in sorted(ref)
                if k not in got or any(r["ids"] != ref[k][-1]["ids"] for r in got[k])]
    per_epoch: dict[int, Counter] = defaultdict(Counter)
    for recs in got.values():
        per_epoch[int(recs[-1]["epoch"])].update(recs[-1]["ids"])
    lost = dup = 0
    for epoch in range(cfg.epochs):
        seen = per_epoch[epoch]
        lost += sum(1 for i in range(cfg.images) if seen[i] == 0)
        dup += sum(n - 1 for n in seen.values() if n > 1)
    return lost, dup, problems


def final_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    from train.weights.consolidate import consolidate

    return consolidate(run / "ckpt", tag_for(step))


def audit(cfg: ChaosConfig, report: ChaosReport, chaos: Path, clean: Path) -> None:
    ref, got = per_step(clean / "metrics.jsonl"), per_step(chaos / "metrics.jsonl")
    report.steps = max(got, default=0)
    report.epochs = cfg.epochs
    report.loss_mismatches = [s for s in sorted(ref) if got.get(s) is None or any(v != ref[s][-1] for v in got[s])]
    lost, dup, problems = audit_samples(cfg, chaos, clean)
    report.samples_lost, report.samples_duplicated, report.sample_mismatches = lost, dup, len(problems)
    for p in problems[:5]:
        log.error("chaos: %s", p)
    a, b = final_weights(clean, cfg.steps), final_weights(chaos, cfg.steps)
    report.weights_identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for tag in complete_tags(chaos / "ckpt"):
        try:
            verify(chaos / "ckpt" / tag)
        except CheckpointIntegrityError as e:
            report.checkpoints_lost.append(f"{tag}: {e}")


# ------------------------------------------------------------------ the soak
def run_chaos(cfg: ChaosConfig) -> ChaosReport:
    """Clean run, killed-and-faulted run, audit; the report is also written to
    ``WORKDIR/chaos_report.json``."""
    from infra.testing.s3_faults import FaultyS3

    t0 = time.monotonic()
    work = fresh_workdir(Path(cfg.workdir))
    report = ChaosReport(kills_asked=cfg.kills, fault_rate=cfg.fault_rate)
    with FaultyS3() as s3:
        url = write_dataset(cfg, s3, work / "data")
        clean, chaos = work / "clean", work / "chaos"
        clean.mkdir(), chaos.mkdir()
        log.info("chaos: clean run, %d steps on %d ranks", cfg.steps, cfg.ranks)
        with launched(launch_command(cfg, url, s3.endpoint_url, clean, work / "cache-clean"),
                      clean / "launch.log") as proc:
            finish(proc, clean / "launch.log", cfg.launch_timeout_s)
        s3.faults.set_rate(cfg.fault_rate, FAULT_KINDS, seed=cfg.seed, seconds=2.0)
        gets_before = s3.faults.object_gets
        killed_run(cfg, s3, url, chaos, report)
        report.faults = dict(Counter(s3.faults.injected))
        report.object_gets = s3.faults.object_gets - gets_before
    audit(cfg, report, chaos, clean)
    report.wall_s = time.monotonic() - t0
    (work / "chaos_report.json").write_text(json.dumps({**asdict(report), "ok": report.ok}, indent=1))
    return report


def fresh_workdir(work: Path) -> Path:
    """``work``, emptied: only a folder that is new, empty, or was made by ``mae chaos``
    (it holds the marker) — never a folder of the user's (``.``, ``~``, a typo)."""
    claim_folder(work, MARKER, "mae chaos")
    for p in work.iterdir():
        if p.name != MARKER:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return work


def killed_run(cfg: ChaosConfig, s3, url: str, run: Path, report: ChaosReport) -> None:
    """Launch, kill at a random point, relaunch ... and let the last launch finish.
    Each relaunch must resume from the newest checkpoint the killed one left."""
    rng = random.Random(cfg.seed)
    newest = 0
    for launch in range(cfg.kills + 1):
        log_path = run / f"launch{launch:02d}.log"
        cmd = launch_command(cfg, url, s3.endpoint_url, run, run.parent / f"cache-{launch:02d}",
                             f"faults.slow_save_s={SLOW_SAVE_S}")
        offset, started = log_size(run / "metrics.jsonl"), time.time()
        with launched(cmd, log_path) as proc:
            report.launches += 1
            in_save = launch % 2 == 1
            target = kill_point(cfg, rng, newest, in_save)
            killed = launch < cfg.kills and wait_and_kill(proc, run, target, in_save, cfg.launch_timeout_s,
                                                          offset, started)
            if not killed:
                finish(proc, log_path, cfg.launch_timeout_s)
        resumed = resumed_step(log_path)
        report.resumed_from.append(resumed)
        if resumed != newest:
            report.checkpoints_lost.append(f"launch {launch} resumed from step {resumed}, the newest complete "
                                           f"checkpoint was step {newest}")
        if not killed:
            return
        report.kills += 1
        report.kills_in_save += in_save
        log.info("chaos: launch %d killed %s step %d", launch, "inside the save of" if in_save else "after", target)
        tag = latest_complete(run / "ckpt")
        newest = int(tag.removeprefix("step")) if tag else 0
