# make run: set up, then serve examples/fastapi_app.py (APP=examples.hello:handler for the streams one).  make test: set up, then lint, type-check, test.
# make chaos: set up, then the fault suite in full (about 5 minutes; table in bench/results/chaos.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages: gcc and python3-dev build the compiled hand-off (shared/_hotpath.c) and round-robin
# (dispatcher/policies/_round_robin.c), libcap-dev
# builds python-prctl, wrk drives the benchmark, haproxy stands in front of two instances in the
# scaling-out test.
DEB_PACKAGES := gcc python3-dev libcap-dev wrk haproxy
BIND ?= 127.0.0.1:8000
APP ?= examples.fastapi_app:app

.PHONY: setup system-packages run test lint bench chaos clean

setup: $(STAMP)

system-packages:
	@missing=""; \
	command -v gcc >/dev/null 2>&1 || missing="$$missing gcc"; \
	$(PYTHON) -c 'import os, sysconfig; raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
		|| missing="$$missing python3-dev"; \
	dpkg -s libcap-dev >/dev/null 2>&1 || missing="$$missing libcap-dev"; \
	command -v wrk >/dev/null 2>&1 || missing="$$missing wrk"; \
	command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing="$$missing haproxy"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing Debian packages:$$missing"; \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else \
			echo "warning: missing$$missing (not root or no apt-get); without gcc and Python's headers the hand-off runs in pure Python (slower), python-prctl may fail to build, make bench needs wrk, the HAProxy test is skipped" >&2; \
		fi; \
	fi

# The compiled hand-off and round-robin are built by the install: a change to their source installs again.
$(STAMP): pyproject.toml shared/_hotpath.c dispatcher/policies/_round_robin.c | system-packages
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[prctl,dev,web]' || { \
		echo "warning: installing with the prctl extra failed; installing without it" >&2; \
		$(PY) -m pip install -q -e '.[dev,web]'; }
	touch $(STAMP)

run: setup
	$(PY) -m dispatcher --app $(APP) --bind $(BIND)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The suite in TEST_WORKERS processes (pytest-xdist): most tests wait on servers, processes and
# timeouts, so two at a time take about two thirds of the time on 2 cores. TEST_WORKERS=1: one at a time.
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# The benchmark lab (bench/lab.py: policies x workloads W0-W4 x CPU layouts, Node's cluster on W0
# when node is on PATH, rolling reload; about 12 minutes; report and plots in bench/results/), then the comparison with uvicorn, gunicorn and granian (bench/peers.py, about
# 12 minutes; bench/results/peers-latest.md; the peers extra installs them), then the
# micro-benchmarks, saved under .benchmarks/ to compare across commits (add --benchmark-compare).
# make bench LAB_ARGS=--quick PEERS_ARGS=--quick for a short run.
LAB_ARGS ?=
PEERS_ARGS ?=
PEERS_STAMP := $(VENV)/.peers-installed
$(PEERS_STAMP): pyproject.toml | $(STAMP)
	$(PY) -m pip install -q -e '.[web,peers]'
	touch $(PEERS_STAMP)

bench: setup system-packages $(PEERS_STAMP)
	$(PY) -m bench.lab $(LAB_ARGS)
	$(PY) -m bench.peers $(PEERS_ARGS)
	$(PY) -m pytest -q -p no:cacheprovider bench -m 'bench or not bench' --benchmark-only --benchmark-autosave

# The fault suite in full (tests/chaos, marker chaos): workers killed under load, hung workers,
# fd limits, garbage on the channel and the control socket, the master killed, slow clients, stop
# and reload under load. Each scenario prints one figure line; the table goes to bench/results/chaos.md.
chaos: setup
	$(PY) -m pytest -m chaos -s -v -p no:cacheprovider tests/chaos

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .benchmarks
