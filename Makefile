# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

.PHONY: demo test unit clean
demo: $(VENV)/.installed
	$(VENV)/bin/pg-tenant-proxy demo

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

unit: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q tests/unit

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
