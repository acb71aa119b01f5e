#!/usr/bin/env bash
# GPU run book check, on one GPU:
#   1. the encoder speedup MAE buys (mae bench encoder, ViT-L/16 and ViT-H/14, bf16);
#   2. a short ZeRO-2 and ZeRO-3 bf16 pretraining of ViT-L on synthetic GPU tensors
#      through the real trainer (DeepSpeed engine): images/sec, MFU, peak memory;
#   3. DALI decode with nvJPEG (device='mixed') vs the per-file PIL baseline:
#      images/sec and CPU cores per 1,000 img/s (targets: >= 5,000 img/s, < 2 cores).
#
#   bash infra/gpu_check.sh             # on the GPU
#   bash infra/gpu_check.sh --dry-run   # the same steps with tiny models on CPU
#
# Runs from a checkout (PYTHONPATH = repo root) with torch installed; part 2 needs
# DeepSpeed and its few pure-Python deps: if they are missing and wheels lie in
# .whl/ (see docs/BENCHMARKS.md), they are installed into a private folder first.
# Env: PYTHON, GPU_CHECK_STEPS, GPU_CHECK_COMPILE=1, GPU_CHECK_OUT (JSON dir).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$here/.venv/bin/python" ]; then PY="$here/.venv/bin/python"  # made by `make`
else PY=python3; fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
out=${GPU_CHECK_OUT:-$(mktemp -d)}
mkdir -p "$out"
steps=${GPU_CHECK_STEPS:-20}
compile=()
[ "${GPU_CHECK_COMPILE:-0}" = 1 ] && compile=(--compile)

if [ "${1:-}" = "--dry-run" ]; then
  runs=("mae_vit_test_patch4 8 fp32 cpu" "mae_vit_tiny_patch16 2 fp32 cpu")
  steps=${GPU_CHECK_STEPS:-3}
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA GPU (use --dry-run on CPU)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  runs=("mae_vit_large_patch16 128 bf16 cuda" "mae_vit_huge_patch14 64 bf16 cuda")
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

for run in "${runs[@]}"; do
  read -r model batch dtype device <<<"$run"
  json="$out/encoder_${model}_${dtype}.json"
  echo "== mae bench encoder --model $model --batch $batch --dtype $dtype --device $device --steps $steps ${compile[*]}"
  "$PY" -m train.cli bench encoder --model "$model" --batch "$batch" --dtype "$dtype" --device "$device" \
    --steps "$steps" --warmup 3 "${compile[@]}" --json >"$json"
  "$PY" - "$json" <<'PYEOF'
import json, sys
from train.bench_encoder import format_report
r = json.load(open(sys.argv[1]))
print(format_report(r))
mae = r["results"]["mae"]
mfu = f"{mae['mfu']:.1%}" if mae["mfu"] is not None else "n/a (no known peak for this device)"
verdict = "meets" if r["measured_speedup"] >= r["flop_ratio"] else "below"
print(f"SUMMARY {r['config']['model']} {r['device']}: speedup {r['measured_speedup']:.2f}x "
      f"(FLOP ratio {r['flop_ratio']:.2f}x, {verdict} target), MAE {mae['images_per_s']:.1f} img/s, MFU {mfu}")
PYEOF
done

# ---- 2. the trainer: ZeRO-2 and ZeRO-3 on synthetic device tensors
if ! "$PY" -c "import deepspeed" 2>/dev/null && ls "$here"/.whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/gpu-check-site "$here"/.whl/*.whl
  export PYTHONPATH="/tmp/gpu-check-site:$PYTHONPATH"
fi
if ! "$PY" -c "import deepspeed" 2>/dev/null; then
  echo "SKIP trainer check: DeepSpeed is not importable (pip install deepspeed, or put its wheels in .whl/)"
else
  if [ "${1:-}" = "--dry-run" ]; then
    train_args=(--config tiny_cpu data.img_size=32 data.micro_batch=8 deepspeed.precision=fp32 schedule.max_steps=6)
  else
    train_args=(--config vit_l data.micro_batch=64 optim.accum_steps=1 deepspeed.precision=bf16
                schedule.max_steps=${GPU_CHECK_TRAIN_STEPS:-30})
  fi
  for stage in 2 3; do
    run="$out/train_zero$stage"
    echo "== train.pretrain ${train_args[*]} deepspeed.stage=$stage data.backend=synthetic (torchrun, 1 process)"
    "$PY" -m torch.distributed.run --nproc_per_node 1 --master_port $((29500 + stage)) -m train.pretrain \
      "${train_args[@]}" deepspeed.stage=$stage data.backend=synthetic schedule.warmup_epochs=0 \
      checkpoint.enabled=false checkpoint.dir="$run" log.metrics_file="$run/metrics.jsonl" log.every_steps=10 \
      >"$run.log" 2>&1 || { tail -40 "$run.log"; exit 1; }
    "$PY" - "$run" "$stage" <<'PYEOF'
import json, statistics, sys
run, stage = sys.argv[1], sys.argv[2]
summary = json.load(open(f"{run}/run_summary.json"))
steps = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
steady = [s["step_time_s"] for s in steps[len(steps) // 3:]] or [s["step_time_s"] for s in steps]
img_s = summary["derived"]["global_batch"] / statistics.median(steady)
mfu = summary["mfu"] * img_s / summary["images_per_s"] if summary["mfu"] else None
peak = summary["peak_memory_bytes"]
print(f"SUMMARY train ZeRO-{stage}: {img_s:.1f} img/s steady (median step of the last 2/3), "
      f"MFU {f'{mfu:.1%}' if mfu is not None else 'n/a'}, peak memory "
      f"{f'{peak / 2**30:.1f} GiB' if peak else 'n/a (CPU)'}, final loss {summary['losses'][-1]:.4f}")
PYEOF
  done
fi
# ---- 3. DALI mixed decode (nvJPEG) on ImageNet-like JPEGs
if ! "$PY" -c "import nvidia.dali" 2>/dev/null && ls "$here"/.whl/nvidia_dali*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/gpu-check-dali "$here"/.whl/nvidia_dali*.whl
  export PYTHONPATH="/tmp/gpu-check-dali:$PYTHONPATH"
fi
if ! "$PY" -c "import nvidia.dali" 2>/dev/null; then
  echo "SKIP DALI decode check: nvidia-dali is not importable (pip install nvidia-dali-cuda130, or its wheel in .whl/)"
else
  if [ "${1:-}" = "--dry-run" ]; then
    dali_args=(--images 48 --batch 16 --workers 2 --rounds 1 --device cpu)
  else
    dali_args=(--images ${GPU_CHECK_DALI_IMAGES:-4000} --batch 256 --workers ${GPU_CHECK_DALI_THREADS:-8}
               --rounds 2 --device cuda)
  fi
  echo "== mae bench pipeline --backend dali --parts decode ${dali_args[*]}"
  "$PY" -m train.cli bench pipeline --backend dali --parts decode "${dali_args[@]}" --json >"$out/dali.json"
  "$PY" - "$out/dali.json" <<'PYEOF'
import json, sys
from pipeline.bench import format_report
r = json.load(open(sys.argv[1]))
print(format_report(r))
d = r["decode"]["dali_backend"]
cores = d["cpu_ms_per_image"]  # CPU-ms per image = CPU cores per 1,000 img/s
ok = d["images_per_s"] >= 5000 and cores < 2
print(f"SUMMARY dali {r['device']}: {d['images_per_s']:.0f} img/s, {cores:.2f} CPU cores per 1,000 img/s "
      f"({'meets' if ok else 'below'} target: >= 5,000 img/s with < 2 cores per 1,000 img/s)")
PYEOF
fi
echo "gpu_check: JSON reports and logs in $out"
