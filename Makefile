# wbc: every target depends on the virtual environment built by `make install`.
PY      := .venv/bin/python
WBC     := .venv/bin/wbc
STAMP   := .venv/.installed
BACKBONE ?= r50
STORE   ?= cache/images/pbc-lt.h5
FOLDS   ?= all
EPOCHS  ?= 100
RUNS    ?= runs

.PHONY: install test lint demo stage1 bench clean-cache help

help:
	@echo "make install | test | lint | demo | stage1 BACKBONE=r50 | bench"

install: $(STAMP)

# torch/torchvision are pinned to the releases this machine keeps on disk (nothing large is
# downloaded); where those are not available pip falls back to its default torch.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[dev,lite]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	.venv/bin/ruff check wbc tests tools

stage1: $(STAMP)
	$(WBC) train $(STORE) --backbone $(BACKBONE) --fold $(FOLDS) --epochs $(EPOCHS) --out $(RUNS)/$(BACKBONE)

demo: $(STAMP)
	bash tools/demo.sh

bench: $(STAMP)
	$(PY) tools/bench_pbc.py
