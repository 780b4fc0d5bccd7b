# Two entry points (see README): `make demo` runs the whole pipeline on the
# embedded corpus, `make test` runs the test suite. Both install into .venv.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# The CPU build of torch (a wheel the development machines keep on disk); GPU users set
# TORCH_SPEC to their own (e.g. TORCH_SPEC='torch>=2.6').
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: install
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q
