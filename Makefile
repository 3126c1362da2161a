# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv when missing. torch goes in first, from its pinned CPU build,
# and constraints.txt keeps every later install from replacing it with a CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROFILE ?= demo
# A wheel set (`make wheels`) makes later set-ups install from local files; used when present.
WHEELS ?= $(HOME)/.cache/psamf/wheels
FIND_LINKS := $(if $(wildcard $(WHEELS)/*.whl),--find-links $(WHEELS),)

.PHONY: venv demo test clean wheels

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(FIND_LINKS) torch==2.13.0
	$(BIN)/python -m pip install -q $(FIND_LINKS) -c constraints.txt -e '.[dev]'
	touch $@

wheels: venv
	$(BIN)/python -m pip wheel -q -c constraints.txt -w $(WHEELS) torch==2.13.0 '.[dev]'

demo: venv
	$(BIN)/psamf demo --profile $(PROFILE)

test: venv
	$(BIN)/python -m pytest -q

# dvc.yaml's vars follow params.yaml with its profile merged: the LOO rank slots (DVC's foreach
# cannot count) and the corpus-named paths (DVC reads only params.yaml's top-level keys).
dvc_vars.yaml: params.yaml | venv
	$(BIN)/psamf dvc-vars --out $@

clean:
	rm -rf data/raw data/prepared reports models mlruns.db mlartifacts
