# The two commands of the README, plus the setup they both run first.
#   make demo   -- the main job on the built-in example data (results in fem_anode_demo/)
#   make test   -- the full test suite, serially and under `mpirun -n 2`
#   make lint   -- ruff (lint of fem_anode/, format check of all Python code) and mypy on fem_anode/
.PHONY: demo test lint setup clean

OUT ?= fem_anode_demo

demo: setup
	.venv/bin/fem-anode demo --out $(OUT)

test:
	bash scripts/test.sh

lint: setup
	.venv/bin/ruff check fem_anode
	.venv/bin/ruff format --check fem_anode tests demos benchmarks scripts
	.venv/bin/python -m mypy

setup:
	bash scripts/setup.sh

clean:
	rm -rf .venv fem_anode_demo .pytest_cache
