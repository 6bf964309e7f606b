# spade-stream: the commands a newcomer needs. `make demo` and `make test` each install what they need.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install system-deps demo test test-fast bench clean

install:
	$(PIP) install -q -e '.[test]'

system-deps:  # redis-server and GStreamer's RTSP server for the tests (Debian; needs root)
	bash .ci/install_system_deps.sh

demo: install
	$(PYTHON) run_stream.py demo --out demo_out

test: install
	$(PYTHON) -m pytest -q

test-fast: install  # skips the slow end-to-end pipeline tests
	$(PYTHON) -m pytest -q -m "not slow"

bench: install
	$(PYTHON) benchmarks/bench_pipeline.py --json benchmarks/out/pipeline.json

clean:
	rm -rf demo_out runs benchmarks/out .pytest_cache
