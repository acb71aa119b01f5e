"""`mae bench metrics`: step time of the real trainer with the Prometheus exporter
on vs off, alternated in one process on the same data."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from train.config import load_config
from train.engine import free_port


def sink_cost_per_step(iterations: int = 20000) -> float:
    """Seconds the exporter adds to one micro-step: the trainer's per-micro-step
    sink calls (a counter, three histograms) and a worker's counter, timed in a loop."""
    import time

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    p.add_argument("--rounds", type=int, default=3, help="alternated off/on pairs")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pipeline.sample_photos import write_photo_folder
    from pipeline.writer import ShardWriterConfig, write_shards
    from train.pretrain import run as pretrain

    medians: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="mae-bench-metrics-") as tmp:
        root = Path(tmp)
        write_photo_folder(root / "src", args.images, size=(64, 48))
        write_shards(str(root / "src"), str(root / "shards"), ShardWriterConfig(shard_bytes=200_000))
        for r in range(args.rounds):
            for mode in ("off", "on"):
                run_dir = root / f"{mode}{r}"
                cfg = load_config("tiny_cpu", [
                    f"data.url={root / 'shards'}", "data.micro_batch=8", f"data.num_workers={args.workers}",
                    f"schedule.max_steps={args.steps}", "checkpoint.enabled=false", f"checkpoint.dir={run_dir}",
                    f"log.metrics_file={run_dir / 'steps.jsonl'}", "log.every_steps=100000",
                    f"metrics.enabled={str(mode == 'on').lower()}", f"metrics.port_base={free_port()}",
                    "metrics.measure_speedup=false"])
                pretrain(cfg)
                times = [json.loads(line)["step_time_s"] for line in open(run_dir / "steps.jsonl")]
                medians[mode].append(statistics.median(times[len(times) // 5:]))  # past the warm-up
    off, on = statistics.median(medians["off"]), statistics.median(medians["on"])
    cost = sink_cost_per_step()
    report = {"steps": args.steps, "rounds": args.rounds, "median_step_s": {"off": off, "on": on},
              "per_round": medians, "overhead": on / off - 1, "sink_cost_per_step_s": cost,
              "sink_cost_fraction": cost / off}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"mae bench metrics: tiny MAE @32px, micro-batch 8, {args.workers} worker(s), {args.rounds} x "
              f"(off, on) runs of {args.steps} steps")
        print(f"  median step time: metrics off {off * 1e3:.2f} ms, on {on * 1e3:.2f} ms -> overhead "
              f"{report['overhead']:+.1%}  (per-round medians off {[round(m * 1e3, 2) for m in medians['off']]}, "
              f"on {[round(m * 1e3, 2) for m in medians['on']]} ms)")
        print(f"  exporter cost per micro-step, timed in a loop: {cost * 1e6:.1f} us = "
              f"{report['sink_cost_fraction']:.2%} of this step (and less of any real GPU step)")
    return 0
