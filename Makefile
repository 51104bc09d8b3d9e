# Two entry points on a fresh machine: `make demo` and `make test` (both create .venv if missing).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-random lint install clean-venv bench

$(STAMP): pyproject.toml requirements/cpu.txt requirements/offline.txt requirements/offline-nodeps.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements/cpu.txt
	$(BIN)/pip install -q -r requirements/offline.txt
	$(BIN)/pip install -q --no-deps -r requirements/offline-nodeps.txt
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q -e '.[llamacpp]' || echo "llama-cpp-python could not be built; tests/test_llamacpp.py will skip"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	if [ -d runs/demo ]; then rm -rf runs/demo.prev && mv runs/demo runs/demo.prev; fi
	$(BIN)/altlm train --config sentiment-demo output_dir=runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -p no:randomly  # two workers, a test file each; fixed order

test-random: $(STAMP)  # the suite in a random order; pytest-randomly prints its seed, `make test-random SEED=N` replays it
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -p randomly $(if $(SEED),--randomly-seed=$(SEED))

lint: $(STAMP)  # ruff (pyproject.toml [tool.ruff]): the linter and the formatter's check
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean-venv:
	rm -rf $(VENV)
