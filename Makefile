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
	# SAEBench's code for tests/test_saebench.py, without its pins (numpy<2, datasets<4, a
	# torchvision that upgrades torch): its core eval needs none of them (docs/saebench.md).
	$(PY) -m pip install -q --no-deps "sae-bench==0.6.0"
	# The browser tests (tests/test_explore_site.py) drive Debian's Chromium with Playwright.
	test -x /usr/bin/chromium || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
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
