# Two commands that work on a fresh machine: `make demo` (the main job on CPU, end to end; `make demo TASK=code`
# for the code demo) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast clean

setup:
	@tools/setup_env.sh $(VENV)

demo: setup
	$(PY) -m oapl_megatron.entrypoints.demo $(if $(TASK),--task $(TASK)) $(ARGS)

test: setup
	@start=$$(date +%s); \
	$(PY) -m pytest tests --durations=25 $(PYTEST_ARGS); rc=$$?; \
	echo "[make test] total time: $$(( $$(date +%s) - start )) s (exit $$rc)"; exit $$rc

test-fast: setup
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
