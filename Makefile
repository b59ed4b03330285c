# Everything a newcomer or CI types. `make test` needs python3, make, Node.js and npm.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The interpreters `make test-all` checks, by pyenv version prefix.
PYTHONS ?= 3.9 3.10 3.11 3.12 3.13
# Azurite (Microsoft's Azure Storage emulator) for the fleet tests, from tools/package-lock.json.
AZURITE := tools/node_modules/.bin/azurite-blob

.PHONY: help venv azurite lint test test-all reliability bench emulator demo install uninstall clean

help:
	@echo "make test      lint, type-check and run the tests in $(VENV) (installs Azurite with npm)"
	@echo "make test-all  run the tests on every Python in PYTHONS ($(PYTHONS)) found by pyenv"
	@echo "make reliability  the fault suite (tests/reliability): crashes, IMDS faults, hostile input"
	@echo "make bench     benchmarks against the emulator; writes bench/results.json"
	@echo "make demo      the whole lifecycle of an event against the emulator, in seconds"
	@echo "make emulator  serve the IMDS emulator on 127.0.0.1:8254"
	@echo "make install   (as root) install the agent under /opt and enable its systemd service"
	@echo "make uninstall (as root) remove it, keeping /etc/scheduled-events-agent and the state"
	@echo "make clean     remove $(VENV) and caches"

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

# Needs Node.js and npm (.ci/run installs them when missing).
$(AZURITE): tools/package.json tools/package-lock.json
	npm ci --prefix tools --no-audit --no-fund --loglevel=error
	touch $@

azurite: $(AZURITE)

lint: venv
	$(BIN)/ruff check agent tests demo bench
	$(BIN)/ruff format --check agent tests demo bench
	$(BIN)/mypy --strict agent

test: lint azurite
	$(BIN)/pytest

reliability: venv
	$(BIN)/pytest -o addopts="-ra --strict-markers" tests/reliability

bench: venv
	$(BIN)/python bench/bench.py

# Tests only (linters are pinned to the default interpreter), in one venv per version.
test-all: azurite
	@set -e; for version in $(PYTHONS); do \
	  interpreter=$$(ls -d $$HOME/.pyenv/versions/$$version*/bin/python3 2>/dev/null | head -n1); \
	  if [ -z "$$interpreter" ]; then echo "== Python $$version: not installed, skipped"; continue; fi; \
	  echo "== $$($$interpreter --version)"; \
	  $$interpreter -m venv .venv-$$version; \
	  .venv-$$version/bin/python -m pip install --quiet -e '.[test]'; \
	  .venv-$$version/bin/python -m pytest -q -p no:cacheprovider; \
	done

demo: venv
	$(BIN)/python demo/demo.py

emulator: venv
	$(BIN)/scheduled-events-agent emulator

install:
	systemd/install.sh

uninstall:
	systemd/install.sh --uninstall

clean:
	rm -rf $(VENV) .venv-3.* .mypy_cache .pytest_cache .ruff_cache .hypothesis *.egg-info
