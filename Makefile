# The two commands of the README, and a few helpers. `make setup` reuses the environment when
# the dependencies did not change (seconds), so every target can depend on it.
PY := .venv/bin/python

.PHONY: setup demo test test-all lint clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/debm train --config configs/digits_wgcn.yaml --workers 2

test: setup
	$(PY) -m pytest -q -m "not slow" --timeout=600

test-all: setup
	$(PY) -m pytest -q --timeout=1200

lint: setup
	.venv/bin/ruff check distributed_ebm tests scripts benchmarks jobs

clean:
	rm -rf runs .pytest_cache .ruff_cache
