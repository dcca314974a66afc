# The two set-up-and-run commands of the README. Both create/reuse .venv via .ci/bootstrap.
PY := .venv/bin/python
OUT ?= out

.PHONY: demo test lint bench gpu-check

demo:
	@.ci/bootstrap
	$(PY) -m lycoris_core demo --out $(OUT)

test:
	@.ci/bootstrap
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected: failing" >&2; exit 1; fi; exit $$rc

lint:
	@.ci/bootstrap
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(dir $(PY))lint-imports

bench:
	@.ci/bootstrap
	$(PY) bench/apply.py
	$(PY) bench/sampling.py
	$(PY) bench/train.py

# On a CUDA machine: the GPU tests (figures land in $$OUT or bench/results).
gpu-check:
	@.ci/bootstrap
	$(PY) -m pytest -q tests/gpu
	$(PY) bench/flux_memory_gpu.py
