"""The one-shot GPU check that ``infra/gpu_check.sh`` runs after bringing its wheels.

Sections run one after another as subprocesses, most important first, each bounded
by its own cap and by what is left of the whole budget; a section that fails or
overruns prints FAIL, one that no longer fits prints SKIP, and the rest go on.
Each prints one SUMMARY line against its target; every JSON report, log and a
``gpu_check.json`` digest land in ``--out``. The photos and shards that the DALI
sections read are made in the background while the GPU runs the first sections.
``--dry-run`` runs the same sections with tiny models on the CPU (the CI test).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PY = sys.executable


@dataclass(frozen=True)
class Scale:
    """What one mode (GPU or CPU dry run) runs."""
    device: str
    dtype: str
    encoders: tuple[tuple[str, int], ...]  # (model, batch) for the encoder speedup
    encoder_steps: int
    trainers: tuple[tuple[str, str, tuple[str, ...]], ...]  # (label, preset, overrides)
    train_steps: int
    dali_images: int
    dali_args: tuple[str, ...]
    e2e: tuple[str, tuple[str, ...]]  # (preset, overrides) for the DALI end-to-end run
    e2e_steps: int
    compile_encoders: tuple[tuple[str, int], ...]
    step_ms: str  # the epochs part's simulated step: its consumer slower than DALI, so DALI can run ahead


GPU = Scale(
    device="cuda", dtype="bf16",
    encoders=(("mae_vit_large_patch16", 128), ("mae_vit_huge_patch14", 64)), encoder_steps=10,
    trainers=(("ViT-L", "vit_l", ("data.batch_size=64",)), ("ViT-H", "vit_h", ("data.batch_size=64",))),
    train_steps=30,
    dali_images=6000, dali_args=("--batch", "256", "--workers", "8", "--rounds", "2", "--device", "cuda"),
    e2e=("vit_l", ("data.batch_size=64", "data.num_workers=8")), e2e_steps=120,  # the ViT-L trainer's micro-batch
    compile_encoders=(("mae_vit_large_patch16", 128), ("mae_vit_huge_patch14", 64)),
    step_ms="200",  # 256 images: 1,280 img/s (the 2026-11-28 H200 decoded 1,710)
)
DRY = Scale(
    device="cpu", dtype="fp32",
    encoders=(("mae_vit_test_patch4", 8), ("mae_vit_tiny_patch16", 2)), encoder_steps=2,
    trainers=(("tiny", "tiny_cpu", ("data.augment.img_size=32", "data.batch_size=8")),),
    train_steps=6,
    dali_images=48, dali_args=("--batch", "16", "--workers", "2", "--rounds", "1", "--device", "cpu"),
    e2e=("tiny_cpu", ("data.augment.img_size=32", "data.batch_size=8", "data.num_workers=2")), e2e_steps=6,
    compile_encoders=(("mae_vit_test_patch4", 8),),
    step_ms="100",
)


@dataclass
class Section:
    name: str
    argv: list[str]
    summarize: Callable[[], str]  # reads the section's outputs -> the SUMMARY text
    min_s: float  # not started with less budget left than this
    cap_s: float  # killed after this long
    needs_data: bool = False
    json_stdout: bool = False  # stdout is the JSON report (<name>.json), else it joins the log
    needs: tuple[str, ...] = ()  # modules it imports beyond torch: skipped at once, named, when one is missing


TRAINER_NEEDS = ("deepspeed", "xxhash")
DALI_NEEDS = ("nvidia.dali", "xxhash", "simplejpeg")


class Check:
    def __init__(self, out: Path, budget_s: float, scale: Scale, only: tuple[str, ...] = ()) -> None:
        self.out, self.budget_s, self.scale, self.only = out, budget_s, scale, only
        self.t0 = time.monotonic()
        self.data = Path(tempfile.mkdtemp(prefix="gpu-check-data-"))  # photos and shards, removed at the end
        self.results: dict[str, dict[str, object]] = {}
        self.lines: list[str] = []  # every SUMMARY, SKIP and FAIL line, said again at the end

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    # ---- the sections
    def sections(self) -> list[Section]:
        s, dry = self.scale, self.scale is DRY
        steps = ["--steps", str(s.encoder_steps), "--warmup", "1" if dry else "3"]
        out = [self._encoder(m, b, steps, compiled=False, min_s=10 if dry else 25) for m, b in s.encoders]
        out += [self._trainer(label, preset, over, stage) for label, preset, over in s.trainers[:1] for stage in (2, 3)]
        out.append(Section("dali_decode", [
            PY, "-m", "train.cli", "bench", "pipeline", "--backend", "dali", "--parts", "decode,epochs", "--workdir",
            str(self.data), "--images", str(s.dali_images), *s.dali_args, "--epochs", "3", "--step-ms", s.step_ms,
            "--json"],
            self._dali_summary, min_s=20 if dry else 90, cap_s=300, needs_data=True, json_stdout=True,
            needs=DALI_NEEDS))
        out.append(self._e2e())
        out += [self._trainer(label, preset, over, stage) for label, preset, over in s.trainers[1:] for stage in (2, 3)]
        out += [self._encoder(m, b, steps, compiled=True, min_s=30 if dry else 90) for m, b in s.compile_encoders]
        return out

    def _encoder(self, model: str, batch: int, steps: list[str], compiled: bool, min_s: float) -> Section:
        name = f"encoder_{model}_{self.scale.dtype}{'_compiled' if compiled else ''}"
        argv = [PY, "-m", "train.cli", "bench", "encoder", "--model", model, "--batch", str(batch), "--dtype",
                self.scale.dtype, "--device", self.scale.device, *steps, "--json"] + (["--compile"] if compiled else
                                                                                      ["--breakdown"])

        def summarize() -> str:
            from train.speedup import format_report

            r = json.loads((self.out / f"{name}.json").read_text())
            print(format_report(r))
            mae = r["results"]["mae"]
            mfu = f"{mae['mfu']:.1%}" if mae["mfu"] is not None else "n/a (no known peak for this device)"
            verdict = "meets" if r["measured_speedup"] >= r["flop_ratio"] else "below"
            first = (f", first steps (compiling each block stack) MAE {mae['first_step_s']:.0f} s, baseline "
                     f"{r['results']['mask_token_baseline']['first_step_s']:.0f} s" if compiled else "")
            return (f"{model}{' compiled' if compiled else ''} {r['device']}: speedup {r['measured_speedup']:.2f}x "
                    f"(FLOP ratio {r['flop_ratio']:.2f}x, {verdict} target), MAE {mae['images_per_s']:.1f} img/s, "
                    f"MFU {mfu}{first}")

        return Section(name, argv, summarize, min_s=min_s, cap_s=max(min_s * 4, 90), json_stdout=True)

    def _launch(self, preset: str, overrides: tuple[str, ...], run: Path, steps: int) -> list[str]:
        """One process, no launcher (one GPU needs none; torchrun's start-up and its
        ranks' own sessions, which a kill of its group misses, are spared); a run
        stuck a minute without a step writes its stacks into the section's log."""
        return [PY, "-m", "train.pretrain", "--config", preset, *overrides,
                "optim.accum_steps=1", f"deepspeed.precision={self.scale.dtype}", f"schedule.max_steps={steps}",
                "schedule.warmup_epochs=0", "checkpoint.enabled=false", f"checkpoint.dir={run}",
                f"log.metrics_file={run}/metrics.jsonl", "log.every_steps=10", "metrics.measure_speedup=false",
                "log.stall_dump_s=60"]

    def _trainer(self, label: str, preset: str, overrides: tuple[str, ...], stage: int) -> Section:
        name = f"train_{preset}_zero{stage}"
        run = self.out / name
        argv = self._launch(preset, (*overrides, f"deepspeed.stage={stage}", "data.backend=synthetic"), run,
                            self.scale.train_steps)

        def summarize() -> str:
            s = steady(run)
            mfu = "n/a" if s["mfu"] is None else f"{s['mfu']:.1%}"
            peak = "n/a (CPU)" if not s["peak_memory_bytes"] else f"{s['peak_memory_bytes'] / 2**30:.1f} GiB"
            return (f"train {label} ZeRO-{stage}: {s['images_per_s']:.1f} img/s steady (median step of the last 2/3), "
                    f"MFU {mfu}, peak memory {peak}, final loss {s['final_loss']:.4f}")

        dry = self.scale is DRY
        return Section(name, argv, summarize, min_s=20 if dry else 45, cap_s=240, needs=TRAINER_NEEDS)

    def _e2e(self) -> Section:
        preset, overrides = self.scale.e2e
        run = self.out / "e2e_dali"
        argv = self._launch(preset, (*overrides, "data.backend=dali", f"data.url={self.data / 'shards'}",
                                     f"data.storage.cache_dir={self.data / 'cache'}", "deepspeed.stage=2"),
                            run, self.scale.e2e_steps)

        def summarize() -> str:
            s = steady(run)
            return (f"e2e {preset} dali {self.scale.device}: {s['images_per_s']:.1f} img/s steady, data wait "
                    f"{s['data_wait_share']:.2%} of step time (target < 1%), final loss {s['final_loss']:.4f}")

        return Section("e2e_dali", argv, summarize, min_s=30 if self.scale is DRY else 60, cap_s=300,
                       needs_data=True, needs=tuple(dict.fromkeys(TRAINER_NEEDS + DALI_NEEDS)))

    def _dali_summary(self) -> str:
        from train.bench.pipeline import format_report

        r = json.loads((self.out / "dali_decode.json").read_text())
        print(format_report(r))
        said = []
        for name, label in (("dali_backend", "roi decode"), ("dali_backend_whole", "whole decode")):
            d = r["decode"][name]
            cores = d["cpu_ms_per_image"]  # CPU-ms per image = CPU cores per 1,000 img/s
            # judged past the first batch: a pass of 6,000 images also holds the graph's ~1.7 s start
            ok = d["after_first_batch_images_per_s"] >= 5000 and cores < 2
            said.append(f"{label} {d['images_per_s']:.0f} img/s ({d['after_first_batch_images_per_s']:.0f} after the "
                        f"first batch), {cores:.2f} CPU cores per 1,000 img/s, {'meets' if ok else 'below'} target")
        alone, host = r["decode"]["dali_graph_only"], r["decode"]["dali_host_side"]
        said.append(f"DALI alone on inputs read beforehand {alone['images_per_s']:.0f} img/s "
                    f"({alone['after_first_batch_images_per_s']:.0f} after the first batch), our host side alone "
                    f"{host['images_per_s']:.0f} img/s")
        late, early = r["epochs"]["dali_late"], r["epochs"]["dali_early"]
        said.append(f"an epoch's first batch waits {early['boundary_wait_s']:.3f} s started early, "
                    f"{late['boundary_wait_s']:.3f} s late")
        return (f"dali {r['device']}: " + "; ".join(said) + " (>= 5,000 img/s after the first batch with < 2 cores "
                "per 1,000 img/s)")

    # ---- running
    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        print(f"gpu_check: budget {self.budget_s:.0f} s, device {self.scale.device}, reports in {self.out}", flush=True)
        prep = subprocess.Popen([PY, "-m", "train.bench.gpu_check", "--prepare-data", str(self.data),
                                 "--images", str(self.scale.dali_images)],
                                stdout=open(self.out / "prepare_data.log", "w"), stderr=subprocess.STDOUT)
        try:
            for sec in self.sections():
                if self.only and not any(sec.name.startswith(o) for o in self.only):
                    continue
                self._run_section(sec, prep)
        finally:
            if prep.poll() is None:
                prep.kill()
                prep.wait()
            shutil.rmtree(self.data, ignore_errors=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1))
        print("gpu_check: the results again (each section's output is above)\n" + "\n".join(self.lines), flush=True)
        failed = [n for n, r in self.results.items() if r["status"] == "FAIL"]
        print(f"gpu_check: {len(self.results) - len(failed)} of {len(self.results)} sections without failure "
              f"in {time.monotonic() - self.t0:.0f} s; reports in {self.out}", flush=True)
        return 1 if failed else 0

    def _wait_for_data(self, prep: subprocess.Popen, sec: Section) -> str | None:
        """Wait for the background photos/shards as long as the budget allows;
        the reason to skip ``sec`` if they are not there."""
        try:
            prep.wait(timeout=max(1.0, self.left() - sec.min_s))
        except subprocess.TimeoutExpired:
            return "the photos/shards were not ready within the budget"
        if prep.returncode != 0:
            return f"making the photos/shards failed (rc={prep.returncode}); see {self.out / 'prepare_data.log'}"
        return None

    def _skip(self, sec: Section, why: str) -> None:
        self.results[sec.name] = {"status": "SKIP", "why": why}
        self._say(f"SKIP {sec.name}: {why}")

    def _say(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)

    def _run_section(self, sec: Section, prep: subprocess.Popen | None = None) -> None:
        """Run ``sec`` unless a module it needs is missing, the budget left is short,
        or (once both hold) its photos/shards from ``prep`` do not come in time."""
        missing = [m for m in sec.needs if not importable(m)]
        if missing:
            self._skip(sec, f"needs {', '.join(missing)}, which this Python lacks (bring its wheel: "
                            "infra/gpu_wheels.sh)")
            return
        if sec.needs_data and self.left() >= sec.min_s:
            why = self._wait_for_data(prep, sec)
            if why:
                self._skip(sec, why)
                return
        left = self.left()
        if left < sec.min_s:
            self._skip(sec, f"{left:.0f} s of the budget left, it needs about {sec.min_s:.0f} s")
            return
        timeout = min(sec.cap_s, left)
        print(f"== {sec.name} (up to {timeout:.0f} s): {' '.join(sec.argv[1:])}", flush=True)
        t = time.monotonic()
        log = self.out / f"{sec.name}.log"
        with open(log, "w") as stderr, ExitStack() as stack:
            report = stack.enter_context(open(self.out / f"{sec.name}.json", "w")) if sec.json_stdout else None
            rc = run_bounded(sec.argv, report or subprocess.STDOUT, stderr, timeout)
        took = time.monotonic() - t
        if rc == 0:
            try:
                summary = sec.summarize()
            except Exception as e:  # a report we cannot read is a failed section, not a crashed check
                rc = f"unreadable report ({type(e).__name__}: {e})"
            else:
                self.results[sec.name] = {"status": "SUMMARY", "summary": summary, "seconds": round(took, 1)}
                self._say(f"SUMMARY {summary}   [{took:.0f} s]")
                return
        tail = log.read_text(errors="replace").splitlines()[-25:] if log.exists() else []
        print("\n".join(tail))
        self.results[sec.name] = {"status": "FAIL", "why": str(rc), "seconds": round(took, 1), "log_tail": tail}
        self._say(f"FAIL {sec.name}: {'exceeded ' + str(round(timeout)) + ' s' if rc == 'timeout' else rc} "
                  f"[{took:.0f} s]; log: {log}")


def importable(module: str) -> bool:
    """``module`` can be imported here (found, not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def run_bounded(argv: list[str], stdout, stderr, timeout: float) -> int | str:
    """Run ``argv``; on timeout every process it started gets SIGABRT (each writes
    its threads' stacks into the section's log), then SIGKILL, so none keeps
    holding the GPU; returns "timeout"."""
    from infra.testing.processes import abort_with_stacks, dumping_stacks

    if stdout is subprocess.STDOUT:
        stdout, stderr = stderr, subprocess.STDOUT
    proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, start_new_session=True, **dumping_stacks())
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        abort_with_stacks(proc.pid)
        proc.wait()
        return "timeout"


def steady(run: Path) -> dict[str, object]:
    """A trainer run's steady state from its per-step metrics (the last 2/3 of the
    steps: the first ones carry start-up) and its run summary."""
    summary = json.loads((run / "run_summary.json").read_text())
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tail = steps[len(steps) // 3:] or steps
    img_s = summary["derived"]["global_batch"] / statistics.median(s["step_time_s"] for s in tail)
    mfu = summary["mfu"] * img_s / summary["images_per_s"] if summary["mfu"] else None
    return {"images_per_s": img_s, "mfu": mfu, "peak_memory_bytes": summary["peak_memory_bytes"],
            "final_loss": summary["losses"][-1],
            "data_wait_share": sum(s["data_wait_s"] for s in tail) / sum(s["step_time_s"] for s in tail)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="train.bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    p.add_argument("--budget-s", type=float, default=480.0, help="the whole check's wall-clock budget")
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU (what CI runs)")
    p.add_argument("--only", default="", help="comma list of section name prefixes to run (default: all)")
    p.add_argument("--prepare-data", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.prepare_data:
        from train.bench.pipeline import prepare_decode_data

        prepare_decode_data(args.prepare_data, args.images)
        return 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: torch sees no CUDA GPU (use --dry-run on CPU)", file=sys.stderr)
            return 2
        print(f"torch {torch.__version__} cuda {torch.version.cuda} on {torch.cuda.get_device_name()}", flush=True)
    only = tuple(o for o in args.only.split(",") if o)
    return Check(args.out, args.budget_s, DRY if args.dry_run else GPU, only).run()


if __name__ == "__main__":
    sys.exit(main())
