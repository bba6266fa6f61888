# Two entry points: `make demo` and `make test`. Both create .venv and install everything first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# The CPU build of torch is installed first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: install demo test browser crosscheck clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The paper's grid at CPU scale (a baseline, local and global x k in {2, 8}), every evaluation and the report;
# docs/results.md is then rewritten from the run's records.
demo: $(STAMP)
	$(BIN)/selfablate reproduce --preset cpu-small --ks 2,8 --out runs/demo
	$(BIN)/selfablate report runs/demo --results docs/results.md

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# Debian's Chromium renders report.html, and ChromeDriver lets a test click through explorer.html; without
# them (no root, no apt) those tests are skipped.
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium and chromium-driver (for the report and explorer tests)"; \
	  { apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && \
	    apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; }; } || \
	  echo "no chromium: the report's and the explorer's browser tests will be skipped"; }

# Cross-checks against auto-circuit (the paper's tool) and SAELens, and the TransformerLens interop
# tests, in a venv of their own: auto-circuit needs transformer-lens 2.18, numpy < 2 and pyarrow < 23
# (about 2.5 GB).
CROSS := .venv-crosscheck
crosscheck:
	test -x $(CROSS)/bin/python || $(PY) -m venv $(CROSS)
	$(CROSS)/bin/pip install -q $(TORCH)
	$(CROSS)/bin/pip install -q 'auto-circuit==1.0.1' 'transformer-lens==2.18.*' 'numpy<2' 'pyarrow<23'
	$(CROSS)/bin/pip install -q 'sae-lens==6.54.*' pytest 'numpy<2' 'pyarrow<23'
	$(CROSS)/bin/pip install -q -e .
	$(CROSS)/bin/python -m pytest -q tests/test_interop.py
	$(CROSS)/bin/python benchmarks/crosscheck_auto_circuit.py
	cd benchmarks && ../$(CROSS)/bin/python crosscheck_authors_prompts.py
	$(CROSS)/bin/python benchmarks/crosscheck_saelens.py

clean:
	rm -rf $(VENV) $(CROSS) runs .pytest_cache
