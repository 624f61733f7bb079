# The two entry points of the README: `make run` (the main job on the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml setup.py scripts/bootstrap.sh
	bash scripts/bootstrap.sh $(VENV)
	touch $@

.PHONY: install run test gpu-check
install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/videobert pretrain --preset tiny --data synthetic --steps 300 --out runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# On a GPU machine with PyTorch and Triton: build the CUDA extension, run the tests on the GPU, every benchmark.
gpu-check:
	bash scripts/gpu_check.sh all
