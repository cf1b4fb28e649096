# The two commands of the README: `make run` and `make test`.
# Each one creates .venv (project + test dependencies) when it is missing or
# when the packaging files changed; otherwise it goes straight to work.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sesame-installed

.PHONY: run test lint proto bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" 2>/dev/null || true
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/sesame hub

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

proto: $(STAMP)
	$(BIN)/python -m sesame._regen

bench: $(STAMP)
	$(BIN)/python bench/grpc_tunnel.py

clean:
	rm -rf $(VENV) build *.egg-info
