# spade-stream: the commands a newcomer needs. `make demo` and `make test` each install what they need.
# Outside a virtualenv ($VIRTUAL_ENV unset) they create .venv once (python3 -m venv) and install into it;
# inside one they use it. PYTHON=/path/to/python overrides both.
VENV := .venv
ifdef VIRTUAL_ENV
PYTHON ?= $(VIRTUAL_ENV)/bin/python
else
PYTHON ?= $(VENV)/bin/python
endif
PIP ?= $(PYTHON) -m pip

# .venv is created only when it is the interpreter in use
ifeq ($(PYTHON),$(VENV)/bin/python)
VENV_DEP := $(VENV)/bin/pip
endif

.PHONY: install system-deps demo test test-all lint format bench clean distclean

# bin/pip is the last thing `python3 -m venv` makes: a venv left half-made (no ensurepip) is redone
$(VENV)/bin/pip:
	@python3 -m venv $(VENV) || { echo "make: 'python3 -m venv $(VENV)' failed (Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }

install: $(VENV_DEP)
	$(PIP) install -q -e '.[test]'

system-deps:  # redis-server and GStreamer's RTSP server for the tests (Debian; needs root)
	bash .ci/install_system_deps.sh

demo: install
	$(PYTHON) run_stream.py demo --out demo_out

test: install  # the fast suite: everything but the tests marked slow
	$(PYTHON) -m pytest -q -m "not slow"

test-all: install  # the whole suite, as CI runs it (.ci/run)
	$(PYTHON) -m pytest -q

lint: install  # ruff's formatter (check only) and linter over the tree, mypy over configs/ sinks/ detector/
	$(PIP) install -q 'ruff>=0.6' 'mypy>=1.10'
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy

format: install  # rewrite the tree in ruff's format and apply its safe fixes
	$(PIP) install -q 'ruff>=0.6'
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

bench: install
	$(PYTHON) benchmarks/bench_pipeline.py --json benchmarks/out/pipeline.json

clean:
	rm -rf demo_out runs benchmarks/out .pytest_cache

distclean: clean  # also removes the virtualenv that make created
	rm -rf $(VENV)
