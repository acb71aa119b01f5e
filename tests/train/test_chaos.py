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


def test_the_soak_never_empties_a_folder_it_did_not_make(tmp_path, monkeypatch):
    # `mae chaos --workdir ''` (or `.`, `~`) emptied the current folder before the soak began
    from infra.files import ForeignFolderError
    from infra.options import OptionError
    from train.chaos import MARKER, fresh_workdir

    with pytest.raises(OptionError, match="workdir must not be empty"):
        ChaosConfig(workdir="")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "important.txt").write_text("precious")
    with pytest.raises(ForeignFolderError, match=f"is not empty and was not made by mae chaos \\(no {MARKER} in it\\)"):
        fresh_workdir(mine)
    assert (mine / "important.txt").read_text() == "precious"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ForeignFolderError, match="is a file"):
        fresh_workdir(tmp_path / "afile")
    made = fresh_workdir(tmp_path / "new" / "chaos")  # new: made, marked
    (made / "old-run.log").write_text("x")
    assert fresh_workdir(made) == made and sorted(p.name for p in made.iterdir()) == [MARKER]  # ours: emptied
    (tmp_path / "empty").mkdir()
    assert fresh_workdir(tmp_path / "empty").is_dir()


def test_a_soak_too_short_for_its_kills_is_refused_and_the_verdict_needs_real_resumes():
    from infra.options import OptionError
    from train.chaos import ChaosReport

    # 2 steps cannot hold 2 kills after checkpoints: the soak reported PASS without any resume
    with pytest.raises(OptionError, match=r"kills must be at most 0 for a run of 2 steps"):
        ChaosConfig(kills=2, epochs=1, images=32)
    with pytest.raises(OptionError, match=r"kills must be at most 0 for a run of 4 steps"):
        ChaosConfig(kills=5, epochs=1, images=64)
    assert ChaosConfig(kills=6, epochs=3).kills == 6 and ChaosConfig(kills=20, epochs=10).kills == 20
    good = dict(kills_asked=2, fault_rate=0.1, kills=2, launches=3, faults={"reset": 3}, resumed_from=[0, 2, 4],
                weights_identical=True)
    assert ChaosReport(**good).ok
    assert not ChaosReport(**{**good, "kills": 1, "launches": 2, "resumed_from": [0, 2]}).ok  # a kill never landed
    assert not ChaosReport(**{**good, "resumed_from": [0, 0, 0]}).ok  # no relaunch resumed from a checkpoint
    assert not ChaosReport(**{**good, "faults": {}}).ok  # "under S3 faults" with none injected
    mixed = ChaosReport(**{**good, "sample_mismatches": 3})
    assert not mixed.ok and "final weights        identical" in mixed.summary()
    assert "samples vs clean run differ at 3 micro-steps" in mixed.summary()


def test_only_the_current_launchs_progress_decides_where_it_is_killed(tmp_path):
    # a relaunch was killed ~8 ms after it started: the shared log already held an earlier launch's steps,
    # and an earlier launch's half-written save folder looked like this one's save
    import os
    import time

    from train.chaos import _saving, log_size, steps_done

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)))
    offset = log_size(metrics)
    assert steps_done(metrics) == 6 and steps_done(metrics, offset) == 0
    with open(metrics, "a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    assert steps_done(metrics, offset) == 3
    partial = tmp_path / "step000000004"
    partial.mkdir()
    (partial / "shard.pt").write_bytes(b"x")
    os.utime(partial, (time.time() - 60, time.time() - 60))
    assert not _saving(partial, since=time.time() - 1) and _saving(partial, since=time.time() - 120)


def test_an_interrupted_soak_leaves_no_launch_running(tmp_path):
    # Ctrl-C in mae chaos left torchrun and both ranks training: they run in their own session
    import os
    import sys

    from train.chaos import launched

    pids = []
    with pytest.raises(KeyboardInterrupt):
        with launched([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "launch.log") as proc:
            pids.append(proc.pid)
            raise KeyboardInterrupt
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)
