# cdsp-pipelines: `make demo` runs the main job, `make test` the tests; both install first.
# `make test-fast` is the quick tier (no servers); `make components` regenerates the typed components.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_DIR ?= build/demo

.PHONY: install test test-fast test-services lint components demo demo-real pipeline submit images bench bench-real mlflow-ui screenshots clean

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

# Every other package at the version the tests last ran with (images/freeze.sh writes the
# pins; the images install the same ones), so a new release upstream cannot change a fresh
# clone's environment under it.
$(VENV)/.installed: $(VENV)/.torch pyproject.toml images/constraints.txt
	$(PIP) install -q -e ".[dev]" -c images/constraints.txt
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

# The edit-run loop: every test but the `slow` ones (those that use a server, and the
# subprocess-heavy ones; tests/conftest.py), in about 2 minutes (2 min 10 s here, idle). A server started here is an error.
test-fast: install
	$(VENV)/bin/ruff check .
	CDSP_TESTS_WITHOUT_SERVERS=1 $(PY) -m pytest -q -m "not slow" tests

# The typed component functions (components/stages.py) and the pipeline's parameters
# (pipelines/parameters.py), written from cdsp_core/config.py; run after changing a setting there
# (tests/test_components.py fails until then).
components: install
	$(PY) -m components.generate

lint: install
	$(VENV)/bin/ruff check .

# The whole pipeline on this machine through kfp's local runner, `cpu` preset: synthetic data
# (generated once) unless DATA_URI is given (a local path or s3://); MLFLOW_TRACKING_URI and
# PUSHGATEWAY_URL are honoured; DEMO_ARGS takes more flags (python -m pipelines.local_run -h).
DATA_URI ?=
DEMO_ARGS ?=
demo: install
	$(PY) -m pipelines.local_run --out $(DEMO_DIR) $(if $(DATA_URI),--data-uri '$(DATA_URI)') $(DEMO_ARGS)

# The same pipeline on real photos: every photo of ../shared/data/voc-real (3,131 train, 220 val), the
# `cpu-pretrained` preset with ImageNet's MobileNetV2 in both stages (VOC_REAL and MNV2_WEIGHTS are set
# with bench-real's below); about 35 minutes on 2 idle cores (README, "Run it locally").
DEMO_REAL_DIR ?= build/demo-real
demo-real: install
	@test -d $(VOC_REAL) && test -f $(MNV2_WEIGHTS) || { echo "make demo-real: needs $(VOC_REAL) and $(MNV2_WEIGHTS) (set VOC_REAL, MNV2_WEIGHTS)" >&2; exit 2; }
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pipelines.local_run --out $(DEMO_REAL_DIR) --data-uri '$(VOC_REAL)' --preset cpu-pretrained \
	  --pretrained '$(abspath $(MNV2_WEIGHTS))' --cls-pretrained '$(abspath $(MNV2_WEIGHTS))' $(DEMO_ARGS)

# Images and the compiled pipeline: the components' base images are these (compile-time).
REGISTRY ?= ghcr.io/cdsp-pipelines
IMAGE_TAG ?= 0.1.0
CDSP_IMAGE ?= $(REGISTRY)/cdsp-cpu:$(IMAGE_TAG)
CDSP_CUDA_IMAGE ?= $(REGISTRY)/cdsp-cuda:$(IMAGE_TAG)
PIPELINE_YAML ?= build/cdsp_pipeline.yaml
KFP_ENDPOINT ?=
KFP_EXPERIMENT ?= cdsp
RUN_ARGS ?=

# Other cluster settings come from CDSP_<NAME> env vars (CDSP_PIPELINE_ROOT, CDSP_S3_SECRET, ...).
pipeline: install
	CDSP_IMAGE='$(CDSP_IMAGE)' CDSP_CUDA_IMAGE='$(CDSP_CUDA_IMAGE)' $(PY) -m pipelines.cdsp_pipeline --out $(PIPELINE_YAML)

# Pipeline parameters as key=value: make submit KFP_ENDPOINT=... DATA_URI=s3://... RUN_ARGS="epochs=30 gpus=2"
# (typed by the compiled pipeline: see pipelines/submit.py; an unreachable endpoint is one line).
submit: pipeline
	@test -n "$(KFP_ENDPOINT)" || { echo "make submit: set KFP_ENDPOINT (the KFP API address)" >&2; exit 2; }
	@test -n "$(DATA_URI)" || { echo "make submit: set DATA_URI (s3://bucket/prefix of the dataset)" >&2; exit 2; }
	@$(PY) -m pipelines.submit --endpoint '$(KFP_ENDPOINT)' --experiment '$(KFP_EXPERIMENT)' \
	  $(PIPELINE_YAML) data_uri='$(DATA_URI)' $(RUN_ARGS)

images:
	@docker info >/dev/null 2>&1 || { echo "make images: no Docker engine reachable (docker info failed)" >&2; exit 2; }
	docker build -f images/Dockerfile.cpu -t $(CDSP_IMAGE) .
	docker build -f images/Dockerfile.cuda -t $(CDSP_CUDA_IMAGE) .
	docker push $(CDSP_IMAGE)
	docker push $(CDSP_CUDA_IMAGE)

# The ablation and scribble-robustness benchmark (`cdsp bench`) on the synthetic dataset (made once)
# with the `cpu` preset, three seeds and 15 epochs (the preset trains 40), two runs at a time (--jobs 2),
# 36 trainings: about 17 minutes on 2 idle cores in our latest measurement, about 37 on the slower days this
# machine has had (docs/benchmarks.md): $(BENCH_DIR)/results/results.md
# and results.json, every run in the MLflow experiment cdsp-bench (`make mlflow-ui`). A rerun resumes.
# BENCH_ARGS takes more flags (cdsp bench -h), e.g. BENCH_DIR=build/bench40 BENCH_ARGS="--epochs 40"
# for the preset's full training (37 minutes on 2 idle cores). OMP_WAIT_POLICY=PASSIVE: idle OpenMP
# threads sleep instead of spinning, which wastes most of a 2-core machine shared with other jobs.
BENCH_DIR ?= build/bench
BENCH_ARGS ?=
bench: install
	@test -f $(BENCH_DIR)/data/synth.json || $(VENV)/bin/cdsp synth --out $(BENCH_DIR)/data
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/cdsp bench --data $(BENCH_DIR)/data --out $(BENCH_DIR)/results \
	  --preset cpu --seeds 3 --epochs 15 --jobs 2 $(BENCH_ARGS)

# The same ablation on real photos: ../shared/data/voc-real (PASCAL VOC, 7 classes), `cpu-pretrained` preset
# (ImageNet's MobileNetV2 in both stages), reported on voc-real's val split (220 photos). To fit an hour on
# 2 cores it trains on the first BENCH_REAL_TRAIN training photos of a fixed random order
# (benchmarks/carve_split.py: a view of symlinks, nothing copied), 2 paired seeds, two runs at a time;
# docs/benchmarks.md, "Real photos". BENCH_REAL_ARGS takes more flags (cdsp bench -h).
VOC_REAL ?= ../shared/data/voc-real
MNV2_WEIGHTS ?= ../shared/data/imagenet-mobilenet-v2/mobilenet_v2_imagenet.pth
BENCH_REAL_DIR ?= build/bench-real
BENCH_REAL_TRAIN ?= 500
BENCH_REAL_RUNS ?= scribble-only,pseudo-only,scribble+pseudo,scribble+pseudo+lorm,scribble+pseudo+del,cdsp,cdsp-paper-lorm,full-supervision
BENCH_REAL_ARGS ?=
bench-real: install
	@test -d $(VOC_REAL) && test -f $(MNV2_WEIGHTS) || { echo "make bench-real: needs $(VOC_REAL) and $(MNV2_WEIGHTS) (set VOC_REAL, MNV2_WEIGHTS)" >&2; exit 2; }
	$(PY) benchmarks/carve_split.py --data $(VOC_REAL) --out $(BENCH_REAL_DIR)/data --holdout 0 --train $(BENCH_REAL_TRAIN)
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/cdsp bench --data $(BENCH_REAL_DIR)/data --out $(BENCH_REAL_DIR)/results \
	  --preset cpu-pretrained --pretrained $(MNV2_WEIGHTS) --cls-pretrained $(MNV2_WEIGHTS) --seeds 2 --jobs 2 \
	  --runs $(BENCH_REAL_RUNS) $(BENCH_REAL_ARGS)

# The MLflow dashboard over the embedded store (mlflow.db and mlruns/ in this folder), on
# localhost only: runs of `make demo` and `make bench` side by side. MLFLOW_UI_PORT=5000.
MLFLOW_UI_PORT ?= 5000
mlflow-ui: install
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow server --host 127.0.0.1 --port $(MLFLOW_UI_PORT) \
	  --workers 1 --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --default-artifact-root $(CURDIR)/mlruns

# The dashboard in pictures (docs/images/mlflow-*.png, shown in the README): the project's MLflow store
# after `make bench-real` and `make demo-real` (real photos), served on 127.0.0.1 and photographed with
# Debian's Chromium (headless) by docs/screenshots.py; a minute here. Nothing is trained.
screenshots: install
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "install Debian's chromium first"; exit 1; fi; }
	$(PY) docs/screenshots.py --out docs/images --bench $(BENCH_REAL_DIR)/results/results.json

clean:
	rm -rf build .pytest_cache
