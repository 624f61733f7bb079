# The two entry points of the README: `make run` (the main job on the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml setup.py scripts/bootstrap.sh
	bash scripts/bootstrap.sh $(VENV)
	touch $@

.PHONY: install run test
install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/videobert pretrain --preset tiny --data synthetic --steps 300 --out runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest -q tests
