"""Checkpoint files as plain data: hashed on the way out, a pickle refused on the way
in (DeepSpeed's own loads included), storage errors named."""

from __future__ import annotations

import errno
import hashlib
import os
import pickle

import pytest
import torch

from train.checkpoint_io import (RecordingCheckpointEngine, load_plain, plain_data_only, storage_problem,
                                 write_hashed)
from train.errors import UnsafeCheckpointError


class Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _payload_file(tmp_path) -> tuple:
    path, marker = tmp_path / "mp_rank_00_model_states.pt", tmp_path / "pwned"
    torch.save({"module": {"w": torch.zeros(2)}, "evil": Payload(str(marker))}, path)
    return path, marker


def test_a_pickle_payload_is_refused_by_name_and_never_runs(tmp_path):
    path, marker = _payload_file(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=f"refusing {path}: it is not plain tensor data"):
        load_plain(path)
    assert not marker.exists()


def test_deepspeed_style_full_unpickling_is_forced_to_plain_data(tmp_path):
    """DeepSpeed calls torch.load(weights_only=False); inside plain_data_only it is
    still refused, and the environment is restored after."""
    path, marker = _payload_file(tmp_path)
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    with plain_data_only(), pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=False)
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before


def test_plain_data_and_deepspeed_enums_load(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "ok.pt"
    torch.save({"w": torch.arange(3.0), "stage": ZeroStageEnum.gradients, "n": [1, "a"]}, path)
    loaded = load_plain(path)
    assert torch.equal(loaded["w"], torch.arange(3.0)) and loaded["stage"] == ZeroStageEnum.gradients


def test_write_hashed_records_what_reached_the_disk(tmp_path):
    rec = write_hashed(tmp_path / "x.pt", lambda f: torch.save({"w": torch.ones(100)}, f))
    data = (tmp_path / "x.pt").read_bytes()
    assert rec.bytes == len(data) and rec.sha256 == hashlib.sha256(data).hexdigest()


def test_storage_errors_say_what_happened_and_what_is_needed():
    assert storage_problem(OSError(errno.ENOSPC, "No space left on device")) == ("disk full", "free space")
    assert storage_problem(OSError(errno.EROFS, "Read-only file system"))[1] == "write access"
    assert storage_problem(FileNotFoundError(errno.ENOENT, "gone"))[0].startswith("vanished")


def test_the_recording_engine_keeps_a_failed_write_instead_of_raising(tmp_path):
    """A full disk inside DeepSpeed's save must not raise on one rank while the
    others wait at DeepSpeed's barrier: the error is kept for the agreement after."""
    engine = RecordingCheckpointEngine()
    engine.start(tmp_path)
    engine.save({"w": torch.ones(4)}, str(tmp_path / "a.pt"))
    engine.save({"w": torch.ones(4)}, str(tmp_path / "missing" / "b.pt"))  # its folder does not exist
    engine.save({"w": torch.ones(4)}, str(tmp_path / "c.pt"))  # after a failure: not attempted
    assert list(engine.written) == ["a.pt"]
    path, error = engine.failure
    assert path.name == "b.pt" and error.errno == errno.ENOENT and not (tmp_path / "c.pt").exists()
    engine.start(tmp_path)
    engine.save({"w": torch.ones(4)}, str(tmp_path.parent / "outside.pt"))
    assert engine.failure is not None and "outside.pt" in str(engine.failure[0])


def test_checking_only_the_pickle_refuses_a_payload_too(tmp_path):
    """mmap=True maps the tensor data and unpickles only the small pickle: the cheap
    check resume runs on every .pt file before DeepSpeed reads any."""
    path, marker = _payload_file(tmp_path)
    with pytest.raises(UnsafeCheckpointError):
        load_plain(path, mmap=True)
    assert not marker.exists()


def test_a_file_that_is_not_a_torch_file_is_an_integrity_error(tmp_path):
    from train.errors import CheckpointIntegrityError

    (tmp_path / "x.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointIntegrityError, match="cannot read"):
        load_plain(tmp_path / "x.pt")
