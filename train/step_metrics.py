"""What the trainer reports to the metrics sink each step, kept out of the loop."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from infra.metrics import NullSink, install, sink
from train.errors import ConfigError


class EncoderTimer:
    """Times the encoder forward (patch embedding to final norm) of each training
    step with hooks: CUDA events on a GPU, read one step late so the loop never
    waits on the device; wall time on CPU. A forward in eval mode is not timed."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._pending: list = []
        self._start = None
        self._handles = [model.patch_embed.register_forward_pre_hook(self._begin),
                         model.norm.register_forward_hook(self._end)]

    def _begin(self, module, args) -> None:
        if not module.training:  # the end-of-run loss on the fixed batch is not a step
            return
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def _end(self, module, args, output) -> None:
        if self._start is None:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._start, end))
        else:
            sink().observe("mae_encoder_forward_duration_seconds", time.perf_counter() - self._start)
        self._start = None

    def flush(self) -> None:
        """Report the CUDA timings that have completed."""
        keep = []
        for start, end in self._pending:
            if end.query():
                sink().observe("mae_encoder_forward_duration_seconds", start.elapsed_time(end) / 1e3)
            else:
                keep.append((start, end))
        self._pending = keep

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def record_memory(device: torch.device) -> None:
    if device.type == "cuda":
        sink().set("mae_device_memory_allocated_bytes", torch.cuda.memory_allocated(device))
        sink().set("mae_device_memory_reserved_bytes", torch.cuda.memory_reserved(device))
        sink().set("mae_device_memory_total_bytes", torch.cuda.get_device_properties(device).total_memory)
    with open("/proc/self/statm") as f:
        sink().set("mae_host_memory_rss_bytes", int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))


def local_world_size() -> int:
    """Ranks on this node, as the launcher says: torchrun and our Slurm environment
    set ``LOCAL_WORLD_SIZE``, the DeepSpeed launcher ``LOCAL_SIZE`` (read alone, a
    DeepSpeed node listed only local rank 0 for Prometheus to scrape)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)


def start_prometheus(m, rank: int, local_rank: int, world: int, backend: str, run_dir: str):
    """This rank's Prometheus endpoint (``MetricsConfig`` m), installed as the
    process's sink before any loader starts (its workers inherit it), with the
    run's world size set; None when off. The run folder's name (``run_dir``)
    labels the node's file-SD targets."""
    if not m.enabled:
        return None
    from infra.prometheus_sink import EndpointError, FolderInUse, PrometheusSink

    local_world = local_world_size()
    if m.port_base + local_world - 1 > 65535:
        raise ConfigError(f"metrics.port_base={m.port_base}: this node's {local_world} ranks serve on port_base + "
                          f"their local rank, up to {m.port_base + local_world - 1}, past the last port (65535)")
    try:
        prom = PrometheusSink(rank, local_rank, local_world, m.port_base, m.bind, m.multiproc_dir, backend=backend)
    except FolderInUse as e:
        raise ConfigError(str(e)) from None
    except EndpointError as e:
        raise ConfigError(f"{e}: check metrics.bind and metrics.port_base (each rank serves on port_base + its "
                          "local rank)") from None
    install(prom)
    if m.file_sd_dir and local_rank == 0:
        try:
            prom.write_file_sd(m.file_sd_dir, m.port_base, run=Path(run_dir).name)
        except OSError as e:  # a file in the way, no write access
            prom.close()
            raise ConfigError(f"metrics.file_sd_dir {m.file_sd_dir}: cannot write the target file there "
                              f"({e.strerror or e})") from None
    sink().set("mae_world_size", world)
    return prom


def stop_prometheus(prom, linger_s: float, stopped_by_signal: str | None) -> None:
    """Keep the endpoint up ``linger_s`` (a short run's last scrape), then close it.
    A run stopped by a signal does not linger: a preempted job's grace time is short."""
    if prom is None:
        return
    if linger_s > 0 and stopped_by_signal is None:
        time.sleep(linger_s)
    prom.close()
    install(NullSink())


class StepClock:
    """Images/s and the share of wall time spent waiting for data, per optimizer
    step (over all its micro-steps)."""

    def __init__(self) -> None:
        self._since = time.perf_counter()
        self._images, self._wait = 0, 0.0

    def micro_step(self, images: int, wait: float) -> None:
        self._images += images
        self._wait += wait

    def step(self) -> tuple[float, float]:
        """(images/s, data-wait fraction) since the last optimizer step."""
        now = time.perf_counter()
        elapsed = max(now - self._since, 1e-9)
        rates = (self._images / elapsed, min(self._wait / elapsed, 1.0))
        self._since, self._images, self._wait = now, 0, 0.0
        return rates


class GradNorm:
    """The global gradient norm of the last optimizer step, kept as a tensor (read
    later, off the step's path). ZeRO 1-3 compute it in their step; with stage 0
    DeepSpeed does not, so it is taken from the all-reduced gradients just before
    the step."""

    def __init__(self, engine, enabled: bool = True) -> None:
        self.engine, self.enabled = engine, enabled
        self.own = engine.zero_optimization_stage() == 0
        self.last: torch.Tensor | float | None = None

    def before_step(self, boundary: bool) -> None:
        if self.enabled and self.own and boundary:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            self.last = torch.nn.utils.get_total_norm(grads) if grads else None

    def after_step(self, boundary: bool) -> None:
        if self.enabled and not self.own and boundary:
            self.last = self.engine.get_global_grad_norm()
