import json
import subprocess
import sys
from pathlib import Path

import pytest

from infra.net import free_port
from train.config import load_config
from train.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

# Builds the real DeepSpeed engine for a tiny MAE in a fresh process (its own
# process group) and reports the dtype a Linear layer computes in during engine(...).
PROBE = """
import json, sys, torch
from train.config import load_config
from train.engine import build_engine, init_distributed
from model.registry import create_model
cfg = load_config("tiny_cpu", ["data.augment.img_size=32", "deepspeed.stage=2", *sys.argv[1:]])
init_distributed(cfg.deepspeed)
model = create_model(cfg.model.name, img_size=32)
engine = build_engine(cfg, model, 1e-3)
seen = []
engine.module.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(str(o.dtype)))
loss, _, _ = engine(torch.randn(2, 3, 32, 32), 0.75)
print(json.dumps({"linear_out": seen[0], "loss": str(loss.dtype), "master": str(next(model.parameters()).dtype),
                  "reduced_in": sorted(str(d) for d in engine.optimizer.ipg_buckets)}))
"""


@pytest.mark.parametrize("overrides, compute, reduced_in", [
    (["deepspeed.precision=bf16"], "torch.bfloat16", ["torch.float32"]),  # the paper's fp32 gradient all-reduce
    (["deepspeed.precision=bf16", "deepspeed.grad_reduce_dtype=bf16"], "torch.bfloat16",
     ["torch.bfloat16", "torch.float32"]),  # Linear/Conv weights in bf16, norms and tokens in fp32
    (["deepspeed.precision=fp32"], "torch.float32", ["torch.float32"])])
def test_the_engine_computes_and_reduces_in_the_configured_precision(overrides, compute, reduced_in):
    """The ZeRO-2 engine's dtypes: of a Linear layer's output in engine(...), of
    the master weights, and of the buckets its gradients are reduced in."""
    out = subprocess.run([sys.executable, "-c", PROBE, *overrides], capture_output=True, text=True, cwd=ROOT,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    dtypes = json.loads(out.stdout.strip().splitlines()[-1])
    assert dtypes["linear_out"] == compute  # DeepSpeed disables an outer autocast unless configured
    assert dtypes["master"] == "torch.float32"  # fp32 master weights either way
    assert dtypes["reduced_in"] == reduced_in


def test_a_bf16_reduction_needs_bf16_compute():
    from train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="deepspeed.grad_reduce_dtype bf16 needs deepspeed.precision=bf16"):
        load_config("tiny_cpu", ["deepspeed.precision=fp32", "deepspeed.grad_reduce_dtype=bf16"])
    with pytest.raises(ConfigError, match=r"deepspeed.raw sets torch_autocast, which deepspeed.precision \(with "
                                          r"deepspeed.grad_reduce_dtype\) decides"):
        load_config("tiny_cpu", ['deepspeed.raw={"torch_autocast": {"enabled": false}}'])


# Two ranks whose job ends as a run's does, collectives up to the end, run the way
# every training entry point runs its job. A probe registered before the group
# exists runs at exit, after ``run_job`` returned.
ENDS = """
import atexit, os, sys, torch
import torch.distributed as dist
sys.path.insert(0, os.getcwd())
from train.config import load_config
from train.engine import init_distributed
from train.pretrain import run_job
atexit.register(lambda: open(f"{sys.argv[1]}/rank{os.environ['RANK']}", "w").write(
    "group alive" if dist.is_initialized() else "group destroyed"))

def job():
    rank, _, world = init_distributed(load_config("tiny_cpu", []).deepspeed)
    x = torch.ones(1000)
    for _ in range(20):
        dist.all_reduce(x)
        dist.all_gather([torch.empty(1000) for _ in range(world)], x)
    if sys.argv[2] == "fails":
        from train.errors import ResumeError
        raise ResumeError("a typed error after the collectives")

sys.exit(run_job(job))
"""


@pytest.mark.parametrize("ending, code", [("ends well", 0), ("fails", 1)])
def test_a_job_destroys_its_gloo_process_group_however_it_ends(ending, code, tmp_path):
    """Without it gloo's threads outlive the interpreter and may abort the process
    (SIGABRT, "terminate called without an active exception"): 17 of 25 two-rank
    runs of plain torch.distributed did here (torch 2.13, gloo), and 0 of 20 that
    destroyed their group. The probe fails without the call every time. A typed
    error keeps its exit code (torchrun answers 1 for a failed rank)."""
    script = tmp_path / "ends.py"
    script.write_text(ENDS)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(script), str(tmp_path), ending.split()[0]], capture_output=True,
                         text=True, cwd=ROOT, timeout=180)
    assert out.returncode == code and "terminate called" not in out.stderr, out.stderr[-3000:]
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["group destroyed"] * 2
    if code:
        assert "a typed error after the collectives" in out.stderr and "exitcode  : 2" in out.stderr


def test_a_raw_key_deepspeed_never_reads_is_refused_and_the_keys_it_reads_pass():
    """DeepSpeed ignores a top-level key it does not know: a typo trained without it."""
    from train.engine import deepspeed_json, refuse_unread_raw_keys

    real = [f"deepspeed.raw.{key}" for key in (
        "flops_profiler.enabled=false", "comms_logger.enabled=false", "aio.block_size=1048576",
        "activation_checkpointing.partition_activations=false", "tensorboard.enabled=false",
        "checkpoint.tag_validation=Ignore", "memory_breakdown=false", "dump_state=false",
        "data_parallel_size=1", "sequence_parallel_size=1")]  # the last two: deepspeed.initialize reads them
    cfg = load_config("tiny_cpu", real)
    refuse_unread_raw_keys(deepspeed_json(cfg), cfg.deepspeed.raw)
    cfg = load_config("tiny_cpu", [*real, "deepspeed.raw.zero_optimisation.stage=1"])
    with pytest.raises(ConfigError, match=r"reads no key 'zero_optimisation' \(did you mean 'zero_optimization'\?\)"):
        refuse_unread_raw_keys(deepspeed_json(cfg), cfg.deepspeed.raw)
