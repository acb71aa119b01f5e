#!/usr/bin/env bash
# The one-shot GPU check: every GPU figure in docs/BENCHMARKS.md, on one GPU, in a
# bounded time (default 8 minutes), on a node with CUDA PyTorch and no internet.
#
#   bash infra/gpu_check.sh             # on the GPU node, from a checkout
#   bash infra/gpu_check.sh --dry-run   # the same sections with tiny models on CPU (CI)
#   bash infra/gpu_check.sh --wheels-only  # join, verify and install the wheels, then stop
#
# What the node lacks travels as wheel files under .whl/ (any layout; made on a
# connected machine by infra/gpu_wheels.sh, large wheels split into parts of at most
# 60 MB). This script joins the parts, checks their sha256, and installs each wheel
# whose distribution is missing or older into a private folder (nothing system-wide).
# The sections, their order and budget are in train/bench/gpu_check.py; each prints a
# SUMMARY, SKIP or FAIL line, and the JSON reports and logs land in GPU_CHECK_OUT.
# Env: PYTHON, GPU_CHECK_OUT (report dir; default $OUT, else a new temporary one),
#      GPU_CHECK_BUDGET_S (default 480), GPU_CHECK_WHEELS (default .whl in the checkout).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$here/.venv/bin/python" ]; then PY="$here/.venv/bin/python"  # made by `make`
else PY=python3; fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
out=${GPU_CHECK_OUT:-${OUT:-$(mktemp -d)}}  # $OUT: the folder a lent device machine sends back
wheels=${GPU_CHECK_WHEELS:-$here/.whl}
mkdir -p "$out"

# ---- bring what the node lacks: join split wheels, verify, install privately
if [ -d "$wheels" ]; then
  wheels=$(cd "$wheels" && pwd)
  site=$(mktemp -d /tmp/gpu-check-site.XXXX)
  joined="$site.wheels"
  mkdir -p "$joined"
  # keep $joined/NAME only if it matches its .sha256; a joined wheel must have one (a
  # missing part leaves no other sign), a whole one is checked where one came with it
  checked() {  # NAME SUM-REQUIRED(yes|no) WHAT-THE-FAIL-LINE-SAYS
    local sum
    sum=$(find "$wheels" -name "$1.sha256" | head -1)
    if [ -z "$sum" ] && [ "$2" = no ]; then return 0; fi
    if [ -z "$sum" ] || ! (cd "$joined" && sha256sum --quiet -c "$sum"); then
      echo "FAIL wheels: $1 $3"
      rm -f "$joined/$1"
    fi
  }
  while IFS= read -r first; do
    name=$(basename "${first%.part-aa}")
    find "$wheels" -name "$name.part-*" -printf '%f %p\n' | sort | cut -d' ' -f2- | xargs cat >"$joined/$name"
    checked "$name" yes "joined from its parts does not match its .sha256 (a part missing or damaged?)"
  done < <(find "$wheels" -type f -name '*.whl.part-aa')
  while IFS= read -r whl; do
    cp "$whl" "$joined/"
    checked "$(basename "$whl")" no "does not match its .sha256 (damaged on the way?)"
  done < <(find "$wheels" -type f -name '*.whl')
  # A wheel is installed when its distribution is missing or older (version from the file name).
  mapfile -t wanted < <("$PY" - "$joined" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

def key(v):
    return tuple(int(x) if x.isdigit() else 0 for x in v.split("."))

for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    dist, ver = whl.name.split("-")[:2]
    try:
        have = version(dist)
    except PackageNotFoundError:
        have = None
    if have is None or key(have) < key(ver):
        print(whl)
PYEOF
)
  if [ ${#wanted[@]} -gt 0 ]; then
    echo "installing ${#wanted[@]} wheels into $site: $(for w in "${wanted[@]}"; do basename "$w" | cut -d- -f1-2; done | tr '\n' ' ')"
    install() { "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$@"; }
    if ! install "$site" "${wanted[@]}"; then
      # One bad wheel must not keep the others out: find it on its own, then install the
      # rest together again (one at a time into one folder, pip skips a top-level folder
      # that is already there: DALI, nvImageCodec and nvJPEG all go under nvidia/).
      good=()
      for w in "${wanted[@]}"; do
        probe=$(mktemp -d /tmp/gpu-check-probe.XXXX)
        if install "$probe" "$w" >/dev/null 2>&1; then good+=("$w")
        else echo "FAIL wheels: pip could not install $(basename "$w")"; fi
        rm -rf "$probe"
      done
      rm -rf "$site" && mkdir -p "$site"
      if [ ${#good[@]} -gt 0 ]; then install "$site" "${good[@]}" || echo "FAIL wheels: pip could not install the others"; fi
    fi
    export PYTHONPATH="$site:$PYTHONPATH"
    # nvJPEG from its wheel (DALI's nvImageCodec loads it at run time), else the CUDA toolkit's:
    # the last one prepended is searched first
    for lib in /usr/local/cuda/lib64 "$site/nvidia/cu13/lib"; do
      if [ -d "$lib" ]; then export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
    done
  fi
fi

if [ "${1:-}" = "--wheels-only" ]; then  # stop after the wheels (tests, or to inspect the node)
  echo "wheels: PYTHONPATH=$PYTHONPATH"
  exit 0
fi
exec "$PY" -m train.bench.gpu_check --out "$out" --budget-s "${GPU_CHECK_BUDGET_S:-480}" "$@"
