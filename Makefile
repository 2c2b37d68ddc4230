# Two commands on a fresh machine:  `make study` (the main job)  and  `make test`.
# Each creates or reuses .venv, installs the project and makes FashionMNIST available.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STORAGE ?= sqlite:///results/runs/studies.db
BUDGET ?= 2000
FASHION_DEB_DIR := /usr/share/datasets/fashion-mnist

.PHONY: study test install data lint bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch/torchvision are pinned in pyproject.toml; pip takes them from local wheels if present
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# FashionMNIST: Debian's dataset-fashion-mnist when installable, else torchvision's download.
data: $(STAMP)
	@if [ ! -d $(FASHION_DEB_DIR) ] && command -v apt-get >/dev/null 2>&1; then \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist) \
	    || echo "dataset-fashion-mnist not installable here; trying torchvision's download"; \
	fi
	$(BIN)/study data fashion-mnist --download

# The main job: the width frontier at one budget (one and two hidden layers) on the SQLite
# default: prints and writes the stated w_1 and w_2 with their rates (about 4 minutes on a
# fresh clone of a 2-core machine, installation included; run again, it resumes and trains
# nothing).
study: install
	$(BIN)/study frontier run --budgets $(BUDGET) --depths 1,2 --storage $(STORAGE)
	$(BIN)/study frontier report --storage $(STORAGE) --out results/runs/frontier

# The whole test suite (lint first), on two workers (pytest-xdist; a test file stays on one
# worker, so its fixtures are made once). CI runs exactly this through .ci/run. The tests write
# their own small IDX files, so a machine without FashionMNIST still runs all of them.
# A private PostgreSQL server on 127.0.0.1 (Debian's package, installed when missing) backs
# the multi-worker PostgreSQL test; without root it is skipped, except under CI where it fails.
test: install
	-$(MAKE) --no-print-directory data
	$(BIN)/ruff check study search_spaces tests
	@url=$$(bash tests/start_postgres.sh) || { echo "PostgreSQL could not be started"; [ -z "$$CI" ] || exit 1; }; \
	  status=0; STUDY_TEST_POSTGRES="$$url" $(BIN)/python -m pytest -q -n 2 --dist loadfile || status=$$?; \
	  bash tests/start_postgres.sh --stop; exit $$status

lint: install
	$(BIN)/ruff check study search_spaces tests
	$(BIN)/ruff format --check study search_spaces tests

bench: install data
	$(BIN)/study bench trainer
