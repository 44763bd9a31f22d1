# The two first commands of the README, and the developers' ones. Each sets up .venv first
# when it is missing or stale.
.PHONY: setup demo test lint bench
setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/geovae demo --out geovae-demo

test: setup
	.venv/bin/python -m pytest -q -n 2 --dist loadfile

# The house rules: ruff's lint and format, and mypy on geovae/ (configured in pyproject.toml)
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

bench: setup
	.venv/bin/python -m benchmarks
