# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv (torch==2.13.0, the CPU wheel on CPU machines) and install the project.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-gpu bench clean

setup: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m megatron_hybrid demo

# One worker per core at one thread each: most tests are single-threaded Python and subprocess
# starts, so two workers finish the suite sooner than one at two threads. A test file stays on
# one worker (its module fixtures are made once); the prune runs are shared between workers.
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile

# On a GPU machine with the cuda backend's packages (docs/gpu.md); a bare one: tools/gpu_check/run.sh
test-gpu:
	$(PYTHON) -m pytest -m gpu tests/gpu -q -rA

clean:
	rm -rf $(VENV) runs
