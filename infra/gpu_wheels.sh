#!/usr/bin/env bash
# Prepare, on a machine with internet, the wheels that infra/gpu_check.sh installs
# on an air-gapped GPU node that already has CUDA PyTorch: DeepSpeed and its small
# pure-Python deps, and NVIDIA DALI with the libraries it loads (nvImageCodec, nvJPEG).
#
#   bash infra/gpu_wheels.sh [DEST] [PYTHON_VERSION]     # defaults: .whl 3.12
#
# Wheels larger than PART_MB (default 60 MB; some transfer paths cap file size) are
# split into NAME.whl.part-aa, -ab, ... with NAME.whl.sha256 beside them; gpu_check.sh
# joins the parts, checks the sha256 and installs. The files are then packed into
# folders DEST/t1, DEST/t2, ... of at most PART_MB each, so that each folder can
# travel on its own (one transfer per folder); copy them all under the checkout's
# .whl/ on the GPU node, in any layout.
set -euo pipefail
dest=${1:-.whl}
pyver=${2:-3.12}
part_mb=${PART_MB:-60}
PY=${PYTHON:-python3}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    "${platforms[@]}" -d "$stage" "$@"
}
# DeepSpeed ships an sdist only; its wheel is pure Python (no ops prebuilt).
"$PY" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$stage"
# what our code and DeepSpeed import beyond torch (xxhash: every shard read; DeepSpeed
# imports msgpack, einops, psutil and tqdm at `import deepspeed`); a package the
# node already has in the same or a newer version is not installed over it
download simplejpeg xxhash hjson pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection \
  typing-extensions msgpack einops psutil tqdm
# DALI (CUDA 13 build) and what it needs beyond a CUDA PyTorch image. nvCOMP is left
# out: DALI loads it only for compressed TIFF/HW decompression, never for JPEG.
download nvidia-dali-cuda130==2.4.0 "nvidia-nvimgcodec-cu13>=0.9,<0.10" nvidia-nvjpeg \
  astunparse six gast optree nvtx makefun "libcst~=1.8"

limit=$((part_mb * 1000 * 1000))
for f in "$stage"/*.whl; do
  (cd "$stage" && sha256sum "$(basename "$f")" >"$(basename "$f").sha256")  # every wheel: checked on the node
  if [ "$(stat -c %s "$f")" -gt "$limit" ]; then
    split -b "$limit" -a 2 "$f" "$f.part-"
    rm "$f"
  fi
done

# Pack into transfer folders of at most PART_MB each, largest first (first fit).
rm -rf "$dest" && mkdir -p "$dest"
declare -a used=()
while read -r size name; do
  placed=
  for i in "${!used[@]}"; do
    if [ $((used[i] + size)) -le "$limit" ]; then used[i]=$((used[i] + size)); placed=$i; break; fi
  done
  if [ -z "$placed" ]; then used+=("$size"); placed=$((${#used[@]} - 1)); fi
  mkdir -p "$dest/t$((placed + 1))"
  mv "$stage/$name" "$dest/t$((placed + 1))/"
done < <(cd "$stage" && find . -maxdepth 1 -type f -printf '%s %f\n' | sort -rn)
for d in "$dest"/t*; do
  echo "$d: $(du -sm "$d" | cut -f1) MB, $(ls "$d" | wc -l) files"
done
