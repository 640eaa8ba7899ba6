# xtransit: the README's commands. Everything runs as root on Debian 12.
PY      := .venv/bin/python
PYTEST  := .venv/bin/pytest

.PHONY: setup test demo bench check lint clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PYTEST) -q

demo: setup
	$(PY) -m pipeline.demo

bench: setup
	$(PYTEST) bench -q --benchmark-enable --benchmark-only -p no:cacheprovider

lint: setup
	.venv/bin/ruff check pipeline tests bench

clean:
	rm -rf build *.egg-info pipeline/*.so native/_*.c native/*.o .pytest_cache
