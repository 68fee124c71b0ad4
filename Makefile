# Every install goes through constraints.txt, which pins the CPU build of torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint format bench clean test-browser

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

# About 6 hours on 2 CPU cores (bench/README.md: each benchmark's time); results land in bench/results/. Each
# benchmark pins torch to BENCH_THREADS threads and records it; the grid benchmarks continue an interrupted run.
BENCH_THREADS ?= 2
PEERENV ?= ../.peerenv
bench: $(STAMP)
	$(PY) bench/restarts.py --threads $(BENCH_THREADS)
	PEERENV=$(PEERENV) bash ../shared/peer/setup.sh
	PIP_CONSTRAINT=constraints.txt $(PEERENV)/bin/pip install -q matplotlib safetensors
	$(PEERENV)/bin/python bench/peer_compare.py --threads $(BENCH_THREADS)
	$(PEERENV)/bin/python bench/peer_compare.py --cases resnet18 --iterations 300 --timing-run --out bench/results/peer_resnet18 --threads $(BENCH_THREADS)
	$(PY) bench/time_to_psnr.py --threads $(BENCH_THREADS)
	$(PY) bench/engine.py --threads $(BENCH_THREADS)
	$(PY) bench/iterative.py --resume --threads $(BENCH_THREADS)
	$(PY) bench/gradinversion.py --threads $(BENCH_THREADS)
	$(PY) bench/bayesian.py --threads 1
	$(PY) bench/gias.py --threads 1
	$(PY) bench/cafe.py --threads 1
	$(PY) bench/disaggregation.py --threads 1
	$(PY) bench/label_speed.py --threads $(BENCH_THREADS)
	$(PY) bench/imprint.py --threads $(BENCH_THREADS)
	$(PY) bench/invgrad_quality.py --models convnet:0 --name invgrad_quality_convnet --threads $(BENCH_THREADS)
	$(PY) bench/invgrad_quality.py --models resnet18:300 --name invgrad_quality_resnet18 --threads $(BENCH_THREADS)
	$(PY) bench/label_defenses.py --resume --threads $(BENCH_THREADS)
	$(PY) bench/labels.py --resume --threads $(BENCH_THREADS)
	$(PY) bench/labels_in_attacks.py --resume --threads $(BENCH_THREADS)
	$(PY) bench/recursive.py --resume --threads $(BENCH_THREADS)
	$(PY) bench/copa.py --resume --threads $(BENCH_THREADS)
	$(PY) bench/defenses.py --resume --threads $(BENCH_THREADS)
	$(PY) bench/dager.py --threads $(BENCH_THREADS)
	$(PY) bench/text_attacks.py --threads 1
	$(PY) bench/he_costs.py --threads 1
	$(PY) bench/opacus_compare.py --threads 1
	$(PY) bench/flower_audit.py --threads 1
	$(PY) bench/flower_secagg.py --threads 1
	$(PY) bench/tv_sweep.py --models resnet18 --tvs 1e-4,1e-3,1e-2,5e-2 --name tv_sweep_resnet18 --threads $(BENCH_THREADS)
	$(PY) bench/tv_sweep.py --models convnet --tvs 1e-4,1e-2 --name tv_sweep_convnet --threads $(BENCH_THREADS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

# Renders the grid report in headless Chromium (installed here with apt-get when missing; needs root).
test-browser: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		(apt-get update && apt-get install -y chromium)
	$(PY) -m pytest -q -m browser
