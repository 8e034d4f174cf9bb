# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo
# torch==2.13.0 first: on these machines it is a CPU build already on disk; `torch>=2.4` in
# pyproject then installs nothing more (an unpinned torch would pull a multi-GB CUDA build).
TORCH ?= torch==2.13.0

.PHONY: venv demo demo-store test lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

$(DEMO)/model/config.json: | venv
	$(BIN)/stride demo-assets --out $(DEMO)

$(DEMO)/store/manifest.json: $(DEMO)/model/config.json
	$(BIN)/stride build --model $(DEMO)/model --data $(DEMO)/corpus.jsonl --out $(DEMO)/store

demo-store: $(DEMO)/store/manifest.json

demo: demo-store
	$(BIN)/stride attribute --store $(DEMO)/store --prompt "$$(head -1 $(DEMO)/queries.jsonl | $(BIN)/python -c 'import json,sys; print(json.load(sys.stdin)["prompt"])')" \
		--completion "$$(head -1 $(DEMO)/queries.jsonl | $(BIN)/python -c 'import json,sys; print(json.load(sys.stdin)["completion"])')" --top-k 5

test: venv
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(DEMO) $(VENV) .pytest_cache
