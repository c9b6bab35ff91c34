# AI Cash Evolution — every command a developer or CI needs.
# `make up` runs the system, `make test` runs the suite; both create .venv and install on a fresh machine.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?= indicators,predictor,trainer,local,dev
comma := ,
# Installs come from uv.lock (exact versions and hashes for every extra); `make lock` updates it after a
# change to pyproject.toml. uv itself is bootstrapped with pip into var/tools, pinned here.
UV_VERSION := 0.13.9
UV := var/tools/uv-$(UV_VERSION)/bin/uv
# uv uses the interpreter found below and never downloads one (these machines reach PyPI only).
export UV_PYTHON_DOWNLOADS := never

# Python 3.12 (pandas-ta needs >= 3.12; pgserver and TensorFlow ship 3.12 wheels): $(PYTHON) if given, then
# python3.12 on PATH, then pyenv's 3.12 installs, then 3.13 (uv.lock is resolved for 3.12 only, see
# [tool.uv] in pyproject.toml: `uv sync` refuses another version and says so). pyenv shims print
# "command not found" unless their version is selected, so each candidate is run, not just located.
define find_python
ok() { "$$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }; \
pyenv_py() { command -v pyenv >/dev/null 2>&1 || return 0; \
  for v in $$(pyenv versions --bare 2>/dev/null | grep -E "^$$1(\.[0-9]+)?$$" | sort -rV); do \
    echo "$$(pyenv prefix $$v)/bin/python3"; done; }; \
for c in "$(PYTHON)" python3.12 $$(pyenv_py 3.12) python3.13 $$(pyenv_py 3.13) python3; do \
  [ -n "$$c" ] || continue; \
  if ok "$$c"; then command -v "$$c" 2>/dev/null || echo "$$c"; exit 0; fi; \
done; \
echo "no Python >= 3.12 found (pandas-ta needs it): install 3.12 or run make PYTHON=/path/to/python3.12" >&2; exit 1
endef

.PHONY: install up test lint bench fmt clean migrate quality-report lock

$(UV):
	@py="$$( $(find_python) )" || exit 1; \
	"$$py" -m pip install -q --disable-pip-version-check --target var/tools/uv-$(UV_VERSION) uv==$(UV_VERSION)

# `uv sync --frozen` installs exactly what uv.lock says (and fails if the lock is missing an extra);
# the project itself is installed editable, as `pip install -e` did.
$(VENV)/.installed: pyproject.toml uv.lock | $(UV)
	@py="$$( $(find_python) )" || exit 1; \
	echo "using $$py"; \
	$(UV) sync --frozen --quiet --python "$$py" $(foreach e,$(subst $(comma), ,$(EXTRAS)),--extra $(e)) && touch $@

install: $(VENV)/.installed

# Re-resolve uv.lock after editing pyproject.toml (tests/infra/test_lock.py fails while they disagree).
lock: | $(UV)
	@py="$$( $(find_python) )" || exit 1; \
	$(UV) lock --python "$$py"

up: install
	$(PY) -m shared.devstack up $(UP_ARGS)

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

# wrk (Debian) generates the load of the predictor benchmark. `make bench ARGS="--only bench_backtest"` reruns
# single benchmarks and replaces their sections only.
bench: install
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq wrk >/dev/null; } || \
	  { echo "make bench needs wrk: apt-get install wrk" >&2; exit 1; }
	$(PY) -m benchmarks.run $(ARGS)

# docs/MODEL_QUALITY.md from the sample data (a scratch database on DATABASE_URL's server, or an embedded one).
quality-report: install
	$(PY) scripts/model_quality_report.py

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache

# Which interpreter .venv would be made with.
which-python:
	@$(find_python)
