# Everything a fresh machine needs: `make test` and `make demo` set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# PyTorch is pinned to the releases this project is developed and tested with.
TORCH_PKGS := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

# Fashion-MNIST comes from Debian's package (no downloads); `make data` installs it when missing.
FMNIST_DIR  := /usr/share/datasets/fashion-mnist
FMNIST_PKG  := dataset-fashion-mnist

.PHONY: setup test demo bench clean data

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PKGS)
	$(PY) -m pip install --quiet -e '.[timm,onnx,dev,deploy,inductor]'
	touch $@

test: $(STAMP)
	@$(MAKE) --no-print-directory data || echo "continuing without Fashion-MNIST: the tests that read it are skipped"
	$(PY) -m pytest -q -n 2 --doctest-modules tests repq_fx

demo: $(STAMP) data
	$(PY) -m repq_fx demo

data:
	@if [ -n "$$REPQ_FASHION_MNIST" ] && ls "$$REPQ_FASHION_MNIST"/t10k-labels-idx1-ubyte* >/dev/null 2>&1; then \
		echo "Fashion-MNIST: using $$REPQ_FASHION_MNIST (REPQ_FASHION_MNIST)"; \
	elif ls $(FMNIST_DIR)/train-images-idx3-ubyte* $(FMNIST_DIR)/train-labels-idx1-ubyte* \
	        $(FMNIST_DIR)/t10k-images-idx3-ubyte* $(FMNIST_DIR)/t10k-labels-idx1-ubyte* >/dev/null 2>&1; then \
		echo "Fashion-MNIST: installed in $(FMNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Fashion-MNIST: installing Debian's $(FMNIST_PKG)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(FMNIST_PKG); \
	else \
		echo "Fashion-MNIST is missing from $(FMNIST_DIR). Install it with" >&2; \
		echo "    sudo apt-get install $(FMNIST_PKG)        (Debian/Ubuntu; or run 'make data' as root)" >&2; \
		echo "or set REPQ_FASHION_MNIST to a folder holding the four IDX files (gzipped or not)." >&2; \
		exit 1; \
	fi

bench: $(STAMP)
	$(PY) benchmarks/merge_speed.py --threads 1

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
