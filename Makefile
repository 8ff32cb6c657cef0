# Two commands do all set-up on a fresh machine:
#   make demo   - install what is missing, then run the tiny DanceGRPO job on a local Ray instance
#   make test   - install what is missing, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# Tests and the demo keep every socket on loopback and never reach for a model hub.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m raygrpo.run cluster/tiny.yaml $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
