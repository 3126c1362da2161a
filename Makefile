# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv when missing. torch goes in first, from its pinned CPU build,
# and constraints.txt keeps every later install from replacing it with a CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROFILE ?= demo

.PHONY: venv demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

demo: venv
	$(BIN)/psamf demo --profile $(PROFILE)

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf data/raw data/prepared reports models mlruns.db mlartifacts
