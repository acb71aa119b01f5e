"""The chaos soak, short: a tiny 2-rank run on S3 with 10% of object GETs failing,
SIGKILLed twice (once mid-run, once inside a checkpoint save) and relaunched; the
report must show no sample lost or duplicated, identical losses and weights, no
checkpoint lost — checked here again from the files the runs left. The long soak
is `make chaos` (docs/RELIABILITY.md)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from train.chaos import ChaosConfig, run_chaos

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_short_soak_loses_nothing_and_changes_nothing(tmp_path):
    cfg = ChaosConfig(workdir=str(tmp_path / "chaos"), kills=2, epochs=2, images=64, seed=1)
    report = run_chaos(cfg)
    assert report.ok, report.summary()
    assert report.kills == 2 and report.kills_in_save == 1 and report.launches == 3
    assert report.samples_lost == report.samples_duplicated == 0 and report.checkpoints_lost == []
    assert sum(report.faults.values()) > 0 and report.object_gets > 0
    assert all(step > 0 for step in report.resumed_from[1:])  # each relaunch resumed, none started over
    # the same verdict from the raw files: every step's loss, every replay, equal to the clean run's
    work = tmp_path / "chaos"
    lines = (work / "clean" / "metrics.jsonl").read_text().splitlines()
    clean = {json.loads(line)["step"]: json.loads(line)["loss"] for line in lines}
    chaos = [json.loads(line) for line in (work / "chaos" / "metrics.jsonl").read_text().splitlines()
             if line.endswith("}")]
    assert sorted(clean) == list(range(1, cfg.steps + 1))
    assert {r["step"] for r in chaos} == set(clean) and all(r["loss"] == clean[r["step"]] for r in chaos)
    replays = Counter(r["step"] for r in chaos)
    assert max(replays.values()) >= 2  # the kills did cost replayed steps
    saved = json.loads((work / "chaos_report.json").read_text())
    assert saved["ok"] is True and saved["kills"] == 2
