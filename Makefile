# Setup on a fresh machine: `make test` / `make demo` create .venv/ when it is missing.
# torch is installed first, pinned (here both wheels lie on local disk); the project's own ranges then admit it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: test demo lint audit bench stress clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test]' $(TORCH_PINS)
	touch $(STAMP)

test: $(STAMP) lint
	$(PY) -m pytest -q

# the long runs (tests/stress/README.md): collected only with NSFW_INDEX_STRESS=1, never by `make test`
STRESS_COUNTS ?= /tmp/nsfw-index-stress-counts.jsonl
stress: $(STAMP)
	rm -f $(STRESS_COUNTS)
	NSFW_INDEX_STRESS=1 NSFW_INDEX_STRESS_COUNTS=$(STRESS_COUNTS) $(PY) -m pytest -q -p no:cacheprovider --timeout=1800 tests/stress

lint: $(STAMP)
	$(VENV)/bin/ruff check indexer search api tests benchmarks tools
	$(VENV)/bin/mypy

# offline audit: installed security-sensitive packages against tools/safe-versions.toml (pip-audit too with
# NSFW_INDEX_AUDIT_ONLINE=1)
audit: $(STAMP)
	$(PY) tools/audit_deps.py

demo: $(STAMP)
	$(PY) -m indexer.demo

clean-venv:
	rm -rf $(VENV)
