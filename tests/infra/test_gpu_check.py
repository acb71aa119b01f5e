import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path), "GPU_CHECK_STEPS": "2"}
    out = subprocess.run(["bash", str(ROOT / "infra" / "gpu_check.sh"), "--dry-run"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr
    summaries = re.findall(r"^SUMMARY (\S+) cpu: speedup ([\d.]+)x \(FLOP ratio ([\d.]+)x", out.stdout, re.M)
    assert [s[0] for s in summaries] == ["mae_vit_test_patch4", "mae_vit_tiny_patch16"]
    assert all(float(s[1]) > 0 and float(s[2]) > 2 for s in summaries)
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [
        "dali.json", "encoder_mae_vit_test_patch4_fp32.json", "encoder_mae_vit_tiny_patch16_fp32.json"]
    train = re.findall(r"^SUMMARY train ZeRO-(\d): ([\d.]+) img/s .* final loss ([\d.]+)", out.stdout, re.M)
    assert [t[0] for t in train] == ["2", "3"], out.stdout[-3000:]
    assert all(float(t[1]) > 0 and float(t[2]) > 0 for t in train)
    dali = re.findall(r"^SUMMARY dali cpu: (\d+) img/s, ([\d.]+) CPU cores per 1,000 img/s", out.stdout, re.M)
    assert len(dali) == 1 and int(dali[0][0]) > 0 and float(dali[0][1]) > 0, out.stdout[-3000:]
