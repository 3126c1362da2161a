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

.PHONY: venv demo test browser clean wheels

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

# One pytest worker per core (pytest-xdist), a file to a worker: module fixtures are built once.
test: venv browser
	$(BIN)/python -m pytest -q -n auto --dist loadfile

# The browser tests (MLflow UI, the personalization page) drive Debian's headless Chromium; they
# skip without it. Installed when missing and apt can (root); otherwise say so and go on.
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null; } || echo "chromium not installed: the browser tests will skip" >&2

# dvc.yaml's vars follow params.yaml with its profile merged: the LOO rank slots (DVC's foreach
# cannot count) and the corpus-named paths (DVC reads only params.yaml's top-level keys).
dvc_vars.yaml: params.yaml | venv
	$(BIN)/psamf dvc-vars --out $@

clean:
	rm -rf data/raw data/prepared reports models mlruns.db mlartifacts
