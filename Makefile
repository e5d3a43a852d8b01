# Two entry points on a fresh machine: `make demo` (main job on the embedded toy world) and
# `make test` (the suite CI runs). Both create .venv and install everything first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
ALIGN  := $(VENV)/bin/align
RUFF   := $(VENV)/bin/ruff
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# torch/torchvision: the pair that resolves from this machine's local disk (README, "Installing by hand").
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[test,trl-bench,deepspeed,hpsv2]"
	# hpsv2 pins protobuf<4 (breaks Ray's raylet) and pytest==7.2.0; its real runtime needs are the
	# `hpsv2` extra, so install it without its metadata pins. tests/test_install.py guards this.
	$(PIP) install -q --no-deps "hpsv2==1.2.0"
	$(PY) -m align.install_fixups
	touch $(STAMP)

demo: install
	$(ALIGN) train

# -n auto: one pytest-xdist worker per core, at most 4 (tests/conftest.py keeps each file on one
# worker and runs the Ray / accelerate-launch tests one after another on one of them).
test: install
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadgroup

test-slow: install
	$(PY) -m pytest -q -m slow

# ruff's settings are in pyproject.toml ([tool.ruff]); ruff is in the [test] extra.
lint: install
	$(RUFF) check .
	$(RUFF) format --check .

clean:
	rm -rf $(VENV) runs
