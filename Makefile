# The two first commands of the README. Both set up .venv first when it is missing or stale.
.PHONY: setup demo test bench
setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/geovae demo --out geovae-demo

test: setup
	.venv/bin/python -m pytest -q -n 2 --dist loadfile

bench: setup
	.venv/bin/python -m benchmarks
