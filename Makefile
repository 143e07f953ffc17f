# Two commands for a newcomer: `make serve` and `make test`.
# Both create .venv when it is missing and install what they need; running them again reinstalls nothing
# unless pyproject.toml changed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

# torch goes in first, on its own. On a host with an NVIDIA driver the default (CUDA) build of torch installs;
# elsewhere the CPU build of torch==2.13.0, from the first of: pip's configured sources when they already resolve
# a CPU build (a local wheel, or a +cpu one); PyTorch's CPU wheel index (TORCH_CPU_INDEX_URL) when it answers
# within a few seconds; pip's configured sources, which may then bring the CUDA build. .ci/torch-source.sh makes that
# choice, with bounded probes, only when torch is installed. TORCH_INDEX_URL, when given, is the index torch
# comes from, whatever the host (e.g. a mirror of PyTorch's wheels); TORCH_SPEC chooses another version.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
TORCH_INDEX_URL ?=
TORCH_CPU_INDEX_URL ?= https://download.pytorch.org/whl/cpu

.PHONY: serve test lint lint-docker docker-smoke install install-dev clean gpu-wheels gpu-check

serve: $(VENV)/.installed
	$(BIN)/windowlm serve --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: lint-docker $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The container files, offline (tests/docker runs the same checks in `make test`).
lint-docker: $(VENV)/.installed-dev
	$(BIN)/hadolint --failure-threshold style Dockerfile
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker/compose.yaml
	$(BIN)/kubernetes-validate --strict --quiet docker/k8s/*.yaml docker/k8s/fallback/*.yaml
	$(BIN)/shellcheck --severity=style docker/smoke.sh

# Build the Dockerfile and run the image for real with podman (root, minutes, network to PyPI and Debian);
# not part of `make test`.
docker-smoke:
	bash docker/smoke.sh

# The GPU check (.ci/gpu-check.sh) on a GPU host without a package index: `make gpu-wheels` here fetches the
# wheels it installs (Python 3.12, x86-64 Linux; torch and its CUDA libraries come with the host) into
# .ci/gpu-wheels, which travels with the working tree; `make gpu-check` there runs the tests and benchmarks and
# writes their results under $$OUT (or gpu-results/). On a machine without CUDA it skips the CUDA-only steps.
GPU_WHEELS := .ci/gpu-wheels
GPU_TARGET := --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
	--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_31_x86_64

gpu-wheels: $(VENV)/.installed
	$(BIN)/python -m pip download -q --disable-pip-version-check $(GPU_TARGET) -d $(GPU_WHEELS) \
		$$($(BIN)/python .ci/gpu_packages.py --with-deps-only)
	$(BIN)/python -m pip download -q --disable-pip-version-check $(GPU_TARGET) --no-deps -d $(GPU_WHEELS) \
		$$($(BIN)/python .ci/gpu_packages.py --no-deps-only)

gpu-check:
	GPU_CHECK_PYTHON="$$([ -x $(BIN)/python ] && echo $(BIN)/python || echo python3)" \
		bash .ci/gpu-check.sh "$${OUT:-gpu-results}"

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check \
		$$(TORCH_INDEX_URL="$(TORCH_INDEX_URL)" TORCH_CPU_INDEX_URL="$(TORCH_CPU_INDEX_URL)" \
			sh .ci/torch-source.sh $(BIN)/python "$(TORCH_SPEC)") "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --disable-pip-version-check -e ".[dev]"
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
