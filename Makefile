# AI Cash Evolution — every command a developer or CI needs.
# `make up` runs the system, `make test` runs the suite; both create .venv and install on a fresh machine.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?= indicators,predictor,trainer,local,dev

# A Python >= 3.12 that actually runs: $(PYTHON) if given, then python3.13/python3.12 on PATH (pyenv shims
# print "command not found" unless the version is selected, so each candidate is run, not just located),
# then pyenv's own 3.12/3.13 installs.
define find_python
for c in "$(PYTHON)" python3.13 python3.12 python3; do \
  [ -n "$$c" ] || continue; \
  if "$$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then command -v "$$c" || echo "$$c"; exit 0; fi; \
done; \
if command -v pyenv >/dev/null 2>&1; then \
  for v in $$(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])(\.[0-9]+)?$$' | sort -rV); do \
    p="$$(pyenv prefix $$v)/bin/python3"; \
    if "$$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then echo "$$p"; exit 0; fi; \
  done; \
fi; \
echo "no Python >= 3.12 found: install one (pandas-ta needs it) or run make PYTHON=/path/to/python3.12" >&2; exit 1
endef

.PHONY: install up test lint bench fmt clean migrate

$(VENV)/.installed: pyproject.toml
	@py="$$( $(find_python) )" || exit 1; \
	echo "using $$py"; \
	[ -x $(PY) ] || "$$py" -m venv $(VENV); \
	$(PY) -m pip install -q --upgrade pip && \
	$(PY) -m pip install -q -e '.[$(EXTRAS)]' && touch $@

install: $(VENV)/.installed

up: install
	$(PY) -m shared.devstack up

# nginx, promtool and docker-compose (config checks) come from Debian when missing; see scripts/.
test: install
	./scripts/ensure-system-tools.sh
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) -m benchmarks.run

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
