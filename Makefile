# make demo: a small study end to end on this machine; make test: the test suite.
# Both (re)create .venv when it is missing or pyproject.toml changed since it was built.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

# A second `make demo` continues the study in $(DEMO_OUT) (a finished one is kept as it is).
DEMO_OUT ?= results/demo
demo: $(STAMP)
	$(VENV)/bin/python -m study.sweep --preset smoke --out $(DEMO_OUT) \
		$$(test -e $(DEMO_OUT)/study.json && echo --resume)
	$(VENV)/bin/python -m analysis.figures $(DEMO_OUT)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) results
