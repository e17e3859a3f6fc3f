# Everything a fresh machine needs: `make test` and `make demo` set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# PyTorch is pinned to the releases this project is developed and tested with.
TORCH_PKGS := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PKGS)
	$(PY) -m pip install --quiet -e '.[timm,onnx,dev]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --doctest-modules tests repq_fx

demo: $(STAMP)
	$(PY) -m repq_fx.cli demo

bench: $(STAMP)
	$(PY) benchmarks/merge_speed.py --threads 1

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
