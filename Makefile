# dicom-ai-node: every set-up step lives here, so a fresh clone needs only
#   make demo   (the node end to end on the embedded default)
#   make test   (the test suite, with its real DICOM peers)
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages the tests talk to: dcmtk (storescu/storescp/echoscu),
# Orthanc (the PACS) with its DICOMweb plugin, dicom3tools (dciodvfy, the validator),
# chromium + chromium-driver (the browser the web console is tested with), and the
# brokers of Celery dispatch, RabbitMQ and Redis (tests/test_celery_dispatch.py).
PEERS := dcmtk orthanc orthanc-dicomweb dicom3tools libgdcm-tools chromium chromium-driver rabbitmq-server redis-server systemd
PYTEST_ARGS ?=

.PHONY: help venv peers services test test-fast demo lint fuzz soak bench bench-ingest bench-stow bench-preprocess bench-writers bench-pipeline bench-workers train-demo clean

help:
	@echo "make demo | test | test-fast | lint | bench | train-demo | clean"

# The venv is rebuilt when pyproject.toml changes. torch goes first and pinned:
# it resolves to the local CPU wheel, so nothing can pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev,postgres]"
	touch $@

venv: $(STAMP)

# Install the DICOM peers when missing and we are root; otherwise say what is missing.
peers:
	@missing=""; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v Orthanc >/dev/null || test -x /usr/sbin/Orthanc || missing="$$missing orthanc"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v gdcmanon >/dev/null || missing="$$missing libgdcm-tools"; \
	test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || missing="$$missing orthanc-dicomweb"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	command -v rabbitmq-server >/dev/null || test -x /usr/sbin/rabbitmq-server || missing="$$missing rabbitmq-server"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing DICOM test peers:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(PEERS); \
	  else \
	    echo "missing DICOM test peers:$$missing (run as root or: sudo apt-get install $(PEERS))" >&2; \
	  fi; \
	fi

# PostgreSQL, RabbitMQ and Redis for the database and dispatch tests; the tests also start
# them themselves.
services:
	@$(BIN)/python -m tests.support.services || true

test: $(STAMP) peers services
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Pure functions and in-process tests: no DICOM peers, no PostgreSQL, nothing slow
# (the markers are derived in tests/support/markers.py); under 2 minutes on 2 cores.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not peers and not postgres and not slow" $(PYTEST_ARGS)

demo: $(STAMP) peers
	$(BIN)/ainode demo $(if $(SERIES),--series "$(SERIES)",)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Hostile input (tests/support/fuzz.py) and load (tests/support/load.py) against a live
# node, for a chosen time; `make test` runs a short seeded version of each.
FUZZ_SECONDS ?= 600
FUZZ_SEED ?= 19
SOAK_SECONDS ?= 1800
SOAK_DB ?= sqlite
fuzz: $(STAMP) peers
	$(BIN)/python -m tests.support.fuzz --seconds $(FUZZ_SECONDS) --seed $(FUZZ_SEED)

soak: $(STAMP) peers
	$(BIN)/python -m tests.support.load --seconds $(SOAK_SECONDS) --senders 8 --slices 300 --database $(SOAK_DB)

bench: $(STAMP) peers
	@ls bench/*.py >/dev/null 2>&1 && for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b; done

bench-ingest: $(STAMP) peers
	$(BIN)/python bench/bench_ingest.py

# STOW-RS against C-STORE into the same node, the 300-slice CT, in one run.
bench-stow: $(STAMP) peers
	$(BIN)/python bench/bench_stow.py

bench-preprocess: $(STAMP)
	nice -n 10 $(BIN)/python bench/bench_preprocess.py

bench-writers: $(STAMP)
	nice -n 10 $(BIN)/python bench/bench_writers.py

bench-pipeline: $(STAMP)
	$(BIN)/python bench/bench_pipeline.py

# Celery workers (1, 2) against the database-polling worker (1, 2): jobs/min and dispatch
# latency, on PostgreSQL + RabbitMQ. BENCH_ARGS e.g. "--jobs 8 --latency 8 --burn-s 2".
bench-workers: $(STAMP) services
	$(BIN)/python bench/bench_workers.py $(BENCH_ARGS)

# Demo weights: phantoms + randomised-appearance sets (pipelines/phantom/randomised.py,
# which reads the real label maps and CTs of ../shared/data) + stage 1, stage 2, slice
# classifier, MR variant, on one CPU thread. On this 2-core machine CT stage 2's body took
# 61 min from scratch and its randomised refine 41 min; CT stage 1 15 min; the time
# budgets of the others (pipelines/training/recipes.py) add up to under an hour. Resumes
# from data/train-demo after an interruption.
train-demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/ainode train-demo --work data/train-demo

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache .mypy_cache
