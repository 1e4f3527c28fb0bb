# Two commands run everything on a fresh machine: `make quickstart` and `make test`.
# Both create/refresh .venv first. On a machine without an NVIDIA GPU we pin the CPU
# wheel of torch so pip never pulls a multi-GB CUDA build; the package itself only
# asks for torch>=2.6.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_PIN := $(if $(HAS_GPU),torch>=2.6,torch==2.13.0)
OUT ?= runs/quickstart
PRESET ?= default

.PHONY: venv quickstart test lint bench clean browser

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev,serve]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/cm3leon quickstart --out $(OUT) --preset $(PRESET)

# The browser test drives Debian's Chromium; install it when we can (root + apt), else that test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: the browser test will be skipped"; }

test: $(STAMP) browser
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
