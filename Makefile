# Two commands: `make run` installs and runs the whole service on this host; `make test` runs
# the test suite. Both need only Python 3.11 (python3.11 -m venv) and, for tests, DCMTK.
PYTHON ?= python3.11
VENV ?= .venv
EXTRAS ?= cpu

.PHONY: run test pytest install lint

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

run: install
	$(VENV)/bin/pacs-ai run

# Lint, type-check, then the suite on whatever DATABASE_URL / CELERY_BROKER_URL say (embedded
# SQLite and filesystem queue by default), in a throwaway data directory.
test: pytest
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

pytest:
	$(MAKE) install EXTRAS=dev,cpu
	data=$$(mktemp -d) && PACS_AI_DATA_DIR=$$data $(VENV)/bin/pytest $(PYTEST_ARGS); \
	status=$$?; rm -rf "$$data"; exit $$status

lint:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
