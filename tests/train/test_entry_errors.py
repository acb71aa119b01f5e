"""A config error is the same one line and exit code through every entry: `mae
pretrain`, `python -m train.pretrain`, torchrun and the DeepSpeed launcher."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from infra.net import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
OUR_FRAME = re.compile(r'File ".*/(train|pipeline|model|infra)/[^"]+\.py"')


def _launch(kind: str, *args: str) -> list[str]:
    python = [sys.executable, "-m"]
    return {"mae": [*python, "train.cli", "pretrain"],
            "python": [*python, "train.pretrain"],
            "torchrun": [*python, "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
                         "-m", "train.pretrain"],
            "deepspeed": [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "1", "--master_port",
                          str(free_port()), "--module", "train.pretrain"]}[kind] + list(args)


@pytest.mark.parametrize("kind, override, message, code", [
    ("mae", "schedule.max_steps=-1", "ConfigError: schedule.max_steps must be positive, got -1", 2),
    ("python", "model.mask_ratio=0", "ConfigError: model.mask_ratio must be in (0, 1)", 2),
    ("torchrun", "log.every_steps=0", "ConfigError: log.every_steps must be positive, got 0", 1),
    ("deepspeed", "schedule.max_steps=0", "ConfigError: schedule.max_steps must be positive, got 0", 2),
])
def test_a_config_error_is_one_line_through_every_launcher(kind, override, message, code, tmp_path):
    # a dataset that does not exist: before the range checks these runs got past the config
    cmd = _launch(kind, "--config", "tiny_cpu", f"data.url={tmp_path / 'none'}", override)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    ours = [line for line in text.splitlines() if message in line]
    assert len(ours) == 1, text[-3000:]
    assert out.returncode == code  # torchrun reports any failed worker as 1
    assert not OUR_FRAME.search(text), text[-3000:]  # no traceback through our code (torchrun prints its own summary)


@pytest.mark.parametrize("override, message", [
    # a typo inside a raw section DeepSpeed validates: its pydantic error, named as the raw key's
    ("deepspeed.raw.zero_optimization.overlap_com=true",
     "ConfigError: deepspeed.raw: DeepSpeed refused the config it was merged into (ValidationError: "),
    # a typo at the top, where DeepSpeed looks keys up and ignores the rest: trained without clipping
    ("deepspeed.raw.gradient_clipings=1.0", "ConfigError: deepspeed.raw: DeepSpeed 0."),
])
def test_a_raw_deepspeed_key_deepspeed_refuses_or_ignores_is_one_line(override, message, shards, tmp_path):
    """Instead of a traceback per rank, or a run that silently lacks the key."""
    cmd = _launch("mae", "--config", "tiny_cpu", f"data.url={shards}", f"checkpoint.dir={tmp_path / 'ckpt'}", override)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    key = override.split("=")[0].rsplit(".", 1)[1]
    assert len(errors) == 1 and message in errors[0] and key in errors[0], out.stderr[-3000:]
    assert not OUR_FRAME.search(out.stderr) and "Traceback" not in out.stderr
    if key == "gradient_clipings":
        assert errors[0].endswith("reads no key 'gradient_clipings' (did you mean 'gradient_clipping'?); fix or "
                                  "remove it")


def test_a_data_error_after_start_up_is_one_line_too(tmp_path):
    cmd = _launch("python", "--config", "tiny_cpu", f"data.url={tmp_path / 'none'}", "deepspeed.stage=0",
                  f"checkpoint.dir={tmp_path / 'ckpt'}")
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert re.search(r"ERROR train.pretrain: ObjectMissing: manifest.json at .*/none: not found", out.stderr)
    assert not OUR_FRAME.search(out.stderr), out.stderr[-3000:]


def test_a_batch_the_data_cannot_fill_is_refused(shards, tmp_path):
    """96 samples, 2 ranks: a micro-batch of 1000 made 1-step epochs of 48-image
    batches trained with the lr of a 2,000-image global batch."""
    cmd = _launch("torchrun", "--config", "tiny_cpu", f"data.url={shards}", "data.batch_size=40", "optim.accum_steps=2",
                  f"checkpoint.dir={tmp_path / 'ckpt'}")
    cmd[cmd.index("--nproc_per_node") + 1] = "2"
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    message = ("ConfigError: data.batch_size 40 x optim.accum_steps 2 is more than the 48 samples an epoch gives "
               "each of the 2 ranks: lower data.batch_size")
    assert out.returncode != 0 and message in out.stderr, out.stderr[-3000:]
    assert not OUR_FRAME.search(out.stderr), out.stderr[-3000:]
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").glob("step*"))


LATE_SIGNAL = """
import os, signal, sys, time
from train.pretrain import run_job
def job():
    pass
def late(times):
    for _ in range(times):  # a scheduler's warning that lands while the ended job exits
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
import train.pretrain as pretrain
real = pretrain.shutdown_distributed
pretrain.shutdown_distributed = lambda **kw: (late(int(sys.argv[1])), real(**kw))
code = run_job(job)
print("restored" if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL else "kept")  # for a program that goes on
sys.exit(code)
"""


@pytest.mark.parametrize("signals, code", [(1, 0), (2, 143)])
def test_a_stop_signal_after_the_job_ended_keeps_its_exit_code(signals, code):
    """A SIGTERM during the teardown after the final save (summary written) killed the
    process with 143, which a scheduler counts as a failed job; now it is noted and
    the exit code stays the job's. A second one still ends the process at once."""
    out = subprocess.run([sys.executable, "-c", LATE_SIGNAL, str(signals)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == code, out.stderr[-2000:]
    assert "SIGTERM received while exiting: the job has already ended" in out.stderr
    assert out.stdout.strip() == ("restored" if code == 0 else "")


STUCK_IN_C = """
import ctypes
from train.signals import signals_noted
libc = ctypes.CDLL(None)
mutex = ctypes.create_string_buffer(64)  # a zeroed pthread_mutex_t: glibc's initializer
with signals_noted():
    libc.pthread_mutex_lock(mutex)
    print("stuck", flush=True)
    libc.pthread_mutex_lock(mutex)  # a teardown hung inside a C call: never returns, no Python handler runs
"""


def test_a_second_stop_signal_ends_a_teardown_stuck_in_c():
    """The first signal is noted even while the main thread is stuck inside a C call,
    and the second ends the process at once, as the default action would have."""
    proc = subprocess.Popen([sys.executable, "-c", STUCK_IN_C], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "stuck"
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1)  # noted, not fatal
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        proc.kill()
    assert "SIGTERM received while exiting: the job has already ended" in proc.stderr.read()


def test_an_entry_point_notes_a_stop_signal_until_the_process_ends():
    script = ("import os, signal, sys\nfrom train.signals import exiting_with\ncode = exiting_with(0)\n"
              "os.kill(os.getpid(), signal.SIGTERM)\nimport time; time.sleep(0.3)\nsys.exit(code)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "SIGTERM received while exiting" in out.stderr, out.stderr[-2000:]
