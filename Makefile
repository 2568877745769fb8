# cdsp-pipelines: `make demo` runs the main job, `make test` the tests; both install first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_DIR ?= build/demo

.PHONY: install test lint demo pipeline submit images bench mlflow-ui clean

install: $(VENV)/.installed

# PyTorch first, so that the project's `torch` requirement is already met by the right
# build: the CUDA build where a GPU is present, else the CPU build (a local wheel when the
# machine carries one, else PyTorch's CPU index), never the multi-GB CUDA build by accident.
$(VENV)/.torch:
	python3 -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PIP) install -q torch==$(TORCH_VERSION); \
	elif $(PIP) install -q --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null; then \
	  echo "installed the local CPU build of torch $(TORCH_VERSION)"; \
	else \
	  $(PIP) install -q torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple; \
	fi
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e ".[dev]"
	touch $@

# Services the tests start on 127.0.0.1: Debian's Prometheus Pushgateway (moto's S3
# server and the MLflow server come with the Python dependencies).
test-services:
	@command -v prometheus-pushgateway >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus-pushgateway >/dev/null; \
	  else echo "note: prometheus-pushgateway is not installed; install Debian's package for the telemetry tests"; fi; }
	@# Debian's package starts a system service; the tests start their own on a free port.
	@-systemctl stop prometheus-pushgateway >/dev/null 2>&1 || true

test: install test-services
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .

demo: install
	$(VENV)/bin/cdsp synth --out $(DEMO_DIR)/data
	$(VENV)/bin/cdsp prepare --data $(DEMO_DIR)/data --out $(DEMO_DIR)/prepared

clean:
	rm -rf build .pytest_cache
