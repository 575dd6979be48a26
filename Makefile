# The two newcomer commands: `make demo` and `make test`. Both set up what they need, idempotently.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-slow unit lint bench clean-lab

setup: $(STAMP)
	@bash scripts/setup-host.sh
	@$(PY) -m kvmotion.guest.image

$(STAMP): pyproject.toml requirements.lock kvmotion/__init__.py
	@bash scripts/setup-host.sh
	@test -x $(PY) || /usr/bin/python3 -m venv $(VENV)
	@$(PIP) install -q --disable-pip-version-check -c requirements.lock -e '.[test]'
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/kvmotion demo

test: setup lint
	$(VENV)/bin/pytest -q -m "not slow" --durations=25

# The soak runs and variants `make test` leaves out to stay within 30 minutes (about 7 more).
test-slow: setup
	$(VENV)/bin/pytest -q -m slow --durations=25

# Import layers and cycles (import-linter, contracts in pyproject.toml), ruff, mypy: seconds, before any test.
lint: $(STAMP)
	$(VENV)/bin/lint-imports --no-logo
	$(VENV)/bin/ruff check kvmotion tests bench
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(VENV)/bin/pytest -q tests/unit

bench: setup
	$(PY) bench/boot.py
