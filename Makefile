# The Makefile owns set-up: `make demo` and `make test` work on a fresh machine.
PY      := .venv/bin/python
STAMP   := .venv/.installed
APT_PKGS := g++ pkg-config ninja-build libopencv-dev libturbojpeg0-dev libjpeg62-turbo-dev dataset-fashion-mnist
# make gpu-test runs in the environment's own interpreter and PATH, as found before .venv/bin joins PATH below
PYTHON ?= python3
ENV_PATH := $(PATH)
# the venv's tools first, as in an activated shell: DeepSpeed's JIT-built comm op records which ninja built it and
# rebuilds (~1 min) whenever a run sees the other one (pip's in the venv, Debian's on the system)
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup demo demo-compare test gpu-test timm-suite flops benchmark benchmarks clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py timm_optdnn/data/_jpeg.c Makefile
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PKGS)
	test -x $(PY) || python3 -m venv .venv
	# torch/torchvision pinned to the wheels on this machine's disk (a CUDA build that runs on CPU)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# DS_BUILD_OPS=0: DeepSpeed JIT-builds the few ops it needs (CPU has no CUDA toolchain)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[dev]'
	# the one op CPU ranks use, DeepSpeed's shared-memory allreduce, is JIT-built on first use (~90 s on 2 cores):
	# built here, once, instead of inside the first training run
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $@

demo: $(STAMP)
	$(PY) -m timm_optdnn.training.demo

demo-compare: $(STAMP)
	$(PY) -m timm_optdnn.training.demo --compare

test: $(STAMP)
	$(PY) -m pytest -q -x --durations=15

# The CUDA tests (tests/test_gpu_*.py, marked gpu) in an existing GPU environment: no apt, no venv, nothing
# installed (docs/cluster.md says how to install the project there). A test whose package is missing there skips
# and names it. PYTHON=/path/to/python picks another interpreter.
gpu-test: export PATH := $(ENV_PATH)
gpu-test:
	$(PYTHON) -m pytest -m gpu -v -rs --durations=10 tests/test_gpu_*.py

# timm's own tests/test_models.py (from timm's sdist on PyPI) on the small optdnn models; ~8 min, not part of `test`
timm-suite: $(STAMP)
	$(PY) tools/run_timm_suite.py

flops: $(STAMP)
	$(PY) -m timm_optdnn.flops

benchmark: $(STAMP)
	$(PY) -m timm_optdnn.training.benchmark

# docs/benchmarks.md: the model and the loader benchmark (~1 h on 2 cores), each printing its table and its command.
# The README shows these two commands; run on a quiet machine.
MODEL_BENCH  := -m timm_optdnn.training.benchmark vit_ti convnext_iso_s --batch-size 32 --img-size 224 --repeats 5
LOADER_BENCH := -m tools.loader_benchmark --images 1000 --workers 2 --epochs 2 --repeats 3
benchmarks: $(STAMP)
	{ printf '# Benchmarks\n\nWritten by `make benchmarks`; every table below follows the command that printed it.\n\n'; \
	  echo "Machine: $$(lscpu | sed -n 's/^Model name: *//p'), $$(nproc) cores," \
	       "torch $$($(PY) -c 'import torch; print(torch.__version__)')."; \
	  echo; $(PY) $(MODEL_BENCH); echo; $(PY) $(LOADER_BENCH); \
	} > docs/benchmarks.md.part
	mv docs/benchmarks.md.part docs/benchmarks.md

clean:
	rm -rf .venv build *.egg-info
