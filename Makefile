# The two entry points of the README: `make run` (the main job on the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

# The demo's sampling and objective settings: one sentence per sample, every clip, mostly joint samples, matching
# weighted up, a tiny model's learning rate (paper-style defaults learn matching too slowly for a CPU demo).
DEMO_FLAGS := --videos-per-batch 32 --max-stride 1 --max-concat 1 --sample-mix 0.8,0.1,0.1 --vtm-weight 3 --lr 3e-3

$(VENV)/.installed: pyproject.toml setup.py scripts/bootstrap.sh
	bash scripts/bootstrap.sh $(VENV)
	touch $@

.PHONY: install run test gpu-check
install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/videobert pretrain --preset tiny --data synthetic --steps 300 --out runs/demo --overwrite $(DEMO_FLAGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# On a GPU machine with PyTorch and Triton: build the CUDA extension, run the tests on the GPU, every benchmark.
gpu-check:
	bash scripts/gpu_check.sh all
