"""Experiment tracking: the record of a run that people read afterwards.

``infra/metrics.py`` is the live side (Prometheus: rates, dashboards, alerts); this
is the other one: scalars per step and figures, to TensorBoard event files (the
standard ``SummaryWriter`` format) and, when their packages are installed, to
Weights & Biases and MLflow. One interface, ``Tracker``: ``scalars(step, values)``,
``image(tag, step, image)``, ``close()``.

Only rank 0 tracks (``open_tracker`` gives every other rank a ``NullTracker``).
Calls never wait on a disk or a network: they put the record on a bounded queue
that one background thread hands to the backends; values may be tensors (a GPU
tensor is read on that thread, so the step never synchronizes for it). When the
queue is full the oldest record is dropped and counted (``dropped``). A backend
that raises is switched off with one warning; training goes on.

A run that resumes keeps its record: TensorBoard purges the steps after the
checkpoint, W&B resumes the run with the id derived from the run directory, MLflow
continues the run tagged with that directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from infra.options import OptionError, option, require_choice, require_positive, require_text
from infra.redact import redact

log = logging.getLogger(__name__)
CLOSE_TIMEOUT_S = 120.0
FLUSH_S = 30  # TensorBoard files reach the disk at least this often (a live `tensorboard --logdir`)


@dataclass
class TrackingConfig:
    tensorboard: bool = option(False, "TensorBoard event files, rank 0 (tensorboard --logdir <tensorboard_dir>)")
    tensorboard_dir: str | None = option(None, "default: <checkpoint.dir>/tensorboard")
    wandb: bool = option(False, "also log to Weights & Biases (pip install 'maescale[wandb]')")
    wandb_mode: str = option("online", "online / offline (files in <checkpoint.dir>/wandb; `wandb sync` later)")
    mlflow: bool = option(False, "also log to MLflow (pip install 'maescale[mlflow]')")
    mlflow_uri: str | None = option(None, "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else MLflow's own)")
    project: str = option("maescale", "W&B project and MLflow experiment")
    run_name: str | None = option(None, "W&B/MLflow run name (default: the checkpoint dir's name)")
    queue_size: int = option(10000, "records waiting for the background writer; beyond it the oldest are dropped")

    def __post_init__(self) -> None:
        require_choice(self, "wandb_mode", ("online", "offline"))
        require_positive(self, "queue_size")
        require_text(self, "tensorboard_dir", "project", "run_name")

    def enabled(self) -> bool:
        return self.tensorboard or self.wandb or self.mlflow


class Tracker(Protocol):
    active: bool

    def scalars(self, step: int, values: Mapping[str, Any]) -> None: ...
    def image(self, tag: str, step: int, image: np.ndarray) -> None: ...
    def close(self) -> None: ...


class NullTracker:
    """Tracks nothing: other ranks, and runs with tracking off."""

    active = False

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        pass

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        pass

    def close(self) -> None:
        pass


class Backend(Protocol):
    name: str

    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def image(self, tag: str, step: int, image: np.ndarray) -> None: ...
    def close(self) -> None: ...


class BackgroundTracker:
    """The backends, fed by one background thread from a bounded queue."""

    active = True

    def __init__(self, backends: list[Backend], queue_size: int = 10000) -> None:
        self.backends = list(backends)
        self.dropped = 0
        self._queue: queue.Queue = queue.Queue(queue_size)
        self._thread = threading.Thread(target=self._work, name="mae-tracking", daemon=True)
        self._thread.start()

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        self._put(("scalars", step, dict(values)))

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        """``image``: (H, W, 3) uint8."""
        self._put(("image", step, (tag, image)))

    def _put(self, item: tuple) -> None:
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()  # the oldest record goes
                except queue.Empty:
                    continue
                self.dropped += 1
                if self.dropped == 1:
                    log.warning("tracking falls behind: dropping the oldest records (queue of %d)",
                                self._queue.maxsize)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            kind, step, payload = item
            if kind == "scalars":
                payload = {k: float(v) for k, v in payload.items() if v is not None}
            for backend in list(self.backends):
                try:
                    if kind == "scalars":
                        backend.scalars(step, payload)
                    else:
                        backend.image(payload[0], step, payload[1])
                except Exception as e:  # a tracker must never stop training
                    log.warning("tracking to %s failed (%s: %s); it is switched off for this run",
                                backend.name, type(e).__name__, e)
                    self.backends.remove(backend)

    def close(self) -> None:
        """Write what is queued (up to ``CLOSE_TIMEOUT_S``), then close the backends."""
        try:
            self._queue.put(None, timeout=CLOSE_TIMEOUT_S)
        except queue.Full:
            log.warning("tracking: the queue did not drain; the last records are lost")
        self._thread.join(CLOSE_TIMEOUT_S)
        for backend in self.backends:
            try:
                backend.close()
            except Exception as e:
                log.warning("closing %s failed (%s: %s)", backend.name, type(e).__name__, e)
        if self.dropped:
            log.warning("tracking dropped %d records it could not write in time", self.dropped)


def open_tracker(cfg: TrackingConfig, rank: int, run_dir: str, start_step: int = 0,
                 params: Mapping[str, str] | None = None) -> Tracker:
    """The run's tracker: backends on rank 0 as configured, else a ``NullTracker``.
    ``start_step``: the step a resumed run continues from; ``params``: the flat,
    redacted run config, recorded once per run."""
    if rank != 0 or not cfg.enabled():
        return NullTracker()
    run_dir = str(Path(run_dir).resolve())
    name = cfg.run_name or Path(run_dir).name
    backends: list[Backend] = []
    if cfg.tensorboard:
        log_dir = cfg.tensorboard_dir or os.path.join(run_dir, "tensorboard")
        try:
            backends.append(TensorBoardBackend(log_dir, start_step, params))
        except OSError as e:  # a file in the way, no write access
            raise OptionError("log.tensorboard_dir", f"{log_dir}: cannot write event files there "
                                                     f"({e.strerror or e})") from None
    if cfg.wandb:
        backends.append(WandbBackend(cfg, run_dir, name, params))
    if cfg.mlflow:
        try:
            backends.append(MlflowBackend(cfg, run_dir, name, params))
        except ImportError:
            raise
        except Exception as e:  # noqa: BLE001 - MLflow raises its own exceptions for an unusable store
            key = "log.mlflow_uri" if cfg.mlflow_uri else "log.mlflow"
            raise OptionError(key, f"MLflow could not open the run ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
                              ) from None
    return BackgroundTracker(backends, cfg.queue_size)


class TensorBoardBackend:
    name = "tensorboard"

    def __init__(self, log_dir: str, start_step: int = 0, params: Mapping[str, str] | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("log.tensorboard needs the tensorboard package: pip install 'maescale[tracking]'") from e
        # a resumed run hides what the interrupted one logged after its checkpoint
        self.writer = SummaryWriter(log_dir, purge_step=start_step + 1 if start_step else None,
                                    flush_secs=FLUSH_S)
        self.log_dir = log_dir
        if params and not start_step:
            self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in sorted(params.items())), 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


def run_id(run_dir: str) -> str:
    """A stable id of a run directory: every attempt of a resumed run logs to one run."""
    return hashlib.sha256(run_dir.encode()).hexdigest()[:16]


class WandbBackend:
    name = "wandb"

    def __init__(self, cfg: TrackingConfig, run_dir: str, name: str, params: Mapping[str, str] | None) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError("log.wandb needs the wandb package: pip install 'maescale[wandb]'") from e
        self._wandb = wandb
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        argv = sys.argv
        sys.argv = [redact(a) for a in argv]  # W&B records the command line, credentials in overrides included
        try:
            self.run = wandb.init(project=cfg.project, name=name, id=run_id(run_dir), resume="allow", dir=run_dir,
                                  mode=cfg.wandb_mode, config=dict(params or {}), settings=wandb.Settings(quiet=True))
        finally:
            sys.argv = argv

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        self.run.log({tag: self._wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowBackend:
    name = "mlflow"
    TAG = "maescale.run_dir"

    def __init__(self, cfg: TrackingConfig, run_dir: str, name: str, params: Mapping[str, str] | None) -> None:
        try:
            from mlflow import MlflowClient
        except ImportError as e:
            raise ImportError("log.mlflow needs MLflow: pip install 'maescale[mlflow]'") from e
        self.client = MlflowClient(tracking_uri=cfg.mlflow_uri) if cfg.mlflow_uri else MlflowClient()
        experiment = self.client.get_experiment_by_name(cfg.project)
        exp_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.project)
        quote = next((q for q in "'\"" if q not in run_dir), None)  # MLflow's filter has no escapes: "bob's run"
        found = self.client.search_runs([exp_id], filter_string=f"tags.`{self.TAG}` = {quote}{run_dir}{quote}",
                                        max_results=1) if quote else []
        if found:  # a resumed run continues its record
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(exp_id, run_name=name, tags={self.TAG: run_dir}).info.run_id
            self._params(params or {})

    def _params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        self.client.log_image(self.run_id, image, artifact_file=f"{tag}/step_{step:09d}.png")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def record_results(cfg: TrackingConfig, run_dir: str, step: int, scalars: Mapping[str, float],
                   images: Mapping[str, np.ndarray] | None = None) -> None:
    """Evaluation results (probe accuracies, a reconstruction figure) into a run's
    record at ``step``: opened, written and closed in one call."""
    tracker = open_tracker(cfg, 0, run_dir)
    try:
        tracker.scalars(step, scalars)
        for tag, image in (images or {}).items():
            tracker.image(tag, step, image)
    finally:
        tracker.close()
