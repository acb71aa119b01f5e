# maescale — set-up, tests and demo. Every target works on a fresh machine:
# the virtual environment is created (or refreshed when pyproject.toml changes)
# on demand, and a second run is a fast no-op.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Extras installed for the test suite; later features add theirs here.
TEST_EXTRAS ?= dev,s3,demo,deepspeed,metrics,dali,ffcv,parquet,ray,interop,tracking,wandb,mlflow
STAMP := $(VENV)/.installed-$(TEST_EXTRAS)
# Debian packages the tests need (installed with apt-get when missing; later
# features add theirs). FFCV builds from source against libturbojpeg and OpenCV 4;
# slurm-wlm + munge: the Slurm tests start a one-node cluster on localhost.
APT_PACKAGES ?= prometheus pkg-config g++ libturbojpeg0-dev libopencv-dev slurm-wlm munge

.PHONY: venv test test-fast demo demo-s3 chaos bench-encoder bench-peers gpu-check-dry-run clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  SUDO=$$([ $$(id -u) = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first and pinned: on this machine it is the CPU build on local disk.
	@# GPU users: install your CUDA torch into .venv before running make.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[$(TEST_EXTRAS)]"
	@rm -f $(VENV)/.installed-*
	@touch $@

test: venv
	$(PY) -m pytest

test-fast: venv
	$(PY) -m pytest -m "not slow"

demo: venv
	$(VENV)/bin/mae demo --workdir demo

demo-s3: venv
	$(VENV)/bin/mae demo --s3 --workdir demo-s3

# The long chaos soak (docs/RELIABILITY.md): 20 SIGKILLs under 10% S3 faults, then the audit.
chaos: venv
	$(VENV)/bin/mae chaos --workdir chaos --kills 20 --epochs 10 --fault-rate 0.1 --seed 0

bench-encoder: venv
	$(VENV)/bin/mae bench encoder --model mae_vit_base_patch16 --batch 4 --steps 5

# The peers of `mae bench pipeline --against litdata,webdataset,streaming`, without the
# torchvision/torch they would pull in: their own runtime dependencies only.
BENCH_PEERS := litdata==0.2.76 webdataset==1.0.2 mosaicml-streaming==0.13.0 braceexpand lightning-utilities \
	filelock requests tifffile brotli python-snappy cramjam zstd catalogue
bench-peers: venv
	$(PY) -m pip install -q --no-deps $(BENCH_PEERS)
	$(PY) -m pip install -q transformers==5.24.0  # MosaicML Streaming imports it (no torch dependency)

gpu-check-dry-run: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash infra/gpu_check.sh --dry-run

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info demo demo-s3 chaos
