"""Step time of the real trainer with the Prometheus exporter (and with
``tracking``, TensorBoard tracking) on vs off, alternated in one process on the same
data (`mae bench metrics`); plus what each costs the step, timed in a loop."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from infra.net import free_port
from infra.testing.photos import write_photo_folder
from pipeline.shards.writer import ShardWriterConfig, write_shards
from train.config import load_config
from train.pretrain import pretrain


def sink_cost_per_step(iterations: int = 20000) -> float:
    """Seconds the exporter adds to one micro-step: the trainer's per-micro-step
    sink calls (a counter, three histograms) and a worker's counter, timed in a loop."""
    from infra.prometheus_sink import PrometheusSink

    with tempfile.TemporaryDirectory(prefix="mae-sink-cost-") as tmp:
        prom = PrometheusSink(0, 0, 1, free_port(), multiproc_dir=tmp)
        try:
            t0 = time.perf_counter()
            for _ in range(iterations):
                prom.inc("mae_trainer_images_total", 8)
                prom.observe("mae_data_wait_seconds", 0.001)
                prom.observe("mae_step_duration_seconds", 0.02)
                prom.observe("mae_encoder_forward_duration_seconds", 0.005)
                prom.inc("mae_pipeline_images_decoded_total", 8, backend="cpu")
            return (time.perf_counter() - t0) / iterations
        finally:
            prom.close()


def tracker_cost_per_step(iterations: int = 20000) -> float:
    """Seconds one optimizer step's tracking call costs the training loop: the
    trainer's six scalars handed to the background TensorBoard writer."""
    from infra.tracking import TrackingConfig, open_tracker

    with tempfile.TemporaryDirectory(prefix="mae-tracker-cost-") as tmp:
        tracker = open_tracker(TrackingConfig(tensorboard=True, queue_size=iterations + 1), 0, tmp)
        try:
            t0 = time.perf_counter()
            for step in range(iterations):
                tracker.scalars(step, {"train/loss": 0.5, "train/lr": 1e-4, "train/images_per_s": 500.0,
                                       "train/data_wait_fraction": 0.1, "train/epoch": 1, "train/grad_norm": 0.8})
            return (time.perf_counter() - t0) / iterations
        finally:
            tracker.close()


def bench_metrics(steps: int = 150, rounds: int = 3, images: int = 256, workers: int = 1,
                  tracking: bool = False) -> dict[str, object]:
    """Median step time with the exporter (and ``tracking``: TensorBoard) off and on,
    ``rounds`` alternated pairs."""
    medians: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="mae-bench-metrics-") as tmp:
        root = Path(tmp)
        write_photo_folder(root / "src", images, size=(64, 48))
        write_shards(str(root / "src"), str(root / "shards"), ShardWriterConfig(shard_bytes=200_000))
        for r in range(rounds):
            for mode in ("off", "on"):
                run_dir = root / f"{mode}{r}"
                cfg = load_config("tiny_cpu", [
                    f"data.url={root / 'shards'}", "data.batch_size=8", f"data.num_workers={workers}",
                    f"schedule.max_steps={steps}", "checkpoint.enabled=false", f"checkpoint.dir={run_dir}",
                    f"log.metrics_file={run_dir / 'steps.jsonl'}", "log.every_steps=100000",
                    f"metrics.enabled={str(mode == 'on').lower()}", f"metrics.port_base={free_port()}",
                    "metrics.measure_speedup=false", f"log.tensorboard={str(tracking and mode == 'on').lower()}"])
                pretrain(cfg)
                times = [json.loads(line)["step_time_s"] for line in open(run_dir / "steps.jsonl")]
                medians[mode].append(statistics.median(times[len(times) // 5:]))  # past the warm-up
    off, on = statistics.median(medians["off"]), statistics.median(medians["on"])
    cost = sink_cost_per_step()
    report = {"steps": steps, "rounds": rounds, "median_step_s": {"off": off, "on": on},
              "per_round": medians, "overhead": on / off - 1, "sink_cost_per_step_s": cost,
              "sink_cost_fraction": cost / off, "tracking": tracking}
    if tracking:
        report["tracker_cost_per_step_s"] = tracker_cost_per_step()
        report["tracker_cost_fraction"] = report["tracker_cost_per_step_s"] / off
    return report
