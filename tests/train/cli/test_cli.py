import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.shards import numbered_shards
from train.cli import COMMANDS, build_parser, command_module

ROOT = Path(__file__).resolve().parents[3]


def _mae(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_models_lists_official_parameter_counts():
    out = _mae("models", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert round(rows["mae_vit_base_patch16"]["trainable"] / 1e6, 2) == 111.66
    assert round(rows["mae_vit_large_patch16"]["trainable"] / 1e6, 2) == 329.24
    assert round(rows["mae_vit_huge_patch14"]["trainable"] / 1e6, 2) == 656.61
    assert rows["mae_vit_huge_patch14"]["patch_size"] == 14


def test_every_command_is_one_module_with_arguments_and_run():
    parser = build_parser()
    top = next(a for a in parser._actions if a.dest == "command").choices
    assert set(top) == {"shard", "index", "inspect", "pretrain", "finetune", "export", "convert", "reconstruct",
                        "probe", "plan", "simulate", "bench", "models", "demo", "chaos", "launch", "plot"}
    bench = next(a for a in top["bench"]._actions if a.dest == "bench").choices
    assert set(bench) == {"train", "finetune", "metrics", "encoder", "pipeline", "inputs", "ingest", "checkpoint",
                          "plan"}
    for path, _ in COMMANDS:
        module = command_module(path)
        assert module.__name__ == "train.cli." + "_".join(path)
        assert callable(module.add_arguments) and callable(module.run)


def test_console_script_is_installed():
    mae = Path(sys.executable).with_name("mae")
    if not mae.exists():
        pytest.skip("console script not installed in this environment")
    out = subprocess.run([str(mae), "models", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["name"] for line in out.stdout.splitlines()][:3] == [
        "mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"]


def test_a_typed_error_is_one_line_and_an_exit_code(tmp_path):
    out = _mae("inspect", str(tmp_path / "nothing-here"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("mae: error: manifest.json at ")
    assert "Traceback" not in out.stderr
    out = _mae("pretrain", "--config", "tiny_cpu", "deepspeed.stage=9")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "ConfigError: deepspeed.stage must be one of 0, 1, 2, 3; got 9" in out.stderr


def test_importing_the_packages_pulls_no_optional_heavy_library():
    code = ("import sys, model, pipeline, train, infra, train.cli; "
            "heavy = [m for m in ('deepspeed', 'nvidia.dali', 'ffcv', 's3fs', 'prometheus_client', 'tensorboard', "
            "'matplotlib', 'wandb', 'mlflow') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_help_and_the_dataset_commands_start_without_torch(tmp_path):
    """Only the command being run is imported: `mae --help`, `mae inspect` and
    `mae index` never load torch, nor the options of `mae plan` and `mae bench
    train`, which list the model names (`mae bench encoder`'s still do)."""
    numbered_shards(tmp_path / "ds", [3, 2])
    code = ("import contextlib, io, sys; from train.cli import main; out = io.StringIO()\n"
            "for argv in (['--help'], ['bench', '--help'], ['inspect', '--help'], ['inspect', sys.argv[1], '--verify'],"
            " ['index', sys.argv[1], '--out', sys.argv[2]], ['plan', '--help'], ['bench', 'train', '--help']):\n"
            "    with contextlib.redirect_stdout(out):\n"
            "        try: rc = main(argv)\n"
            "        except SystemExit as e: rc = e.code\n"
            "    print('ran', argv[0], rc, 'torch' in sys.modules, file=sys.stderr)\n"
            "print(out.getvalue())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ds"), str(tmp_path / "index")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    ran = [line.split()[1:] for line in out.stderr.splitlines() if line.startswith("ran ")]
    assert ran == [["--help", "0", "False"], ["bench", "0", "False"], ["inspect", "0", "False"],
                   ["inspect", "0", "False"], ["index", "0", "False"], ["plan", "0", "False"],
                   ["bench", "0", "False"]], out.stderr
    assert "{shard,index,inspect,pretrain," in out.stdout and "5 samples" in out.stdout, out.stdout
    assert (tmp_path / "index" / "manifest.json").exists()
    # the training commands still get every option, torch and all
    assert build_parser(["bench", "encoder"]).parse_args(["bench", "encoder", "--steps", "2"]).steps == 2
