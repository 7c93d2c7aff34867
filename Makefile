# Two commands do all setup on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned here, not in pyproject.toml: torch==2.13.0 is the CPU build available offline on the reference machine.
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
# Other trl versions get their own venv, `.venv-trl-<version>`:
# - PPO lives in trl.experimental.ppo only in trl 1.0-1.12 (removed in 1.13): `make test-ppo` tests it on 1.12.0;
# - `make test-trl-min` runs the trainer, model, personalization and reward tests on the oldest supported trl.
TRL_PPO_VERSION ?= 1.12.0
TRL_MIN_VERSION ?= 1.0.0
TRL_MIN_TESTS ?= tests/test_trainer.py tests/test_modeling.py tests/test_personalization.py tests/test_rewards.py

.PHONY: setup test test-slow test-unit test-ppo test-trl-min demo lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	# OpenRLHF's own remote-reward client, for tests/test_serve.py (its GPU dependencies are not needed for that)
	$(PY) -m pip install -q --no-deps openrlhf==0.11.2 pylatexenc
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check .

# The whole suite, slow end-to-end runs included. pytest exits 5 when it collects nothing; that is not a failure.
test: lint
	$(PY) -m pytest -m "not extended" $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc
	$(MAKE) test-ppo
	$(MAKE) test-trl-min

.venv-trl-%/.installed: pyproject.toml
	test -x .venv-trl-$*/bin/python || $(PYTHON) -m venv .venv-trl-$*
	.venv-trl-$*/bin/python -m pip install -q torch==$(TORCH_VERSION)
	.venv-trl-$*/bin/python -m pip install -q trl==$* pytest -e .
	touch $@

# TRL's PPOTrainer with `MoERewardModel.for_user(profile)` as its reward model, on trl==$(TRL_PPO_VERSION).
test-ppo: .venv-trl-$(TRL_PPO_VERSION)/.installed
	.venv-trl-$(TRL_PPO_VERSION)/bin/python -m pytest -p no:cacheprovider tests/test_ppo.py

# The oldest supported trl: the fast trainer, model, personalization and reward tests.
test-trl-min: .venv-trl-$(TRL_MIN_VERSION)/.installed
	.venv-trl-$(TRL_MIN_VERSION)/bin/python -m pytest -p no:cacheprovider -m "not slow" $(TRL_MIN_TESTS)

# Slow runs that only repeat what `make test` already covers (another entry point to the same path).
test-slow: setup
	$(PY) -m pytest -m extended $(PYTEST_ARGS)

test-unit: lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/trl-moe-rm demo

clean:
	rm -rf $(VENV) .venv-trl-* demo_output .pytest_cache
