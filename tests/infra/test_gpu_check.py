import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "gpu_check.sh"


def test_gpu_check_dry_run_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path / "out"),
           "GPU_CHECK_WHEELS": str(tmp_path / "no-wheels")}
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    digest = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    sections, again = out.stdout.split("gpu_check: the results again (each section's output is above)\n", 1)
    assert list(digest) == [
        "encoder_mae_vit_test_patch4_fp32", "encoder_mae_vit_tiny_patch16_fp32", "train_tiny_cpu_zero2",
        "train_tiny_cpu_zero3", "dali_decode", "e2e_dali", "encoder_mae_vit_test_patch4_fp32_compiled"]
    assert {r["status"] for r in digest.values()} == {"SUMMARY"}, digest
    enc = re.findall(r"^SUMMARY (\S+)( compiled)? cpu: speedup ([\d.]+)x \(FLOP ratio ([\d.]+)x", sections, re.M)
    assert [(e[0], e[1]) for e in enc] == [("mae_vit_test_patch4", ""), ("mae_vit_tiny_patch16", ""),
                                          ("mae_vit_test_patch4", " compiled")]
    assert all(float(e[2]) > 0 and float(e[3]) > 2 for e in enc)
    assert re.search(r"^SUMMARY mae_vit_test_patch4 compiled cpu: .*, first steps \(compiling each block stack\) MAE "
                     r"\d+ s, baseline \d+ s   \[", sections, re.M)
    # the eager sections say where each step's time went, op family by op family
    families = re.findall(r"^  (matmul|attention) +([\d.]+) +([\d.]+) +[\d.]+x +\S+ +\S+$", sections, re.M)
    assert [f[0] for f in families] == ["attention", "matmul"] * 2 and all(float(v) > 0 for f in families
                                                                          for v in f[1:])
    train = re.findall(r"^SUMMARY train tiny ZeRO-(\d): ([\d.]+) img/s .* final loss ([\d.]+)", sections, re.M)
    assert [t[0] for t in train] == ["2", "3"]
    assert all(float(t[1]) > 0 and 0 < float(t[2]) < 10 for t in train)
    assert train[0][2] == train[1][2]  # ZeRO-2 and -3 train the same model on the same batches
    dali = re.findall(r"^SUMMARY dali cpu: roi decode (\d+) img/s \((\d+) after the first batch\), ([\d.]+) CPU "
                      r"cores per 1,000 img/s, \w+ target; whole decode (\d+) img/s \((\d+) after the first batch\), "
                      r"([\d.]+) CPU cores per 1,000 img/s, \w+ target; DALI alone on inputs read beforehand (\d+) "
                      r"img/s \((\d+) after the first batch\), our host side alone (\d+) img/s; an epoch's first "
                      r"batch waits ([\d.]+) s started early, ([\d.]+) s late", sections, re.M)
    assert len(dali) == 1 and all(float(v) > 0 for v in dali[0][:9]) and all(float(v) >= 0 for v in dali[0][9:]), dali
    e2e = re.findall(r"^SUMMARY e2e tiny_cpu dali cpu: ([\d.]+) img/s steady, data wait ([\d.]+)%", sections, re.M)
    assert len(e2e) == 1 and float(e2e[0][0]) > 0 and 0 <= float(e2e[0][1]) < 100
    assert not list(Path("/tmp").glob(f"gpu-check-data-*/shards/{tmp_path.name}"))  # data dir removed
    # every verdict again at the end, where a device's last 12,000 characters of output still hold them
    said = re.findall(r"^(?:SUMMARY|SKIP|FAIL) .*$", sections, re.M)
    assert len(said) == len(digest) and again.splitlines()[:len(digest)] == said


def test_a_section_whose_modules_are_missing_is_skipped_by_name(tmp_path):
    from train.bench.gpu_check import DRY, Check, Section, importable

    assert importable("json") and not importable("maescale_no_such_module") and not importable("nvidia.no_such")
    check = Check(tmp_path, 100.0, DRY)
    check._run_section(Section("needs_more", [sys.executable, "-c", "raise SystemExit(3)"], str, min_s=1, cap_s=10,
                               needs=("json", "maescale_no_such_module")))
    assert check.results["needs_more"] == {"status": "SKIP", "why": "needs maescale_no_such_module, which this Python "
                                           "lacks (bring its wheel: infra/gpu_wheels.sh)"}
    shutil.rmtree(check.data)


def test_gpu_check_skips_what_no_longer_fits_the_budget(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path), "GPU_CHECK_BUDGET_S": "1",
           "GPU_CHECK_WHEELS": str(tmp_path / "no-wheels")}
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0
    assert len(re.findall(r"^SKIP \S+: \d+ s of the budget left, it needs about \d+ s", out.stdout, re.M)) == 2 * 7


def _wheel(path: Path, name: str, version: str, body: str, module: str | None = None) -> None:
    """A minimal, valid pure-Python wheel with one module (``module``: its path in the wheel)."""
    files = {module or f"{name}.py": body,
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{n},sha256={hashlib.sha256(c.encode()).hexdigest()},{len(c)}" for n, c in files.items()]
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(record + [f"{name}-{version}.dist-info/RECORD,,"]) + "\n"
    with zipfile.ZipFile(path, "w") as z:
        for n, c in files.items():
            z.writestr(n, c)


def _sum_beside(whl: Path, dest: Path) -> None:
    """``whl``'s .sha256 in ``dest``, as infra/gpu_wheels.sh writes it."""
    (dest / f"{whl.name}.sha256").write_text(f"{hashlib.sha256(whl.read_bytes()).hexdigest()}  {whl.name}\n")


def _wheels_only(wheels: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``gpu_check.sh --wheels-only`` on the wheels under ``wheels``."""
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WHEELS": str(wheels)}
    return subprocess.run(["bash", str(SCRIPT), "--wheels-only"], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _with_installed(out: subprocess.CompletedProcess, code: str) -> subprocess.CompletedProcess:
    """Python ``code`` run with the private folder the script installed into."""
    pythonpath = re.search(r"^wheels: PYTHONPATH=(\S+)", out.stdout, re.M).group(1)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": pythonpath})


def _split(whl: Path, dest: Path, parts: int) -> list[Path]:
    data = whl.read_bytes()
    _sum_beside(whl, dest)
    size = -(-len(data) // parts)
    out = []
    for i in range(parts):
        folder = dest / f"t{parts - i}"  # parts spread over folders, in reverse order
        folder.mkdir(parents=True, exist_ok=True)
        out.append(folder / f"{whl.name}.part-a{'abcdefgh'[i]}")
        out[-1].write_bytes(data[i * size:(i + 1) * size])
    whl.unlink()
    return out


def test_split_wheels_are_joined_verified_and_installed_privately(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    big = tmp_path / "gpucheckbig-1.0-py3-none-any.whl"
    _wheel(big, "gpucheckbig", "1.0", "VALUE = 'joined from parts'\n" + "# padding\n" * 5000)
    _split(big, wheels, 3)
    _wheel(wheels / "gpuchecksmall-2.0-py3-none-any.whl", "gpuchecksmall", "2.0", "VALUE = 2\n")
    out = _wheels_only(wheels)
    assert out.returncode == 0, out.stderr
    assert "FAIL" not in out.stdout, out.stdout
    check = _with_installed(out, "import gpucheckbig, gpuchecksmall; print(gpucheckbig.VALUE, gpuchecksmall.VALUE)")
    assert check.stdout.strip() == "joined from parts 2", check.stderr


def test_a_damaged_part_is_refused_by_its_sha256(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    big = tmp_path / "gpucheckbad-1.0-py3-none-any.whl"
    _wheel(big, "gpucheckbad", "1.0", "VALUE = 1\n" + "# padding\n" * 5000)
    part = _split(big, wheels, 2)[1]
    data = bytearray(part.read_bytes())
    data[10] ^= 0xFF
    part.write_bytes(bytes(data))
    out = _wheels_only(wheels)
    assert re.search(r"^FAIL wheels: gpucheckbad-1.0-py3-none-any.whl joined from its parts does not match its "
                     r"\.sha256", out.stdout, re.M), out.stdout
    assert "installing" not in out.stdout  # nothing left to install


def test_a_damaged_whole_wheel_is_refused_and_a_bad_one_keeps_no_other_out(tmp_path):
    """Whole wheels carry a .sha256 too (a small one damaged on the way was installed
    unchecked); a wheel pip cannot install no longer keeps the good ones out."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    damaged = wheels / "gpucheckdamaged-1.0-py3-none-any.whl"
    _wheel(damaged, "gpucheckdamaged", "1.0", "VALUE = 1\n")
    _sum_beside(damaged, wheels)
    data = bytearray(damaged.read_bytes())
    data[40] ^= 0xFF  # inside the first member's compressed bytes
    damaged.write_bytes(bytes(data))
    (wheels / "gpucheckbroken-1.0-py3-none-any.whl").write_bytes(b"not a zip file")  # no .sha256 came with it
    for part in ("a", "b"):  # two wheels under one top-level folder, as DALI, nvImageCodec and nvJPEG under nvidia/
        _wheel(wheels / f"gpuchecks{part}-3.0-py3-none-any.whl", f"gpuchecks{part}", "3.0", f"VALUE = '{part}'\n",
               module=f"gpucheckshared/{part}.py")
    out = _wheels_only(wheels, timeout=180)
    assert out.returncode == 0, out.stderr
    fails = re.findall(r"^FAIL wheels: (.*)$", out.stdout, re.M)
    assert fails == ["gpucheckdamaged-1.0-py3-none-any.whl does not match its .sha256 (damaged on the way?)",
                     "pip could not install gpucheckbroken-1.0-py3-none-any.whl"], out.stdout
    check = _with_installed(out, "from gpucheckshared import a, b; print(a.VALUE + b.VALUE)")
    assert check.stdout.strip() == "ab", check.stderr


def test_an_overrun_section_leaves_no_process_behind_and_says_where_it_hung(tmp_path):
    """A section's launcher killed with its group left the ranks it had started in
    sessions of their own running on the GPU under every later section."""
    from train.bench.gpu_check import run_bounded

    hang = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
            "open(sys.argv[1], 'w').write(str(child.pid))\n"
            "def stuck_here():\n    time.sleep(600)\n"
            "stuck_here()\n")
    pid_file, log = tmp_path / "child.pid", tmp_path / "section.log"
    with open(log, "w") as stderr:
        assert run_bounded([sys.executable, "-c", hang, str(pid_file)], subprocess.STDOUT, stderr, 3) == "timeout"
    child = int(pid_file.read_text())
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    assert "in stuck_here" in log.read_text()  # its stack, from faulthandler on SIGABRT
