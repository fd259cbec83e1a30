# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; on a GPU machine set TORCH_SPEC to the build you want.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/hsae demo

test: $(VENV)/.installed
	$(VENV)/bin/ruff check hsae tests benchmarks
	$(VENV)/bin/python -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check hsae tests benchmarks
	$(VENV)/bin/ruff format --check hsae tests benchmarks

clean:
	rm -rf $(VENV) demo_out
