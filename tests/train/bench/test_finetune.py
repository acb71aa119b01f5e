import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_bench_finetune_report_is_consistent():
    out = subprocess.run([sys.executable, "-m", "train.cli", "bench", "finetune", "--model", "mae_vit_test_patch4",
                          "--img-size", "32", "--batch", "8", "--classes", "10", "--steps", "2", "--warmup", "1",
                          "--rounds", "2", "--stage", "0", "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    b, e = r["bare_pytorch"], r["deepspeed_engine"]
    assert len(r["runs"]["bare_pytorch"]) == len(r["runs"]["deepspeed_engine"]) == 2
    for x in (b, e):
        assert x["step_s"] > 0 and x["images_per_s"] == pytest.approx(8 / x["step_s"])
    assert r["engine_overhead"] == pytest.approx(e["step_s"] / b["step_s"] - 1)
