#!/usr/bin/env bash
# GPU run book check: the encoder speedup MAE buys, measured on this card.
#
#   bash infra/gpu_check.sh             # ViT-L/16 and ViT-H/14, bf16, on the GPU
#   bash infra/gpu_check.sh --dry-run   # the same steps with a tiny model on CPU
#
# Runs from a checkout with only torch installed (PYTHONPATH = repo root), prints
# each benchmark's table and a summary line per model: measured speedup vs the
# analytic FLOP ratio, images/sec and MFU. Env: PYTHON, GPU_CHECK_STEPS,
# GPU_CHECK_COMPILE=1 (torch.compile both variants), GPU_CHECK_OUT (JSON dir).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
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
echo "gpu_check: JSON reports in $out"
