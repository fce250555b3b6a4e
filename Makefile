# Two entry points for newcomers: `make demo` and `make test`. Both create/reuse .venv and install pinned deps.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-test.txt constraints.txt setup.py | md5sum | cut -c1-12)

.PHONY: venv demo test bench clean

$(STAMP): requirements.txt requirements-test.txt constraints.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip==26.3"
	$(PY) -m pip install -q -r requirements-test.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-* && touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qwen2vl-ap demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
