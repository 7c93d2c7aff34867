# Two commands do all setup on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned here, not in pyproject.toml: torch==2.13.0 is the CPU build available offline on the reference machine.
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
# PPO lives in trl.experimental.ppo only in trl 1.0-1.12 (removed in 1.13): `make test-ppo` tests it in its own venv.
VENV_PPO ?= .venv-ppo
PY_PPO := $(VENV_PPO)/bin/python
TRL_PPO_VERSION ?= 1.12.0
PPO_PYTEST_ARGS ?=

.PHONY: setup test test-unit test-ppo demo lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check .

# The whole suite, slow end-to-end runs included. pytest exits 5 when it collects nothing; that is not a failure.
test: lint
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc
	$(MAKE) test-ppo

$(VENV_PPO)/.installed: pyproject.toml
	test -x $(PY_PPO) || $(PYTHON) -m venv $(VENV_PPO)
	$(PY_PPO) -m pip install -q torch==$(TORCH_VERSION)
	$(PY_PPO) -m pip install -q trl==$(TRL_PPO_VERSION) pytest scikit-learn -e .
	touch $@

# TRL's PPOTrainer with `MoERewardModel.for_user(profile)` as its reward model, on trl==$(TRL_PPO_VERSION).
test-ppo: $(VENV_PPO)/.installed
	$(PY_PPO) -m pytest -p no:cacheprovider tests/test_ppo.py $(PPO_PYTEST_ARGS)

test-unit: lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/trl-moe-rm demo

clean:
	rm -rf $(VENV) demo_output .pytest_cache
