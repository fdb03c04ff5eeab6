# Two commands for a fresh machine with Python 3.11+ and make: `make demo` and `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: demo test lint run clean check-deploy

$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

demo: $(VENV)/.installed  ## sample databases, the service, and curl commands to try
	$(PYTHON) demo.py

test: $(VENV)/.installed lint  ## lint, then every test against real PostgreSQL
	$(PYTHON) -m pytest tests/ -v

# The service modules, which mypy checks: every top-level module but the demo and the gunicorn settings.
SERVICE_MODULES := $(filter-out demo.py gunicorn.conf.py,$(wildcard *.py))

lint: $(VENV)/.installed  ## ruff, and mypy --strict on the service modules
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy $(SERVICE_MODULES)

check-deploy: $(VENV)/.installed  ## hadolint, kustomize + kubernetes-validate, skaffold.yaml, promtool
	bash .ci/deploy-checks

run: $(VENV)/.installed  ## the production command, configured from the environment
	$(VENV)/bin/gunicorn consistency_manager_svc:app

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache .mypy_cache
