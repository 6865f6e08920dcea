# Two commands do all the set-up on a fresh clone:
#   make demo   create .venv if needed, install, train the default model on the built-in task
#   make test   create .venv if needed, install, lint and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The tests also compile for a TPU topology (extra aot: libtpu) and convert Marian models
# (extra interop: the CPU build of torch and transformers).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,aot,interop]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) train.py --config configs/default.py --workdir $(WORKDIR)

lint: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q -n 2 tests

# Throughput benchmarks (PyTorch peer from the bench extra); results in bench/results/.
bench: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/train_throughput.py --config small --json bench/results/train_throughput_small.json
	$(PY) bench/train_throughput.py --config base --json bench/results/train_throughput_base.json
	$(PY) bench/decode_speed.py
	$(PY) bench/data_throughput.py --json bench/results/data_throughput.json
	$(PY) bench/make_tables.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
