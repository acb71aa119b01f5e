"""Figures of benchmark reports (the ``--json`` output of `mae bench ...`), for
docs/BENCHMARKS.md: each report kind is recognised by its keys and drawn with
labelled axes and units. Several encoder or trainer reports go into one figure.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from infra.files import read_regular
from train.errors import EvalInputError
from train.figures import new_figure, save

MAE_COLOR, BASE_COLOR, FLOP_COLOR = "tab:blue", "tab:gray", "tab:orange"
MAX_REPORT_BYTES = 64 * 2**20  # a report is kilobytes; a bigger file is something else


def report_kind(report: dict) -> str:
    if not isinstance(report, dict):
        raise EvalInputError("not a report of mae bench encoder/train/pipeline (not a JSON object)")
    if "measured_speedup" in report and "results" in report:
        return "encoder"
    if "engine_overhead" in report:
        return "train"
    if "decode" in report or "read" in report:
        return "pipeline"
    raise EvalInputError("not a report of mae bench encoder/train/pipeline (run it with --json)")


def load_reports(paths: list[str | Path]) -> dict[str, list[dict]]:
    """{kind: [reports]}; a file that is not a benchmark report is named."""
    kinds: dict[str, list[dict]] = {}
    for path in paths:
        try:
            lines = read_regular(path, MAX_REPORT_BYTES).decode().strip().splitlines()
        except (OSError, ValueError) as e:
            raise EvalInputError(f"{path}: not a JSON benchmark report ({e})") from None
        if not lines:
            raise EvalInputError(f"{path}: not a JSON benchmark report (it is empty)")
        try:
            report = json.loads(lines[-1])
        except ValueError as e:
            raise EvalInputError(f"{path}: not a JSON benchmark report ({e})") from None
        try:
            kinds.setdefault(report_kind(report), []).append(report)
        except EvalInputError as e:
            raise EvalInputError(f"{path}: {e}") from None
    return kinds


def encoder_figure(reports: list[dict]) -> Any:
    """Per configuration: step time of MAE vs the mask-token baseline, and the
    measured speedup beside the FLOP ratio."""
    labels = [_encoder_label(r) for r in reports]
    x = np.arange(len(reports))
    fig = new_figure(max(8.0, 2.2 * len(reports) + 2), 4.5)
    times, ratio = fig.subplots(1, 2)
    mae = [1e3 * r["results"]["mae"]["median_s"] for r in reports]
    base = [1e3 * r["results"]["mask_token_baseline"]["median_s"] for r in reports]
    times.bar(x - 0.2, mae, 0.4, color=MAE_COLOR, label="MAE (visible patches)")
    times.bar(x + 0.2, base, 0.4, color=BASE_COLOR, label="baseline (+ mask tokens)")
    times.set(ylabel="training step time (ms, median)", title="step time")
    ratio.bar(x - 0.2, [r["measured_speedup"] for r in reports], 0.4, color=MAE_COLOR, label="measured speedup")
    ratio.bar(x + 0.2, [r["flop_ratio"] for r in reports], 0.4, color=FLOP_COLOR, label="FLOP ratio")
    ratio.set(ylabel="baseline / MAE (x)", title="encoder speedup")
    for ax in (times, ratio):
        ax.set_xticks(x, labels, rotation=20, ha="right")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small", loc="upper left")
    return fig


def _encoder_label(r: dict) -> str:
    c = r["config"]
    model = c["model"].removeprefix("mae_vit_").replace("_patch", "/")
    scope = c.get("compile")  # "blocks", "model", or "" (True: a report from before scopes, the whole model)
    compiled = f" compiled ({'blocks' if scope == 'blocks' else 'whole'})" if scope else ""
    return f"{model} b{c['batch']} {c['dtype']}{compiled} ({r['device']})"


def pipeline_figure(reports: list[dict]) -> Any:
    """Decode contenders (img/s and CPU-ms per image) and/or read bandwidth (MiB/s)
    of one `mae bench pipeline` report."""
    r = reports[-1]
    parts = [p for p in ("decode", "read") if p in r]
    fig = new_figure(8.0, 3.2 * len(parts) + 0.8)
    axes = np.atleast_1d(fig.subplots(len(parts), 1))
    for ax, part in zip(axes, parts):
        if part == "decode":
            rows = {k: v for k, v in r["decode"].items() if isinstance(v, dict) and "images_per_s" in v}
            names = [k.replace("_", " ") for k in rows]
            y = np.arange(len(rows))
            ax.barh(y - 0.2, [v["images_per_s"] for v in rows.values()], 0.4, color=MAE_COLOR, label="images/s")
            cpu = ax.twiny()
            cpu.barh(y + 0.2, [v["cpu_ms_per_image"] for v in rows.values()], 0.4, color=FLOP_COLOR,
                     label="CPU ms per image")
            ax.set_yticks(y, names)
            ax.set_xlabel("decode + RandomResizedCrop + flip: images/s", color=MAE_COLOR)
            cpu.set_xlabel("CPU time per image (ms, all processes)", color=FLOP_COLOR)
        else:
            names = ["raw_cat", "raw_cat_to_disk", "reader"]
            ax.barh(np.arange(3), [r["read"][f"{n}_MiB_s"] for n in names], color=MAE_COLOR)
            ax.set_yticks(np.arange(3), [n.replace("_", " ") for n in names])
            ax.set_xlabel("shard read bandwidth (MiB/s)")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"mae bench pipeline: {r['images']} images, {r.get('cpus')} CPUs, device {r.get('device')}")
    return fig


def train_figure(reports: list[dict]) -> Any:
    """Images/s of a bare PyTorch loop vs the DeepSpeed engine, per configuration."""
    labels = [f"{r['model'].removeprefix('mae_vit_')} b{r['batch']} ZeRO-{r['stage']}" for r in reports]
    x = np.arange(len(reports))
    fig = new_figure(max(6.0, 1.8 * len(reports) + 2), 4.5)
    ax = fig.add_subplot()
    ax.bar(x - 0.2, [r["bare_pytorch"]["compute_images_per_s"] for r in reports], 0.4, color=BASE_COLOR,
           label="bare PyTorch loop")
    ax.bar(x + 0.2, [r["deepspeed_engine"]["compute_images_per_s"] for r in reports], 0.4, color=MAE_COLOR,
           label="DeepSpeed engine")
    for i, r in enumerate(reports):
        ax.annotate(f"{r['engine_overhead']:+.1%}", (x[i] + 0.2, r["deepspeed_engine"]["compute_images_per_s"]),
                    ha="center", va="bottom", fontsize="small")
    ax.set_xticks(x, labels, rotation=15, ha="right")
    ax.set(ylabel="images/s (compute, data wait excluded)", title="trainer overhead over a bare loop")
    ax.set_ylim(top=ax.get_ylim()[1] * 1.25)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left")
    return fig


FIGURES: dict[str, Callable[[list[dict]], Any]] = {
    "encoder": encoder_figure, "pipeline": pipeline_figure, "train": train_figure}


def plot_reports(paths: list[str | Path], out_dir: str | Path) -> list[Path]:
    """One PNG per report kind found: ``<out_dir>/bench_<kind>.png``. A report
    that has its kind's marker but not the fields its figure draws is named."""
    written = []
    for kind, reports in load_reports(paths).items():
        try:
            figure = FIGURES[kind](reports)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise EvalInputError(f"a report of mae bench {kind} lacks what its figure draws ({type(e).__name__}: {e}); make "
                                 f"it again with `mae bench {kind} --json`") from None
        written.append(save(figure, Path(out_dir) / f"bench_{kind}.png"))
    return written
