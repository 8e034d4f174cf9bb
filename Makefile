# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo
# torch==2.13.0 first: on these machines it is a CPU build already on disk; `torch>=2.4` in
# pyproject then installs nothing more (an unpinned torch would pull a multi-GB CUDA build).
TORCH ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv demo demo-store serve browser test fuzz lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

# Times: README "Set-up: two commands" (measured; a loaded machine takes several times longer).
$(DEMO)/model/config.json: | venv
	@echo "== make demo 1/3: training the demo model (about 1 min on a quiet 2-core machine; progress every 5 s)"
	$(BIN)/stride demo-assets --out $(DEMO)

# the demo's build options are in $(DEMO)/build.json (stride/demo.py's DEMO_BUILD: 100 visits, and why);
# one thread: 41 s of CPU against ~235 s on two threads at load 13 (stride/demo.py's one_thread)
$(DEMO)/store/manifest.json: $(DEMO)/model/config.json
	@echo "== make demo 2/3: building the operator store (about 1 min on a quiet 2-core machine; progress every 5 s)"
	OMP_NUM_THREADS=1 $(BIN)/stride build --model $(DEMO)/model --data $(DEMO)/corpus.jsonl --out $(DEMO)/store --config $(DEMO)/build.json

demo-store: $(DEMO)/store/manifest.json

# `make demo`: build the embedded default, answer one query in-process, then serve it over HTTP
demo: demo-store
	@echo "== make demo 3/3: one query in-process (the first compiles the solver: 20-50 s, cached after), then the service"
	$(BIN)/stride attribute --store $(DEMO)/store --prompt "$$(head -1 $(DEMO)/queries.jsonl | $(BIN)/python -c 'import json,sys; print(json.load(sys.stdin)["prompt"])')" \
		--completion "$$(head -1 $(DEMO)/queries.jsonl | $(BIN)/python -c 'import json,sys; print(json.load(sys.stdin)["completion"])')" --top-k 5
	$(MAKE) --no-print-directory serve

# the service on the embedded default (STRIDE_REDIS_URL, STRIDE_API_KEYS ... pass through)
serve: demo-store
	@$(BIN)/python -m app.examples $(DEMO)/queries.jsonl http://$(HOST):$(PORT)
	@echo "  or open the dashboard in a browser: http://$(HOST):$(PORT)/ui"
	@echo
	$(BIN)/stride serve --store $(DEMO)/store --host $(HOST) --port $(PORT)

# Debian's chromium for the dashboard's browser tests (Playwright drives it; it never downloads a
# browser): installed when missing and we are root, else tests/test_ui.py skips (fails under CI=true)
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
		echo "no chromium: tests/test_ui.py will skip (apt-get install chromium chromium-driver)"

test: venv browser
	$(BIN)/python -m pytest

# schemathesis against a real `stride serve`, with and without API keys (also part of `make test`);
# STRIDE_FUZZ_EXAMPLES=N for more cases per operation
fuzz: venv
	$(BIN)/python -m pytest tests/test_fuzz.py

lint: venv
	$(BIN)/ruff check .

# The reference benchmark (bench/README.md). The torch pin keeps kronfluence's torchvision
# requirement from pulling a newer (CUDA) torch. PyPI's torchvision then fails to import beside the
# CPU torch ("operator torchvision::nms does not exist"), which breaks transformers' model imports;
# kronfluence never imports it, so a torchvision that does not import is removed.
bench: venv
	$(BIN)/python -m pip install -q "$(TORCH)" -e '.[bench]'
	$(BIN)/python -c 'import torchvision' 2>/dev/null || $(BIN)/python -m pip uninstall -q -y torchvision
	$(BIN)/python -m bench

clean:
	rm -rf $(DEMO) $(VENV) .pytest_cache
