"""The README's commands run as written: every ```bash and ```python block of
"On one machine" and "Benchmarks" is executed in order in a scratch directory; the
GPU-cluster commands (```console) cannot run here, so they are parsed: `mae`
command lines by the real CLI parser, `deepspeed ... train.pretrain` lines by the
real config loader. The configuration reference must match the dataclasses."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from train.cli import build_parser
from train.config import load_config, reference_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def commands(block: str) -> list[str]:
    """Shell commands of a block: comments dropped, backslash continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_runnable_blocks_run_as_written(tmp_path):
    for name in (".venv", "infra"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MAESCALE_CACHE": str(tmp_path / "cache")}
    sections = README.split("## On one machine", 1)[1].split("## Troubleshooting", 1)[0]
    ran = 0
    for lang, body in re.findall(r"```(bash|python)\n(.*?)```", sections, re.S):
        if lang == "python":
            todo = [[sys.executable, "-c", body.replace("    ...\n", "    pass\n")]]
        else:
            todo = [["bash", "-c", cmd] for cmd in commands(body)]
        for argv in todo:
            out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, f"README command failed: {argv[-1]}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
            ran += 1
    assert ran >= 15
    assert (tmp_path / "runs" / "reconstructions.png").exists() and (tmp_path / "export" / "tiny").is_dir()


def test_cluster_commands_parse():
    parser = build_parser()
    checked = 0
    for block in blocks("console"):
        for cmd in commands(block):
            argv = shlex.split(cmd, comments=True)
            if argv[0].endswith("bin/mae"):
                parser.parse_args(argv[1:])  # exits (fails the test) on a bad option
                checked += 1
            elif argv[0] == "deepspeed":
                rest = argv[argv.index("train.pretrain") + 1:]
                assert rest[0] == "--config"
                cfg = load_config(rest[1], rest[2:])
                assert cfg.data.backend == "dali" and cfg.metrics.enabled
                checked += 1
    assert checked >= 3


def test_configuration_reference_is_current():
    section = README.split("<!-- config-reference:start -->\n", 1)[1].split("\n<!-- config-reference:end -->", 1)[0]
    assert section.strip() == reference_table().strip(), "regenerate with train.config.reference_table()"
