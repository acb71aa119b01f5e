"""The metrics sink: one small interface for pipeline and trainer code.

Library code calls ``sink().inc/set/observe`` with names from ``METRICS``; the
default sink does nothing, so nothing is measured unless a run installs a real
one (``infra.prometheus_sink.PrometheusSink``). ``METRICS`` is the single list of
every metric: its type, unit, help and labels — Prometheus registration and
docs/METRICS.md both come from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ("rank",)
    buckets: tuple[float, ...] = LATENCY_BUCKETS


METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec("mae_pipeline_images_decoded_total", "counter", "Images decoded and augmented by the data pipeline "
               "(all DataLoader workers)", ("rank", "backend")),
    MetricSpec("mae_pipeline_samples_skipped_total", "counter", "Corrupt samples skipped, by reason",
               ("rank", "backend", "reason")),
    MetricSpec("mae_pipeline_samples_converted_total", "counter", "Images converted to RGB (CMYK, grayscale, 16-bit; dali: non-JPEG re-encoded)",
               ("rank", "reason")),
    MetricSpec("mae_pipeline_rebuilds_total", "counter", "Decode pipelines rebuilt after a sample failed to decode "
               "(dali)", ("rank", "backend")),
    MetricSpec("mae_source_samples_total", "counter", "Samples delivered to training, by data source "
               "(data.sources; one source: the dataset)", ("rank", "source")),
    MetricSpec("mae_source_samples_skipped_total", "counter", "Corrupt samples skipped, by data source",
               ("rank", "source")),
    MetricSpec("mae_source_bytes_fetched_total", "counter", "Shard bytes fetched from storage, by data source",
               ("rank", "source")),
    MetricSpec("mae_shard_bytes_fetched_total", "counter", "Shard bytes fetched from storage into the local cache"),
    MetricSpec("mae_shard_fetch_retries_total", "counter", "Shard fetch attempts retried after a transient failure"),
    MetricSpec("mae_shard_fetch_errors_total", "counter", "Shard fetches failed for good"),
    MetricSpec("mae_shard_cache_hits_total", "counter", "Shard reads served by the local cache"),
    MetricSpec("mae_shard_cache_misses_total", "counter", "Shard reads that had to fetch"),
    MetricSpec("mae_trainer_images_total", "counter", "Images consumed by training steps on this rank"),
    MetricSpec("mae_step_duration_seconds", "histogram", "Wall time of one training micro-step, data wait included"),
    MetricSpec("mae_data_wait_seconds", "histogram", "Time a training micro-step waited for its batch"),
    MetricSpec("mae_encoder_forward_duration_seconds", "histogram", "Wall time of the encoder forward in a step"),
    MetricSpec("mae_checkpoint_save_duration_seconds", "histogram", "Wall time of one checkpoint save (all ranks)",
               buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)),
    MetricSpec("mae_checkpoint_verify_failures_total", "counter", "Checkpoints refused at resume: a file missing, "
               "truncated or altered against its sha256 record (resume fell back to an older one)"),
    MetricSpec("mae_checkpoint_resumed_step", "gauge", "Step of the checkpoint this run resumed from"),
    MetricSpec("mae_loss", "gauge", "Training loss of the last optimizer step (mean over ranks)"),
    MetricSpec("mae_learning_rate", "gauge", "Learning rate of the last optimizer step"),
    MetricSpec("mae_epoch", "gauge", "Current epoch"),
    MetricSpec("mae_step", "gauge", "Optimizer steps done"),
    MetricSpec("mae_nonfinite_steps_skipped_total", "counter", "Micro-steps whose update was skipped: a non-finite loss, "
               "or gradients DeepSpeed found overflowed"),
    MetricSpec("mae_device_memory_allocated_bytes", "gauge", "Accelerator memory allocated by tensors"),
    MetricSpec("mae_device_memory_reserved_bytes", "gauge", "Accelerator memory reserved by the caching allocator"),
    MetricSpec("mae_device_memory_total_bytes", "gauge", "Accelerator memory of the rank's device (its limit)"),
    MetricSpec("mae_host_memory_rss_bytes", "gauge", "Resident memory of the rank's main process"),
    MetricSpec("mae_world_size", "gauge", "Ranks of the run (alerts compare it with the ranks reporting)"),
    MetricSpec("mae_encoder_speedup_ratio", "gauge", "Measured step-time ratio: mask-token encoder baseline / MAE, "
               "on this run's model, micro-batch and device"),
    MetricSpec("mae_encoder_speedup_flop_ratio", "gauge", "Analytic FLOP ratio: mask-token encoder baseline / MAE"),
    MetricSpec("mae_eval_top1_ratio", "gauge", "Fine-tuning / probe: top-1 accuracy on the validation split, last "
               "evaluation"),
    MetricSpec("mae_eval_top5_ratio", "gauge", "Fine-tuning / probe: top-5 accuracy on the validation split, last "
               "evaluation"),
    MetricSpec("mae_eval_loss", "gauge", "Fine-tuning / probe: cross-entropy on the validation split, last evaluation"),
    MetricSpec("mae_eval_best_top1_ratio", "gauge", "Fine-tuning / probe: best validation top-1 so far (the best "
               "export)"),
)}


class MetricsSink(Protocol):
    def inc(self, name: str, value: float = 1.0, **labels: str) -> None: ...
    def set(self, name: str, value: float, **labels: str) -> None: ...
    def observe(self, name: str, value: float, **labels: str) -> None: ...
    def worker_init(self) -> None: ...


class NullSink:
    """Measures nothing; the default."""

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        pass

    def set(self, name: str, value: float, **labels: str) -> None:
        pass

    def observe(self, name: str, value: float, **labels: str) -> None:
        pass

    def worker_init(self) -> None:
        pass


_current: MetricsSink = NullSink()


def sink() -> MetricsSink:
    return _current


def install(new: MetricsSink) -> MetricsSink:
    """Make ``new`` the process's sink (DataLoader workers inherit it on fork)."""
    global _current
    previous, _current = _current, new
    return previous


def reference_table() -> str:
    rows = ["| metric | type | unit | labels | meaning |", "|---|---|---|---|---|"]
    for m in METRICS.values():
        unit = "seconds" if m.name.endswith("_seconds") else "bytes" if "_bytes" in m.name else \
            "ratio" if "ratio" in m.name else "1"
        rows.append(f"| `{m.name}` | {m.kind} | {unit} | {', '.join(m.labels)} | {m.help} |")
    return "\n".join(rows)
