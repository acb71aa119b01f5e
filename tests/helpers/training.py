"""Launching the trainer in tests: the three entry points (torchrun, the DeepSpeed
launcher, `mae pretrain`), the tiny run's overrides, kills, and reading what a run
left behind (per-step metrics, per-sample ids, checkpoints)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from infra.net import free_port
from infra.testing.processes import abort_with_stacks, dumping_stacks, kill_tree
from train.chaos import micro_records, per_step, steps_done

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8


def overrides(shards: Path, run: Path, *extra: str) -> list[str]:
    """The tiny run: 96 photos, micro-batch 8, 8 steps, a checkpoint every 4."""
    return [f"data.url={shards}", "data.batch_size=8", "data.num_workers=1", f"schedule.max_steps={STEPS}",
            "optim.lr=1.0e-3", "schedule.warmup_epochs=0.5", f"checkpoint.dir={run / 'ckpt'}",
            f"log.metrics_file={run / 'metrics.jsonl'}", f"log.sample_ids_dir={run / 'ids'}",
            "checkpoint.every_steps=4", *extra]


def torchrun(shards: Path, run: Path, *extra: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), "-m", "train.pretrain", "--config", "tiny_cpu", *overrides(shards, run, *extra)]


def ds_launcher(shards: Path, run: Path, *extra: str) -> list[str]:
    """The DeepSpeed launcher, one CPU thread per rank as torchrun gives (it leaves
    the default; CPU kernels round differently with another thread count)."""
    deepspeed = Path(sys.executable).with_name("deepspeed")
    return ["env", "OMP_NUM_THREADS=1", str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()),
            "--module", "train.pretrain", "--config", "tiny_cpu", *overrides(shards, run, *extra)]


def mae_pretrain(shards: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train.cli", "pretrain", "--config", "tiny_cpu", *overrides(shards, run, *extra)]


def run_cmd(cmd: list[str], run: Path, timeout: float = 240, log: str = "log.txt") -> subprocess.CompletedProcess:
    """Run a job to its end. One still running after ``timeout`` fails the test with
    the stacks of every thread of every process it started (a hang is then named
    by its frames, not only by its last log line), and leaves nothing running."""
    run.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **dumping_stacks())
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        abort_with_stacks(proc.pid)
        stdout, stderr = proc.communicate(timeout=30)
        (run / log).write_text(stdout + stderr)
        raise AssertionError(f"still running after {timeout:.0f} s; every process's stacks:\n"
                             f"{stderr[-20000:]}") from None
    (run / log).write_text(stdout + stderr)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def start(cmd: list[str], run: Path, session: bool = False, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The job, running; with ``session``, in a process group of its own (a signal
    to ``-pid`` reaches the launcher and every rank, as Ctrl-C does); ``env`` added
    to the environment."""
    run.mkdir(parents=True, exist_ok=True)
    popen = dumping_stacks()
    popen["env"].update(env or {})
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=session, **popen)


def wait_for(condition, timeout: float = 180, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before the point was reached: {proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            if proc is None:
                raise AssertionError("timed out waiting for the run")
            abort_with_stacks(proc.pid)
            raise AssertionError("timed out waiting for the run; every process's stacks:\n"
                                 f"{proc.communicate(timeout=30)[0][-20000:]}")
        time.sleep(0.01)


def steps_logged(run: Path) -> int:
    return steps_done(run / "metrics.jsonl")


def saving(run: Path, step: int) -> bool:
    """A save of ``step`` is in progress: its folder has files, no COMPLETE yet."""
    tag = run / "ckpt" / f"step{step:09d}"
    return tag.is_dir() and any(tag.iterdir()) and not (tag / "COMPLETE").exists()


def kill_9(proc: subprocess.Popen) -> None:
    """kill -9 of the launcher and every rank (torchrun puts ranks in their own sessions)."""
    kill_tree(proc.pid)
    proc.wait()


def metrics(run: Path) -> dict[int, dict]:
    """Per step, the last record written (a resumed run rewrites the steps after its checkpoint)."""
    records = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by kill -9
        records[rec["step"]] = rec
    return records


def all_losses(run: Path) -> dict[int, list[float]]:
    """Every loss logged per step: a replayed step appears once per replay."""
    return per_step(run / "metrics.jsonl")


def summary(run: Path) -> dict:
    return json.loads((run / "ckpt" / "run_summary.json").read_text())


def sample_ids(run: Path) -> dict[tuple[int, int], list[dict]]:
    """(rank, micro-step) -> every record of the ids it read."""
    return micro_records(run / "ids")


def final_weights(run: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    from train.weights.consolidate import consolidate

    return consolidate(run / "ckpt", f"step{step:09d}")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == [], f"weights differ: {different[:5]}"


def copy_checkpoint(src: Path, dest: Path, step: int) -> Path:
    """A run folder whose checkpoint dir holds only ``src``'s checkpoint of ``step``."""
    ckpt = dest / "ckpt"
    ckpt.mkdir(parents=True)
    tag = f"step{step:09d}"
    shutil.copytree(src / "ckpt" / tag, ckpt / tag)
    (ckpt / "latest").write_text(tag)
    return dest


def reseal(tag_dir: Path, name: str) -> None:
    """Rewrite the COMPLETE record of ``name`` after the test changed it: a checkpoint
    that passes the integrity check but holds what the test put there."""
    record = json.loads((tag_dir / "COMPLETE").read_text())
    data = (tag_dir / name).read_bytes()
    record["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (tag_dir / "COMPLETE").write_text(json.dumps(record))


class Payload:
    """Unpickling this creates a folder: proof that code from a checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


def plant_pickle(tag_dir: Path, name: str, marker: Path) -> None:
    """Replace a checkpoint file by one that runs code when fully unpickled, and
    reseal the record, as an attacker with write access would."""
    torch.save({"module": {}, "payload": Payload(marker)}, tag_dir / name)
    reseal(tag_dir, name)


def poison_weight(tag_dir: Path, param: str, value: float) -> None:
    """Set the first element of ``param`` to ``value`` in a ZeRO-2 single-rank
    checkpoint (fp32 master partition and module), resealed: weights gone bad in
    training rather than on disk."""
    from train.checkpoint_io import load_plain

    optim_name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim = load_plain(tag_dir / optim_name)
    model = load_plain(tag_dir / "mp_rank_00_model_states.pt")
    state = optim["optimizer_state_dict"]
    with torch.no_grad():  # the saved tensors keep requires_grad
        for group, mapping in zip(state["single_partition_of_fp32_groups"], state["param_slice_mappings"]):
            if param in mapping:
                group[mapping[param].start] = value
        model["module"][param].view(-1)[0] = value
    torch.save(optim, tag_dir / optim_name)
    torch.save(model, tag_dir / "mp_rank_00_model_states.pt")
    reseal(tag_dir, optim_name)
    reseal(tag_dir, "mp_rank_00_model_states.pt")


def flip_bit(path: Path) -> None:
    """Flip one bit in the middle of a torch file: inside its tensor data, which is
    most of the file; the file still loads, with one value changed."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line or line.startswith("mae: error")]
