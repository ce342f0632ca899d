# The two commands of the README:  `make run` (the main job) and `make test` (the tests).
# Both create or reuse the virtualenv $(VENV) and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned, so nothing else pulls a multi-GB CUDA build onto a CPU machine. On a machine
# without this release on disk, point pip at PyTorch's CPU wheel index with TORCH_PIP_ARGS.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EXTRAS ?= dev,offline,mteb
# Test files run this many at a time (pytest-xdist), each file whole on one worker (a module's cluster
# fixture starts once). Two keep a 2-core machine busy: most of an end-to-end test is waiting on Ray.
TEST_WORKERS ?= 2

.PHONY: install run test lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m hbt_ray.tune $(ARGS)

lint: install
	$(PY) -m ruff check hbt_ray tests scripts

test: install lint
	$(PY) -m pytest -q -x --durations=30 -n $(TEST_WORKERS) --dist loadfile tests hbt_ray $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
