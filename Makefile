# The two commands of the README, plus the setup they both run first.
#   make demo   -- the main job on the built-in example data (results in fem_anode_demo/)
#   make test   -- the full test suite, serially and under `mpirun -n 2`
.PHONY: demo test setup clean

OUT ?= fem_anode_demo

demo: setup
	.venv/bin/fem-anode demo --out $(OUT)

test:
	bash scripts/test.sh

setup:
	bash scripts/setup.sh

clean:
	rm -rf .venv fem_anode_demo .pytest_cache
