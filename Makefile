# Two entry points, both safe to re-run on a fresh machine as root:
#   make demo  - create .venv, install, run the paper's experiment end to end
#   make test  - install what the tests need (Python, Debian) and run the whole suite
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BDN := $(VENV)/bin/bdn
# Debian packages the project needs at run time and in tests (mosquitto: the tests start their own brokers
# with their own ACL and password files; mosquitto_passwd comes with it).
# swtpm: a software TPM 2.0 for the sealing tests; libtss2-dev + pkg-config: tpm2-pytss builds against them;
# systemd: systemd-analyze checks the unit files; chromium + chromium-driver: the dashboard's browser test.
DEB_PACKAGES := dataset-fashion-mnist mosquitto swtpm swtpm-tools libtss2-dev pkg-config systemd chromium chromium-driver
DEMO_ARGS ?= --devices 10 --rounds 5 --seed 7

.PHONY: help demo test lint venv deb-deps clean

help:
	@echo "make demo   run the paper's experiment end to end (creates .venv)"
	@echo "make test   install test dependencies and run the whole suite"

# Re-install only when pyproject.toml changes; the stamp lives inside the venv.
$(VENV)/.stamp: pyproject.toml | deb-deps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[gateway,agent,demo,provision,dev]'
	@touch $@

venv: $(VENV)/.stamp

# apt-get update runs once, and only when something is missing.
deb-deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

demo: venv deb-deps
	OMP_NUM_THREADS=1 $(BDN) demo $(DEMO_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy blockdeepnet
	$(VENV)/bin/lint-imports

# The contract compiler (solc-js, pinned in contracts/package-lock.json): re-installed only when the lock changes.
contracts/node_modules: contracts/package-lock.json
	npm ci --prefix contracts --no-audit --no-fund
	@touch $@

# pytest exits 5 when it collected nothing; make treats that as a failure, so an empty suite never passes.
test: venv deb-deps lint contracts/node_modules
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
