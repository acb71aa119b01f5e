"""Figures of a training run, drawn with matplotlib (headless: a ``Figure`` saved
through the Agg canvas, no display and no pyplot state).

The input is the run's ``log.metrics_file`` (JSON lines, one per optimizer step; a
resumed run appends, and rewrites the steps after its checkpoint): the loss per step
with the learning rate on a second axis, and images/s and the data-wait share over
wall time. Benchmark figures (``train/bench/plots.py``) use the same ``new_figure``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from infra.files import atomic_path, read_regular
from train.errors import EvalInputError

log = logging.getLogger(__name__)

LOSS_COLOR, LR_COLOR, RATE_COLOR, WAIT_COLOR = "tab:blue", "tab:orange", "tab:green", "tab:red"
EVAL_COLOR = "tab:purple"


def new_figure(width: float = 8.0, height: float = 4.5) -> Any:
    """A matplotlib ``Figure`` (100 dpi) that needs no display."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("figures need matplotlib: pip install 'maescale[tracking]'") from e
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def save(fig: Any, out: str | Path) -> Path:
    return write_image(out, lambda tmp: fig.savefig(tmp, format="png"))


def write_image(out: str | Path, write: Callable[[Path], None]) -> Path:
    """A PNG written whole or not at all (``write`` gets a temporary path beside
    ``out``); an error names ``out`` (a full disk said only "No space left")."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            write(tmp)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {out}: {e.strerror or e}") from None
    return out


# fields the figures draw: a number each where present (NaN and inf included, but a
# finite time stamp), within what a run writes (a time stamp of 1e300 broke the
# axis arithmetic)
PLOTTED_FIELDS = {"lr": 1e6, "time": 2.0**40, "images_per_s": 1e12, "data_wait_fraction": 1e6, "loss": 1e30}


def read_metrics(path: str | Path) -> list[dict]:
    """Every record of a metrics file, in the order written; a bad line is an
    ``EvalInputError`` naming it. A torn last line (a run killed while writing it,
    which its resume cuts) is left out with a warning."""
    records = []
    try:
        text = read_regular(path).decode()
    except OSError as e:
        raise EvalInputError(f"cannot read the metrics file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise EvalInputError(f"{path} is not a metrics file (JSON lines): it is not UTF-8 text") from None
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            step, loss = record["step"], record["loss"]
            if type(step) is not int or not 0 <= step < 2**53 or isinstance(loss, bool):
                raise ValueError  # "1", true, 10**400: no step a run writes
            float(loss)
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
            if n == len(lines) and not text.endswith("\n") and records:
                log.warning("%s:%d is a torn record (the run stopped while writing it): left out", path, n)
                break
            raise EvalInputError(f"{path}:{n} is not a metrics record (JSON with a whole step and a loss)") from None
        for name, limit in PLOTTED_FIELDS.items():
            value = record.get(name, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    abs(value) > limit and (math.isfinite(value) or name == "time")):
                raise EvalInputError(f"{path}:{n}: {name} must be a number of at most {limit:g}, got "
                                     f"{str(value)[:40]!r}")
        records.append(record)
    if not records:
        raise EvalInputError(f"{path} holds no steps")
    return records


def by_step(records: list[dict], evals: bool = False) -> list[dict]:
    """The last training record of each step, in step order (a resumed run's steps
    win); with ``evals``, the last evaluation record of each step (fine-tuning
    writes one per evaluation, ``"eval": true``, its loss the validation loss)."""
    last = {int(r["step"]): r for r in records if bool(r.get("eval")) == evals}
    if not evals and not last:
        raise EvalInputError("the metrics file holds evaluations only, no training step")
    return [last[s] for s in sorted(last)]


def loss_curve(records: list[dict], out: str | Path, title: str = "training loss") -> tuple[float, float]:
    """``loss_figure`` as a PNG; returns the (first, last) loss."""
    save(loss_figure(records, title), out)
    steps_ = by_step(records)
    return float(steps_[0]["loss"]), float(steps_[-1]["loss"])


def loss_figure(records: list[dict], title: str = "training loss") -> Any:
    """Loss per step (raw, and smoothed when long) with the lr on a second axis; a
    fine-tuning run's validation loss as a point per evaluation."""
    steps_ = by_step(records)
    step = np.array([r["step"] for r in steps_], dtype=float)
    loss = np.array([r["loss"] for r in steps_], dtype=float)
    fig = new_figure()
    ax = fig.add_subplot()
    ax.plot(step, loss, color=LOSS_COLOR, alpha=0.3, linewidth=0.8, label="loss per step")
    window = max(1, len(loss) // 50)
    if window > 1:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(step[window - 1:], smooth, color=LOSS_COLOR, linewidth=2, label=f"mean of {window} steps")
    evals = by_step(records, evals=True)
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o", color=EVAL_COLOR, label="validation loss")
    pretraining = any("step_time_s" in r for r in steps_)  # every pretraining record has it, fine-tuning's none
    ax.set(xlabel="optimizer step", ylabel="loss (masked patches, norm-pix)" if pretraining else "loss (cross-entropy)",
           title=title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if all("lr" in r for r in steps_):
        lr_ax = ax.twinx()
        lr_ax.plot(step, [r["lr"] for r in steps_], color=LR_COLOR, linewidth=1.2, label="learning rate")
        lr_ax.set_ylabel("learning rate", color=LR_COLOR)
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        extra_h, extra_l = lr_ax.get_legend_handles_labels()
        handles, labels = handles + extra_h, labels + extra_l
    ax.legend(handles, labels, loc="upper right")
    return fig


def throughput_curve(records: list[dict], out: str | Path, title: str = "throughput and data wait") -> Path:
    return save(throughput_figure(records, title), out)


def throughput_figure(records: list[dict], title: str = "throughput and data wait") -> Any:
    """Images/s and the share of each step spent waiting for data, over wall time
    (every record as written: a requeued run shows its gap)."""
    timed = [r for r in records if "time" in r and "images_per_s" in r]
    if not timed:
        raise EvalInputError("the metrics file has no images_per_s/time fields (written by an older trainer)")
    t0 = min(r["time"] for r in timed)
    minutes = np.array([(r["time"] - t0) / 60 for r in timed])
    fig = new_figure(8.0, 5.5)
    rate_ax, wait_ax = fig.subplots(2, 1, sharex=True)
    rate_ax.plot(minutes, [r["images_per_s"] for r in timed], ".", color=RATE_COLOR, markersize=2)
    rate_ax.set(ylabel="images/s (all ranks)", title=title)
    rate_ax.set_ylim(bottom=0)
    wait_ax.plot(minutes, [100 * r["data_wait_fraction"] for r in timed], ".", color=WAIT_COLOR, markersize=2)
    wait_ax.set(xlabel="wall time since the first step (min)", ylabel="data wait (% of step)", ylim=(0, 100))
    for ax in (rate_ax, wait_ax):
        ax.grid(alpha=0.3)
    return fig
