# Two commands do everything on a fresh machine:
#   make demo   set up .venv, write the synthetic data, run the 3-round demo, print per-round Dice
#   make test   set up .venv and run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARCH := $(shell uname -m)
# segment_anything imports torchvision; these pairs install together (x86_64 from local files here).
ifeq ($(ARCH),aarch64)
TORCH := torch==2.9.1 torchvision==0.24.1
else
TORCH := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/semisam demo-data data/demo
	$(BIN)/semisam run conf/demo.yaml
	$(BIN)/semisam inspect runs/demo/pseudo_labels --png runs/demo/overlays

# two processes: much of the suite waits (Ray start-up, actor deadlines, subprocesses stopped by signals);
# --dist loadfile keeps a module (and its one local Ray) in one process
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: setup
	$(BIN)/ruff check pipeline workers tests benchmarks

clean:
	rm -rf runs data/demo
