# Two commands for a fresh machine with Python 3.11+ and make: `make demo` and `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: demo test lint docs browser promtool run clean check-deploy screenshots

$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

demo: $(VENV)/.installed  ## sample databases, the service, and curl commands to try
	$(PYTHON) demo.py

test: $(VENV)/.installed lint browser promtool  ## lint, then every test against real PostgreSQL, pages in a real browser
	$(PYTHON) -m pytest tests/ -v

# Headless Chromium for tests/browser/: Debian's package where apt-get works, else Playwright's own download.
browser: $(VENV)/.installed
	@$(PYTHON) -c "from devkit.browser import chromium; raise SystemExit(chromium() is None)" || \
	    (apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1)) || \
	    $(PYTHON) -m playwright install chromium

# promtool for tests/test_dashboard.py (and .ci/deploy-checks): Debian's prometheus package ships it; its server is
# never started here.
promtool:
	@command -v promtool >/dev/null || \
	    apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
	    (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends prometheus >/dev/null)

# The service modules, which mypy checks: every top-level module but the demo and the gunicorn settings.
SERVICE_MODULES := $(filter-out demo.py gunicorn.conf.py,$(wildcard *.py))

lint: $(VENV)/.installed  ## ruff, and mypy --strict on the service modules
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy $(SERVICE_MODULES)

# The site (mkdocs.yml, docs/) into site/. --strict: a broken link or anchor, or a page missing from the nav, fails
# (and no --quiet, which would hide the warnings --strict counts).
docs: $(VENV)/.installed  ## the documentation site, built with --strict into site/
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict

screenshots: $(VENV)/.installed browser  ## the console's pictures in docs/images (README, docs/console.md), taken by its browser tests
	SCREENSHOTS=docs/images $(PYTHON) -m pytest tests/browser/test_console_pictures.py -q

check-deploy: $(VENV)/.installed  ## hadolint, kustomize + kubernetes-validate, skaffold.yaml, promtool
	bash .ci/deploy-checks

run: $(VENV)/.installed  ## the production command, configured from the environment
	$(VENV)/bin/gunicorn consistency_manager_svc:app

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache .mypy_cache site
