"""The tracking interface: a background writer that never blocks the step, drops
the oldest records when it falls behind, switches a failing backend off; the real
TensorBoard backend read back with tensorboard's own reader."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from infra.tracking import BackgroundTracker, NullTracker, TensorBoardBackend, TrackingConfig, open_tracker


def events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


class Blocking:
    """A backend that holds the writer thread until released (a slow network)."""

    name = "blocking"

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.seen: list[tuple[int, dict]] = []

    def scalars(self, step, values):
        self.entered.set()
        assert self.release.wait(30)
        self.seen.append((step, values))

    def image(self, tag, step, image):
        pass

    def close(self):
        pass


def test_a_slow_backend_never_blocks_the_caller_and_the_oldest_records_go():
    backend = Blocking()
    tracker = BackgroundTracker([backend], queue_size=3)
    tracker.scalars(1, {"loss": 1.0})
    assert backend.entered.wait(10)  # the writer holds record 1
    t0 = time.perf_counter()
    for step in range(2, 8):  # 6 more into a queue of 3: steps 2, 3, 4 are dropped
        tracker.scalars(step, {"loss": float(step)})
    assert time.perf_counter() - t0 < 1.0  # returned while the backend was stuck
    assert tracker.dropped == 3
    backend.release.set()
    tracker.close()
    assert [s for s, _ in backend.seen] == [1, 5, 6, 7]
    assert backend.seen[-1][1] == {"loss": 7.0}


def test_a_failing_backend_is_switched_off_and_the_others_go_on(tmp_path, caplog):
    class Broken:
        name = "broken"

        def scalars(self, step, values):
            raise ConnectionError("tracking server unreachable")

        def image(self, tag, step, image):
            raise AssertionError("switched off before this")

        def close(self):
            pass

    tb = TensorBoardBackend(str(tmp_path / "tb"))
    tracker = BackgroundTracker([Broken(), tb])
    for step in (1, 2, 3):
        tracker.scalars(step, {"train/loss": 1.0 / step})
    tracker.image("eval/figure", 3, np.full((4, 6, 3), 200, np.uint8))
    tracker.close()
    assert "tracking to broken failed (ConnectionError: tracking server unreachable)" in caplog.text
    acc = events(tmp_path / "tb")
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, 0.333333)]
    image = acc.Images("eval/figure")[0]
    assert (image.step, image.width, image.height) == (3, 6, 4)


def test_tensors_are_read_on_the_writer_thread_and_none_is_skipped(tmp_path):
    import torch

    tracker = open_tracker(TrackingConfig(tensorboard=True, tensorboard_dir=str(tmp_path / "tb")), 0, str(tmp_path))
    tracker.scalars(1, {"train/grad_norm": torch.tensor(2.5), "train/lr": None, "train/loss": 0.25})
    tracker.close()
    acc = events(tmp_path / "tb")
    assert acc.Tags()["scalars"] == ["train/grad_norm", "train/loss"]
    assert acc.Scalars("train/grad_norm")[0].value == 2.5


def test_only_rank_0_tracks_and_nothing_when_off(tmp_path):
    on = TrackingConfig(tensorboard=True, tensorboard_dir=str(tmp_path / "tb"))
    assert isinstance(open_tracker(on, 1, str(tmp_path)), NullTracker)
    assert isinstance(open_tracker(TrackingConfig(), 0, str(tmp_path)), NullTracker)
    assert not (tmp_path / "tb").exists()


def test_a_resumed_run_hides_what_came_after_its_checkpoint(tmp_path):
    cfg = TrackingConfig(tensorboard=True)
    first = open_tracker(cfg, 0, str(tmp_path))
    for step in range(1, 9):
        first.scalars(step, {"train/loss": 10.0 + step})
    first.close()
    time.sleep(1.1)  # event file names carry the second they were made
    resumed = open_tracker(cfg, 0, str(tmp_path), start_step=5)  # the checkpoint was at step 5
    for step in range(6, 11):
        resumed.scalars(step, {"train/loss": 20.0 + step})
    resumed.close()
    values = [(e.step, e.value) for e in events(tmp_path / "tensorboard").Scalars("train/loss")]
    assert values == [(s, 10.0 + s) for s in range(1, 6)] + [(s, 20.0 + s) for s in range(6, 11)]


def test_bad_tracking_options_are_named():
    from infra.options import OptionError

    with pytest.raises(OptionError, match="wandb_mode"):
        TrackingConfig(wandb_mode="sometimes")
    with pytest.raises(OptionError, match="queue_size"):
        TrackingConfig(queue_size=0)


def test_the_run_config_checks_its_tracking_keys():
    from train.config import load_config
    from train.errors import ConfigError

    cfg = load_config("tiny_cpu", ["log.tensorboard=true", "log.wandb_mode=offline", "log.project=mae-l"])
    assert isinstance(cfg.log, TrackingConfig) and cfg.log.enabled() and cfg.log.project == "mae-l"
    with pytest.raises(ConfigError, match="log.wandb_mode must be one of online, offline"):
        load_config("tiny_cpu", ["log.wandb_mode=sometimes"])


def test_mlflow_continues_a_run_whose_folder_has_a_quote_and_names_a_store_it_cannot_open(tmp_path):
    """A run folder `bob's run` broke MLflow's filter ("Invalid clause(s)"), and a
    store MLflow cannot open was a 60-line traceback."""
    pytest.importorskip("mlflow")
    from infra.options import OptionError
    from infra.tracking import MlflowBackend

    cfg = TrackingConfig(mlflow=True, mlflow_uri=f"sqlite:///{tmp_path / 'ml.db'}")
    run_dir = str(tmp_path / "bob's run")
    first = MlflowBackend(cfg, run_dir, "bob", {"a": "1"})
    again = MlflowBackend(cfg, run_dir, "bob", {"a": "1"})  # the resumed attempt
    assert again.run_id == first.run_id
    (tmp_path / "a-file").write_text("in the way")
    with pytest.raises(OptionError, match="log.mlflow_uri MLflow could not open the run"):
        open_tracker(TrackingConfig(mlflow=True, mlflow_uri=f"sqlite:///{tmp_path / 'a-file' / 'ml.db'}"), 0,
                     str(tmp_path / "r"))
