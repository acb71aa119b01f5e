"""Figures drawn with matplotlib: what they plot is read back from the Figure (the
lines' and bars' data), the PNGs are real images of the stated size, and bad input
is one named error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from train.bench.plots import encoder_figure, load_reports, plot_reports
from train.errors import EvalInputError
from train.figures import loss_curve, loss_figure, read_metrics, throughput_curve, throughput_figure


def _records() -> list[dict]:
    """Steps 1-6, then a resume from step 4 rewrites 5-6 and goes on to 8."""
    first = [{"step": s, "loss": 2.0 / s, "lr": 1e-4 * s, "time": 1000.0 + 6 * s, "images_per_s": 100.0 + s,
              "data_wait_fraction": 0.1, "step_time_s": 0.5} for s in range(1, 7)]
    resumed = [{"step": s, "loss": 1.0 / s, "lr": 1e-4 * s, "time": 2000.0 + 6 * s, "images_per_s": 50.0,
                "data_wait_fraction": 0.5} for s in range(5, 9)]
    return first + resumed


def test_the_loss_curve_plots_each_steps_last_loss_with_the_lr_on_a_second_axis(tmp_path):
    fig = loss_figure(_records())
    ax, lr_ax = fig.axes
    steps, losses = ax.lines[0].get_data()
    assert list(steps) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert np.allclose(losses, [2.0, 1.0, 2 / 3, 0.5, 1 / 5, 1 / 6, 1 / 7, 1 / 8])  # the resumed run's 5 and 6
    assert np.allclose(lr_ax.lines[0].get_ydata(), [1e-4 * s for s in range(1, 9)])
    assert ax.get_xlabel() == "optimizer step" and lr_ax.get_ylabel() == "learning rate"
    assert ax.get_ylabel() == "loss (masked patches, norm-pix)"  # a pretraining file (step_time_s in its records)
    first, last = loss_curve(_records(), tmp_path / "loss.png")
    assert (first, last) == (2.0, 0.125)
    assert Image.open(tmp_path / "loss.png").size == (800, 450)


def test_a_fine_tuning_runs_evaluations_are_points_not_training_steps(tmp_path):
    """Each evaluation record (the validation loss, at the step of its epoch's end)
    replaced that step's training loss, and the lr axis went with it."""
    train = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3, "epoch": (s - 1) // 4, "ids": [s]} for s in range(1, 9)]
    evals = [{"eval": True, "step": s, "epoch": s // 4 - 1, "loss": 0.9 * s, "top1": 0.5, "top5": 0.9, "samples": 10,
              "best_top1": 0.5} for s in (4, 8)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train[:4] + evals[:1] + train[4:] + evals[1:]))
    fig = loss_figure(read_metrics(path))
    ax, lr_ax = fig.axes
    steps, losses = ax.lines[0].get_data()
    assert list(steps) == list(range(1, 9)) and np.allclose(losses, [3.0 - 0.1 * s for s in range(1, 9)])
    points = ax.lines[-1]
    assert points.get_label() == "validation loss" and list(points.get_xdata()) == [4, 8]
    assert np.allclose(points.get_ydata(), [3.6, 7.2]) and ax.get_ylabel() == "loss (cross-entropy)"
    assert np.allclose(lr_ax.lines[0].get_ydata(), [1e-3] * 8)
    assert loss_curve(read_metrics(path), tmp_path / "loss.png") == (2.9, pytest.approx(2.2))
    path.write_text("".join(json.dumps(r) + "\n" for r in evals))
    with pytest.raises(EvalInputError, match="evaluations only"):
        loss_figure(read_metrics(path))


def test_throughput_and_data_wait_over_wall_time(tmp_path):
    fig = throughput_figure(_records())
    rate_ax, wait_ax = fig.axes
    minutes, rates = rate_ax.lines[0].get_data()
    assert minutes[0] == 0 and minutes[-1] == pytest.approx((2048 - 1006) / 60)  # every record, the gap included
    assert list(rates[:2]) == [101.0, 102.0] and list(wait_ax.lines[0].get_ydata()[-1:]) == [50.0]
    assert "min" in wait_ax.get_xlabel() and "images/s" in rate_ax.get_ylabel() and "%" in wait_ax.get_ylabel()
    throughput_curve(_records(), tmp_path / "tp.png")
    assert Image.open(tmp_path / "tp.png").size == (800, 550)


def test_bad_metrics_files_are_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\nnot json\n')
    with pytest.raises(EvalInputError, match=r"metrics.jsonl:2 is not a metrics record"):
        read_metrics(path)
    # each was a traceback (OverflowError, RecursionError) or read as a step
    for bad in ('{"step": 1e400, "loss": 1}', '{"step": ' + str(10**400) + ', "loss": 1}', '[' * 100_000,
                '{"step": "1", "loss": 1}', '{"step": true, "loss": 1}', '{"step": 2, "loss": ' + str(10**400) + '}'):
        path.write_text('{"step": 1, "loss": 1.0}\n' + bad + "\n")
        with pytest.raises(EvalInputError, match=r"metrics.jsonl:2 is not a metrics record"):
            read_metrics(path)
    # fields the figures draw: a traceback from deep in matplotlib or numpy each
    for field, bad in (("images_per_s", "null"), ("lr", '"x"'), ("time", "1e300"), ("loss", "1e308")):
        path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 1.0, "' + field + '": ' + bad + "}\n")
        with pytest.raises(EvalInputError, match=rf"metrics.jsonl:2: {field} must be a number of at most"):
            read_metrics(path)
    # a run killed while writing its last record: plotted without it (its resume cuts it anyway)
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.9}\n')  # torn inside: refused
    with pytest.raises(EvalInputError, match=r"metrics.jsonl:2 is not a metrics record"):
        read_metrics(path)
    with pytest.raises(EvalInputError, match="cannot read"):
        read_metrics(tmp_path / "missing.jsonl")
    with pytest.raises(EvalInputError, match="no images_per_s"):
        throughput_figure([{"step": 1, "loss": 1.0}])


def test_encoder_reports_become_one_figure_of_step_times_and_speedups(tmp_path):
    from train.speedup import SpeedupConfig, measure_speedup

    reports = []
    for dtype in ("fp32", "bf16"):
        report = measure_speedup(SpeedupConfig(model="mae_vit_test_patch4", batch=2, steps=2, warmup=1, dtype=dtype,
                                               device="cpu"))
        (tmp_path / f"{dtype}.json").write_text(json.dumps(report))
        reports.append(report)
    times, ratio = encoder_figure(reports).axes
    mae_bars, base_bars = times.containers
    assert [b.get_height() for b in mae_bars] == pytest.approx([1e3 * r["results"]["mae"]["median_s"] for r in reports])
    assert [b.get_height() for b in base_bars] == pytest.approx(
        [1e3 * r["results"]["mask_token_baseline"]["median_s"] for r in reports])
    assert [b.get_height() for b in ratio.containers[0]] == pytest.approx([r["measured_speedup"] for r in reports])
    assert [b.get_height() for b in ratio.containers[1]] == pytest.approx([r["flop_ratio"] for r in reports])
    assert [t.get_text() for t in times.get_xticklabels()] == ["test/4 b2 fp32 (cpu)", "test/4 b2 bf16 (cpu)"]
    written = plot_reports([tmp_path / "fp32.json", tmp_path / "bf16.json"], tmp_path / "figures")
    assert written == [tmp_path / "figures" / "bench_encoder.png"] and Image.open(written[0]).size[1] == 450


def test_a_file_that_is_not_a_benchmark_report_is_named(tmp_path):
    (tmp_path / "other.json").write_text('{"hello": 1}')
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(EvalInputError, match="other.json: not a report of mae bench"):
        load_reports([tmp_path / "other.json"])
    with pytest.raises(EvalInputError, match="broken.json: not a JSON benchmark report"):
        load_reports([tmp_path / "broken.json"])
    (tmp_path / "nan.json").write_text("NaN")  # a TypeError from the kind check
    with pytest.raises(EvalInputError, match=r"nan.json: not a report of mae bench .*\(not a JSON object\)"):
        load_reports([tmp_path / "nan.json"])
    (tmp_path / "partial.json").write_text('{"measured_speedup": 2.0, "results": {}}')  # the marker, no fields
    with pytest.raises(EvalInputError, match="a report of mae bench encoder lacks what its figure draws"):
        plot_reports([tmp_path / "partial.json"], tmp_path / "out")
