# Every target creates .venv itself, so a fresh clone needs nothing but python3 >= 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
PYTEST_ARGS ?=

.PHONY: venv demo test test-integration check fmt bench chaos clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/fundgate demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# the tests that need PostgreSQL, e.g. against a server: FUNDGATE_TEST_DATABASE_URL=postgresql://... make test-integration
test-integration: $(STAMP)
	$(BIN)/python -m pytest -q -m "integration or e2e" $(PYTEST_ARGS)

check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

# every benchmark of docs/benchmarks.md with modest durations (about ten minutes on two
# cores); each also runs alone, with the commands and options given there. Not part of `test`.
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.intake --duration 10 --warmup 3
	$(BIN)/python -m bench.intake --scale 1,2,3 --duration 10 --warmup 3 --no-baselines
	$(BIN)/python -m bench.intake --hot-limit --duration 8 --warmup 2
	$(BIN)/python -m bench.e2e --scale 1,2,3 --duration 10 --warmup 3
	$(BIN)/python -m bench.vouchers --events 100000 --events 1000000
	$(BIN)/python bench/recon.py --lines 300000

# the full chaos run of docs/reliability.md; repeat one with: make chaos CHAOS_ARGS="--seed S"
chaos: $(STAMP)
	$(BIN)/python -m bench.chaos --count 2000 --gateways 2 --kills 5 $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .fundgate .pytest_cache .mypy_cache .ruff_cache
