# Two entry points: `make demo` (the whole method on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: venv demo test test-readme lint bench clean mutation chromium

$(BIN)/lvlmlp: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/lvlmlp

venv: $(BIN)/lvlmlp

demo: venv
	$(BIN)/lvlmlp demo --out demo_out

test: venv
	$(BIN)/ruff check src tests bench scripts examples
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not readme" tests  # see tests/conftest.py

# The README's commands as written, the whole demo first (tests/test_readme.py; ~2.5 min): CI runs it after `make test`.
test-readme: venv
	$(BIN)/python -m pytest -q -m readme tests/test_readme.py

lint: venv
	$(BIN)/ruff check src tests bench scripts examples

bench: venv
	$(BIN)/python bench/extract_throughput.py
	$(BIN)/python bench/probe_speed.py

# Mutation testing of the core modules (slow; not part of `make test`): writes docs/mutation-report.md.
mutation: venv
	$(BIN)/pip install -q -e '.[mutation]'
	$(BIN)/python scripts/mutation.py $(MODULES)

# Headless Chromium for the report-rendering test (tests never install software themselves).
chromium:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

clean:
	rm -rf $(VENV) demo_out
