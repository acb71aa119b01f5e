"""Runs of the tiny trainer shared by the training tests (each costs ~15 s of CPU):
the data, the 2-rank run of every ZeRO stage, the DALI-backend run and the
single-process run — uninterrupted references for the resume tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.testing.photos import write_photo_folder
from pipeline.shards.writer import ShardWriterConfig, write_shards
from tests.helpers.training import mae_pretrain, run_cmd, torchrun


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """96 real-photo crops (64x48) in small shards: 6 micro-batches of 8 per rank."""
    root = tmp_path_factory.mktemp("train-data")
    write_photo_folder(root / "src", 96, size=(64, 48), seed=3)
    write_shards(str(root / "src"), str(root / "shards"), ShardWriterConfig(shard_bytes=60_000))
    return root / "shards"


@pytest.fixture(scope="session")
def stage_runs(shards, tmp_path_factory) -> dict[int, Path]:
    runs = {}
    for stage in (0, 1, 2, 3):
        run = tmp_path_factory.mktemp(f"stage{stage}")
        out = run_cmd(torchrun(shards, run, f"deepspeed.stage={stage}"), run)
        assert out.returncode == 0, out.stderr[-4000:]
        runs[stage] = run
    return runs


@pytest.fixture(scope="session")
def dali_run(shards, tmp_path_factory) -> Path:
    """data.backend=dali (CPU mode) on two ranks, ZeRO-2."""
    run = tmp_path_factory.mktemp("dali")
    out = run_cmd(torchrun(shards, run, "deepspeed.stage=2", "data.backend=dali"), run)
    assert out.returncode == 0, out.stderr[-4000:]
    return run


@pytest.fixture(scope="session")
def single_run(shards, tmp_path_factory) -> Path:
    """`mae pretrain`: one process, ZeRO-2, the whole 8 steps."""
    run = tmp_path_factory.mktemp("single")
    out = run_cmd(mae_pretrain(shards, run), run)
    assert out.returncode == 0, out.stderr[-4000:]
    return run
