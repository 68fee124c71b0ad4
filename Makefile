# Every install goes through constraints.txt, which pins the CPU build of torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gradinv demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

test: lint
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Several hours on 2 CPU cores; results land in bench/results/.
bench: $(STAMP)
	$(PY) bench/restarts.py
	$(PY) bench/time_to_psnr.py
	$(PY) bench/invgrad_quality.py
	$(PY) bench/labels.py
	$(PY) bench/labels_in_attacks.py
	$(PY) bench/label_speed.py
	$(PY) bench/recursive.py
	$(PY) bench/imprint.py
	$(PY) bench/copa.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
