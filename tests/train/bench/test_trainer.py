import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_bench_train_report_is_consistent():
    out = subprocess.run([sys.executable, "-m", "train.cli", "bench", "train", "--model", "mae_vit_test_patch4",
                          "--img-size", "32", "--batch", "8", "--steps", "3", "--warmup", "1", "--rounds", "1",
                          "--images", "40", "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    b, e = r["bare_pytorch"], r["deepspeed_engine"]
    for x in (b, e):
        assert x["images_per_s"] > 0 and 0 <= x["data_wait_fraction"] < 1
        assert x["compute_images_per_s"] >= x["images_per_s"]
    assert r["engine_overhead"] == pytest.approx(1 - e["compute_images_per_s"] / b["compute_images_per_s"])
