import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Builds the real DeepSpeed engine for a tiny MAE in a fresh process (its own
# process group) and reports the dtype a Linear layer computes in during engine(...).
PROBE = """
import json, sys, torch
from train.config import load_config
from train.engine import build_engine, init_distributed
from model.registry import create_model
cfg = load_config("tiny_cpu", ["data.augment.img_size=32", f"deepspeed.precision={sys.argv[1]}"])
init_distributed(cfg.deepspeed)
model = create_model(cfg.model.name, img_size=32)
engine = build_engine(cfg, model, 1e-3)
seen = []
engine.module.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(str(o.dtype)))
loss, _, _ = engine(torch.randn(2, 3, 32, 32), 0.75)
print(json.dumps({"linear_out": seen[0], "loss": str(loss.dtype), "master": str(next(model.parameters()).dtype)}))
"""


@pytest.mark.parametrize("precision, compute", [("bf16", "torch.bfloat16"), ("fp32", "torch.float32")])
def test_the_engine_computes_in_the_configured_precision(precision, compute):
    out = subprocess.run([sys.executable, "-c", PROBE, precision], capture_output=True, text=True, cwd=ROOT,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    dtypes = json.loads(out.stdout.strip().splitlines()[-1])
    assert dtypes["linear_out"] == compute  # DeepSpeed disables an outer autocast unless configured
    assert dtypes["master"] == "torch.float32"  # fp32 master weights either way
