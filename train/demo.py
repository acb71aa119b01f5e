"""`mae demo` / `make demo`: the whole system on real images, on this machine.

1. data: random crops of the photos bundled with scikit-image/scikit-learn plus
   scikit-learn's labelled digits (pretraining set; the digits are also split
   into a labelled probe train/val set), written as JPEG folders;
2. `mae shard` into an object store — a local folder, or with ``--s3`` a real S3
   server (SeaweedFS) started for the demo;
3. `mae pretrain` of a 0.9M-parameter MAE through the DeepSpeed trainer (ZeRO-2,
   CPU), Prometheus endpoint up; progress comes from scraping that endpoint;
4. `mae export`, `mae reconstruct` (PNG grid), the loss curve (lr on a second
   axis) and throughput/data wait over time (matplotlib);
5. `mae probe` (linear probe + kNN on the digits) of the pretrained encoder and
   of a randomly initialized one, and the held-out reconstruction loss before
   and after;
6. `mae finetune` on the digits, a short run of the recipe: from the pretrained
   encoder, from random init, and the paper's linear probe (LARS, BatchNorm head);
7. a summary: images/sec, data wait, loss start -> end, probe and fine-tuning
   accuracies, files.
TensorBoard holds the run's curves, the probe accuracies and the reconstruction
figure (`log.tensorboard=true`, <run>/tensorboard).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from infra.files import claim_folder
from infra.net import free_port
from train.errors import TrainError
from train.signals import STOP_SIGNALS

MODEL = "mae_vit_mini_patch4"


class DemoError(TrainError):
    """A step of the demo failed; the message says which and shows its output."""


@dataclass
class DemoConfig:
    workdir: Path = Path("demo")
    photos: int = 800  # photo crops for pretraining (plus 1,200 digits)
    epochs: float = 50
    probe_epochs: int = 60
    finetune_epochs: float = 4
    partial_blocks: int | None = None  # also fine-tune only the last k blocks (the learning test)
    s3: bool = False
    seed: int = 0
    port: int = 0  # Prometheus endpoint (0: a free port)
    results: dict = field(default_factory=dict)


def say(cfg: DemoConfig, text: str) -> None:
    print(text, flush=True)


def mae(cfg: DemoConfig, *argv: str) -> None:
    """Run one `mae` command in this process, showing it as a user would type it."""
    from train.cli import main

    say(cfg, f"$ mae {shlex.join(argv)}")
    rc = main(list(argv))
    if rc:
        raise DemoError(f"demo: `mae {shlex.join(argv)}` failed (exit {rc})")


# ------------------------------------------------------------------ 1. data
def build_sources(cfg: DemoConfig) -> dict[str, Path]:
    from infra.testing.photos import write_digits_folder, write_photo_folder

    src = cfg.workdir / "images"
    if src.exists():
        shutil.rmtree(src)
    order = np.random.default_rng(cfg.seed).permutation(1797)
    train_ids, val_ids = order[:1200], order[1200:]
    write_photo_folder(src / "pretrain" / "photos", cfg.photos, labelled=False, size=(64, 48), seed=cfg.seed)
    write_digits_folder(src / "pretrain" / "digits", train_ids, labelled=False)
    write_digits_folder(src / "probe-train", train_ids)
    write_digits_folder(src / "probe-val", val_ids)
    # held out from pretraining: for the reconstruction figure and loss
    write_photo_folder(src / "heldout" / "photos", 32, labelled=False, size=(64, 48), seed=cfg.seed + 1)
    write_digits_folder(src / "heldout" / "digits", val_ids[:32], labelled=False)
    return {name: src / name for name in ("pretrain", "probe-train", "probe-val", "heldout")}


# ------------------------------------------------------------- 3. pretrain
def scrape(port: int) -> dict[str, float]:
    """The rank's Prometheus endpoint, as {metric name: summed value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(mae_\w+?)(?:\{[^}]*\})? ([-+0-9.eEinfa]+)$", line)
        if m:
            values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(2))
    return values


def pretrain(cfg: DemoConfig, data_url: str, env: dict[str, str]) -> dict:
    run = cfg.workdir / "run"
    if run.exists():
        shutil.rmtree(run)
    port = cfg.port or free_port()
    overrides = [f"data.url={data_url}", f"checkpoint.dir={run}", f"log.metrics_file={run / 'metrics.jsonl'}",
                 f"metrics.port_base={port}", "metrics.linger_s=3", f"schedule.epochs={cfg.epochs}",
                 "log.tensorboard=true",
                 f"seed={cfg.seed}"]
    argv = ["pretrain", "--config", "demo_cpu", *overrides]
    say(cfg, f"$ mae {shlex.join(argv)}")
    log_path = cfg.workdir / "pretrain.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "train.cli", *argv], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **env})
        scraped: dict[str, float] = {}
        t0 = last_line = time.monotonic()
        tty = sys.stdout.isatty()
        while proc.poll() is None:
            time.sleep(1.0)
            with contextlib.suppress(OSError, ValueError):
                scraped = scrape(port)
            now = time.monotonic()
            if "mae_step" in scraped and (tty or now - last_line >= 15):
                last_line = now
                print(("\r" if tty else "") + progress_line(scraped, port, now - t0), end="" if tty else "\n",
                      flush=True)
        if tty:
            print()
    if proc.returncode != 0:
        raise DemoError(f"demo: pretraining {ended(proc.returncode)}; last lines of {log_path}:\n"
                        + "\n".join(log_path.read_text().splitlines()[-25:]))
    summary = json.loads((run / "run_summary.json").read_text())
    summary["prometheus"] = {"port": port, "scraped": scraped}
    return summary


def progress_line(m: dict[str, float], port: int, elapsed: float) -> str:
    steps_s = m.get("mae_step_duration_seconds_sum", 0.0) or 1.0
    return (f"  [prometheus :{port}] step {int(m['mae_step'])}  epoch {int(m.get('mae_epoch', 0))}  "
            f"loss {m.get('mae_loss', float('nan')):.4f}  images {int(m.get('mae_trainer_images_total', 0))}  "
            f"data wait {m.get('mae_data_wait_seconds_sum', 0.0) / steps_s:.0%}  {elapsed:.0f}s")


# ----------------------------------------------------------- 4. pictures
def run_figures(metrics_file: Path, workdir: Path) -> tuple[float, float]:
    """The loss curve (lr on a second axis) and throughput/data wait over time,
    drawn with matplotlib; returns the (first, last) training loss."""
    from train.figures import loss_curve, read_metrics, throughput_curve

    records = read_metrics(metrics_file)
    throughput_curve(records, workdir / "throughput.png", f"{MODEL}: throughput and data wait")
    return loss_curve(records, workdir / "loss_curve.png", f"{MODEL}: training loss (masked patches, norm-pix)")


def record_evaluation(run: Path, step: int, r: dict) -> None:
    """Probe accuracies and held-out losses into the run's TensorBoard record (the
    reconstruction figure is written there by `mae reconstruct --tensorboard`)."""
    from infra.tracking import TrackingConfig, record_results

    scalars = {}
    for kind in ("pretrained", "random"):
        scalars[f"eval/linear_top1_{kind}"] = r["probe"][kind]["linear_top1"]
        scalars[f"eval/knn_top1_{kind}"] = r["probe"][kind]["knn_top1"]
        scalars[f"eval/heldout_loss_{kind}"] = r[f"heldout_loss_{kind}"]
    tb = str(run / "tensorboard")
    record_results(TrackingConfig(tensorboard=True, tensorboard_dir=tb), str(run), step, scalars)


def heldout_losses(weights: list[str], folder: Path, seed: int) -> list[float]:
    """Mean masked-patch loss of each model on the held-out images, same masks."""
    from train.eval.reconstruct import load_images, reconstruct
    from train.weights.pretrained import load_pretrained

    models = [load_pretrained(w, seed=seed)[0] for w in weights]
    images, _ = load_images(str(folder), 10_000, models[0].cfg.img_size)
    return [float(reconstruct(m, images, 0.75, seed)["loss"].mean()) for m in models]


# --------------------------------------------------------------- the demo
def run_demo(cfg: DemoConfig) -> dict:
    torch.manual_seed(cfg.seed)
    claim_folder(cfg.workdir, ".mae-demo", "mae demo")  # it replaces its images/, run/ and finetune/ there
    t_start = time.monotonic()
    r = cfg.results
    say(cfg, f"== 1. real images -> {cfg.workdir / 'images'}")
    src = build_sources(cfg)
    with (_s3_store(cfg) if cfg.s3 else contextlib.nullcontext((str(cfg.workdir / "store"), {}))) as (store, env):
        os.environ.update(env)  # in-process commands read the bucket with the same credentials
        r["store"] = store
        say(cfg, f"== 2. shard into the object store {store}")
        urls = {name: f"{store}/{name}" for name in ("pretrain", "probe-train", "probe-val")}
        for name, url in urls.items():
            mae(cfg, "shard", str(src[name]), url, "--shard-size", "1MB", "--workers", "2")
        say(cfg, "== 3. pretrain through the DeepSpeed trainer (ZeRO-2 on CPU), Prometheus endpoint up")
        r["pretrain"] = pretrain(cfg, urls["pretrain"], env)
        run = cfg.workdir / "run"
        say(cfg, "== 4. export, reconstructions, loss curve")
        mae(cfg, "export", str(run), str(cfg.workdir / "export"))
        recon = cfg.workdir / "reconstructions.png"
        step = str(r["pretrain"]["step"])
        mae(cfg, "reconstruct", str(cfg.workdir / "export"), str(src["heldout"]), "--num", "8", "--out", str(recon),
            "--seed", str(cfg.seed), "--tensorboard", str(run / "tensorboard"), "--step", step)
        r["loss_first"], r["loss_last"] = run_figures(run / "metrics.jsonl", cfg.workdir)
        r["heldout_loss_random"], r["heldout_loss_pretrained"] = heldout_losses(
            [f"random:{MODEL}", str(cfg.workdir / "export")], src["heldout"], cfg.seed)
        say(cfg, "== 5. linear probe + kNN on the digits: pretrained vs random init")
        from train.eval.probe import probe

        r["probe"] = {}
        for name, weights in (("pretrained", str(cfg.workdir / "export" / "encoder.safetensors")),
                              ("random", f"random:{MODEL}")):
            say(cfg, f"$ mae probe {weights} --train {urls['probe-train']} --val {urls['probe-val']} --pool avg")
            r["probe"][name] = probe(weights, urls["probe-train"], urls["probe-val"], pool="avg",
                                     epochs=cfg.probe_epochs, seed=cfg.seed)
        record_evaluation(run, r["pretrain"]["step"], r)
        say(cfg, "== 6. fine-tune on the digits: pretrained vs random init, and the paper's linear probe")
        r["finetune"] = finetune_digits(cfg, urls, cfg.workdir / "export" / "encoder.safetensors")
        for k in env:
            os.environ.pop(k, None)
    r["files"] = {"reconstructions": str(recon), "loss_curve": str(cfg.workdir / "loss_curve.png"),
                  "throughput": str(cfg.workdir / "throughput.png"), "tensorboard": str(run / "tensorboard"),
                  "checkpoints": str(run), "export": str(cfg.workdir / "export"),
                  "pretrain_log": str(cfg.workdir / "pretrain.log")}
    r["wall_s"] = time.monotonic() - t_start
    (cfg.workdir / "demo_summary.json").write_text(json.dumps(r, indent=1, default=str))
    return r


# The recipe's optimizer (AdamW, layer decay 0.75, warmup + cosine, drop path) on a 4-epoch
# budget, with the light augmentation such a budget can use: RandAugment, erasing, mixup and
# 8% crops regularize 50-100 ImageNet epochs and would leave a tiny 32 px model underfit here.
DEMO_FINETUNE = ("data.batch_size=32", "optim.lr=2e-3", "model.drop_path=0.05", "data.augment.scale=[0.5,1.0]",
                 "data.augment.rand_augment_layers=0", "data.augment.erase_prob=0", "mixup.prob=0",
                 "schedule.warmup_epochs=0.5", "eval.every_epochs=1000")
# The paper's linear probe: BatchNorm head on the frozen cls token, LARS at its absolute lr (0.1 x 16384 / 256).
DEMO_PROBE = ("model.head=bn_linear", "model.global_pool=false", "model.trainable_blocks=0", "model.drop_path=0",
              "optim.name=lars", "optim.lr=6.4", "optim.weight_decay=0", "optim.min_lr=0", "mixup.label_smoothing=0",
              "deepspeed.stage=0")


def ended(code: int) -> str:
    """How a training run with a non-zero exit ``code`` ended: a stop signal's code
    (128 + it: saved, not finished) or a failure."""
    if code - 128 in STOP_SIGNALS:
        return f"was stopped by {signal.Signals(code - 128).name} (exit {code})"
    return f"failed (exit {code})"


def finetune_digits(cfg: DemoConfig, urls: dict[str, str], encoder: Path) -> dict[str, dict]:
    """Short `mae finetune` runs on the digits, in this process: name -> run summary."""
    from train.finetune import main as finetune_main

    runs = {"pretrained": [f"model.weights={encoder}"], "random init": [],
            "linear probe": [f"model.weights={encoder}", *DEMO_PROBE]}
    if cfg.partial_blocks is not None:
        runs["partial"] = [f"model.weights={encoder}", f"model.trainable_blocks={cfg.partial_blocks}"]
    results = {}
    with _one_process_group():
        for name, extra in runs.items():
            out = cfg.workdir / "finetune" / name.replace(" ", "-")
            if out.exists():
                shutil.rmtree(out)
            argv = ["--config", "finetune_tiny_cpu", f"data.url={urls['probe-train']}", f"eval.url={urls['probe-val']}",
                    f"model.name={MODEL}", *DEMO_FINETUNE, f"schedule.epochs={cfg.finetune_epochs}", f"seed={cfg.seed}",
                    f"checkpoint.dir={out}", "checkpoint.enabled=false", "log.every_steps=1000", *extra]
            say(cfg, f"$ mae finetune {shlex.join(argv)}")
            code = finetune_main(argv)
            if code:
                raise DemoError(f"demo: fine-tuning ({name}) {ended(code)}")
            results[name] = json.loads((out / "run_summary.json").read_text())
    return results


@contextlib.contextmanager
def _one_process_group():
    """DeepSpeed in this process (one rank): afterwards the group is destroyed and the
    launcher variables it set are removed, so later subprocesses start their own."""
    before = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                              "MASTER_PORT")}
    try:
        yield
    finally:
        from train.engine import shutdown_distributed

        shutdown_distributed()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _s3_store(cfg: DemoConfig):
    from infra.testing.s3_server import SeaweedS3

    with SeaweedS3() as s3:
        s3.create_bucket("maescale-demo")
        say(cfg, f"   (SeaweedFS S3 server at {s3.endpoint_url}, bucket maescale-demo)")
        yield "s3://maescale-demo", s3.env()


def finetune_lines(runs: dict[str, dict]) -> list[str]:
    top1 = {name: run["evals"][-1]["top1"] for name, run in runs.items()}
    epochs = runs["pretrained"]["evals"][-1]["epoch"] + 1
    lines = [f"fine-tuning   digits top-1 {top1['pretrained']:.1%} pretrained vs {top1['random init']:.1%} random "
             f"init ({epochs} epochs)",
             f"LARS probe    digits top-1 {top1['linear probe']:.1%} (the paper's linear probe, same epochs)"]
    if "partial" in top1:
        lines.append(f"partial       digits top-1 {top1['partial']:.1%} (last blocks only)")
    return lines


def format_summary(r: dict) -> str:
    p = r["pretrain"]
    pre, rnd = r["probe"]["pretrained"], r["probe"]["random"]
    wait = p["data_wait_s"] / p["wall_s"] if p["wall_s"] else 0.0
    lines = [
        "== maescale demo: summary",
        f"pretraining   {p['step']} steps, {p['images']} images, {p['images_per_s']:.0f} images/s, "
        f"data wait {wait:.0%} of the run (Prometheus on :{p['prometheus']['port']})",
        f"loss          {r['loss_first']:.4f} -> {r['loss_last']:.4f} (training, per step)",
        f"held-out      masked-patch loss {r['heldout_loss_random']:.4f} (random init) -> "
        f"{r['heldout_loss_pretrained']:.4f} (pretrained)",
        f"linear probe  digits top-1 {pre['linear_top1']:.1%} pretrained vs {rnd['linear_top1']:.1%} random init",
        f"kNN (k={pre['k']})    digits top-1 {pre['knn_top1']:.1%} pretrained vs {rnd['knn_top1']:.1%} random init",
        *finetune_lines(r["finetune"]),
        f"pictures      {r['files']['reconstructions']}, {r['files']['loss_curve']}, {r['files']['throughput']}",
        f"tensorboard   tensorboard --logdir {r['files']['tensorboard']}",
        f"checkpoints   {r['files']['checkpoints']} (exported: {r['files']['export']})",
        f"total         {r['wall_s'] / 60:.1f} min",
    ]
    return "\n".join(lines)
