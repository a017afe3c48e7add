# Shorthands for the README's commands; .ci/bootstrap does the work (and installs what is missing).
.PHONY: setup test demo bench lint
setup: ; bash .ci/bootstrap setup
test: ; bash .ci/bootstrap test
demo: ; bash .ci/bootstrap demo
bench: ; bash .ci/bootstrap bench
lint: ; .venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy
