"""What verified checkpoints cost (`mae bench checkpoint`): DeepSpeed's own save and
load next to ours, alternated in one process on the same engine and disk.

- save: DeepSpeed's ``save_checkpoint`` with its torch engine (no hashes, no fsync)
  vs ``CheckpointManager.save`` (sha256 on the way, fsync, RNG file, record, lock
  check, agreement);
- verify: reading every file back against its record (what resume and export do);
- load: DeepSpeed's ``load_checkpoint`` with full unpickling vs ours (verification,
  then the same load with ``weights_only=True``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from model.registry import create_model
from train.checkpoint import CheckpointManager, tag_for, verify
from train.config import CheckpointConfig, load_config
from train.engine import build_engine, init_distributed


def _engine(model_name: str, stage: int):
    cfg = load_config("tiny_cpu", [f"model.name={model_name}", f"deepspeed.stage={stage}", "data.batch_size=2",
                                   "deepspeed.precision=fp32"])
    init_distributed(cfg.deepspeed)
    model = create_model(model_name)
    engine = build_engine(cfg, model, lr=1e-4)
    images = torch.randn(2, 3, model.cfg.img_size, model.cfg.img_size)
    loss, _, _ = engine(images, 0.75)
    engine.backward(loss)
    engine.step()  # AdamW states exist: a checkpoint of real size
    return engine


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_checkpoint(model_name: str = "mae_vit_small_patch16", stage: int = 2, rounds: int = 3,
                     directory: str | None = None) -> dict[str, object]:
    """Median seconds per save, verify and load, DeepSpeed's way and ours."""
    engine = _engine(model_name, stage)
    plain_engine = engine.checkpoint_engine
    times: dict[str, list[float]] = {k: [] for k in ("plain_save", "our_save", "verify", "plain_load", "our_load")}
    with tempfile.TemporaryDirectory(prefix="mae-bench-ckpt-", dir=directory) as tmp:
        root = Path(tmp)
        ours = CheckpointConfig(dir=str(root / "ours"), keep_last=rounds + 1)
        manager = CheckpointManager(ours, {"model": model_name}, rank=0, world_size=1)
        meta = {"model": model_name, "config": {}, "trainer": {}}
        rng = {"mask": torch.zeros(16, dtype=torch.uint8), "model": torch.zeros(16, dtype=torch.uint8)}
        for r in range(1, rounds + 1):
            engine.checkpoint_engine = plain_engine
            times["plain_save"].append(_timed(lambda: engine.save_checkpoint(str(root / "plain"), tag=tag_for(r),
                                                                             save_latest=False)))
            times["our_save"].append(_timed(lambda: manager.save(engine, r, meta, rng)))
            times["verify"].append(_timed(lambda: verify(root / "ours" / tag_for(r))))
            engine.checkpoint_engine = plain_engine
            times["plain_load"].append(_timed(lambda: engine.load_checkpoint(str(root / "plain"), tag=tag_for(r))))
            times["our_load"].append(_timed(lambda: manager.resume(engine)))
        size = sum(p.stat().st_size for p in (root / "ours" / tag_for(rounds)).iterdir())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": model_name, "stage": stage, "rounds": rounds, "checkpoint_bytes": size, "median_s": med,
            "per_round_s": times, "save_overhead": med["our_save"] / med["plain_save"] - 1,
            "load_overhead": med["our_load"] / med["plain_load"] - 1,
            "verify_gb_per_s": size / med["verify"] / 1e9}


def format_report(r: dict[str, object]) -> str:
    m = r["median_s"]
    return "\n".join([
        f"mae bench checkpoint: {r['model']}, ZeRO-{r['stage']}, one process, {r['checkpoint_bytes'] / 2**20:.0f} MiB "
        f"per checkpoint, median of {r['rounds']} alternated rounds",
        f"  save: DeepSpeed {m['plain_save']:.2f} s, ours {m['our_save']:.2f} s (sha256 + fsync + record) -> "
        f"{r['save_overhead']:+.0%}",
        f"  verify (read back every file against its sha256): {m['verify']:.2f} s = {r['verify_gb_per_s']:.2f} GB/s",
        f"  load: DeepSpeed {m['plain_load']:.2f} s, ours {m['our_load']:.2f} s (verify + weights_only) -> "
        f"{r['load_overhead']:+.0%}",
    ])
