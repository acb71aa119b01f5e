import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mae(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_models_lists_official_parameter_counts():
    out = _mae("models")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:]}
    assert rows["mae_vit_base_patch16"][3] == "111.66M"
    assert rows["mae_vit_large_patch16"][3] == "329.24M"
    assert rows["mae_vit_huge_patch14"][3] == "656.61M"


def test_console_script_is_installed_and_lists_subcommands():
    mae = Path(sys.executable).with_name("mae")
    if not mae.exists():
        pytest.skip("console script not installed in this environment")
    out = subprocess.run([str(mae), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "bench" in out.stdout and "models" in out.stdout


def test_importing_the_packages_pulls_no_optional_heavy_library():
    code = ("import sys, model, pipeline, train, infra, train.cli; "
            "heavy = [m for m in ('deepspeed', 'nvidia.dali', 'ffcv', 's3fs', 'prometheus_client') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
