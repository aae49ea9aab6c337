# One command installs and runs each job on a fresh machine (Python 3.10-3.12 with venv):
#   make demo   install, then train a small ResNet, export every artifact, bench them (the main job)
#   make test   install, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= $(firstword $(RESNET_DEPLOY_DATA) $(wildcard ../shared/data/cifar10))

.PHONY: install test demo clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,openvino]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/resnet-deploy pipeline $(if $(DATA),--data $(DATA)) --out demo --force

clean:
	rm -rf $(VENV) demo .pytest_cache
