# Terrace: two commands do all set-up.
#   make demo   the main job: a real cluster, Terrace installed, requests routed
#   make test   the whole test suite (unit, integration on a real cluster, e2e)
SHELL := /bin/bash
PYTHON ?= python3
CLUSTER_DIR ?= $(CURDIR)/.cache/cluster
STAMPS := .cache/stamps
PYTEST_ARGS ?=

.PHONY: bench bench-env chart-sync help deps python tools llama real-models system-deps cluster-up cluster-down cluster-status test test-unit demo lint clean kind-up kind-down kind-images test-kind

help:
	@echo "make demo          bring up a real cluster, install Terrace, route and scale (all set-up included)"
	@echo "make test          run every test (all set-up included)"
	@echo "make cluster-up    start the dev cluster (etcd, apiserver, controllers, kwok, Prometheus)"
	@echo "make cluster-down  stop it"
	@echo "make tools         build the pinned Kubernetes binaries into ~/.cache/terrace/bin"
	@echo "make llama         build llama.cpp's llama-server into ~/.cache/terrace/bin"
	@echo "make real-models   assemble Gemma 3 270M and convert it for onnx and torch tiers"
	@echo "make kind-up       Docker + a kind cluster from kind-config.yaml, every image built here (docs/kind.md)"
	@echo "make kind-images   build Terrace's four images here and kind-load them"
	@echo "make kind-down     delete the kind cluster and stop Docker"
	@echo "make test-kind     the kind layer: the README's kind quickstart, then e2e on real pods (KEEP=1 leaves it up)"

deps: python tools llama real-models system-deps

python: $(STAMPS)/python
$(STAMPS)/python: pyproject.toml
	$(PYTHON) -m pip install -q -e ".[torch,gpu,llm,dev,train]"
	@mkdir -p $(STAMPS) && touch $@

tools:
	@bash hack/build-tools.sh >/dev/null

llama:
	@bash hack/build-llama-server.sh >/dev/null

real-models: python
	@$(PYTHON) hack/real_models.py >/dev/null

system-deps:
	@bash hack/install-system-deps.sh

cluster-up: deps
	@$(PYTHON) hack/devcluster.py up --dir $(CLUSTER_DIR)

cluster-down:
	@$(PYTHON) hack/devcluster.py down --dir $(CLUSTER_DIR)

cluster-status:
	@$(PYTHON) hack/devcluster.py status --dir $(CLUSTER_DIR)

test: deps
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-unit: python
	$(PYTHON) -m pytest tests/unit $(PYTEST_ARGS)

demo: deps
	@$(PYTHON) hack/demo.py

lint: python
	$(PYTHON) -m ruff check .

clean: cluster-down
	rm -rf .cache

# The chart carries copies of the CRDs and RBAC rules (Helm cannot read
# outside the chart); tests/unit/test_chart.py fails when they differ.
chart-sync:
	cp crds/terrace.dev_*.yaml charts/terrace/crds/
	cp operator/terrace_operator/rbac/clusterrole.yaml charts/terrace/files/operator-clusterrole.yaml
	cp operator/terrace_operator/rbac/role.yaml charts/terrace/files/operator-role.yaml
	cp operator/terrace_operator/agent/rbac.yaml charts/terrace/files/agent-rbac.yaml

# Benchmarks print side-by-side tables; LiteLLM (the router's peer) lives in
# its own virtualenv because it pins older openai/fastapi than Terrace uses.
bench-env: python
	@test -x .cache/bench-venv/bin/litellm || { $(PYTHON) -m venv --system-site-packages .cache/bench-venv && \
	  .cache/bench-venv/bin/pip install -q 'litellm[proxy]'; }

bench: deps bench-env
	$(PYTHON) bench/router.py
	$(PYTHON) bench/runtime.py
	$(PYTHON) bench/energy.py
	$(PYTHON) bench/operator.py

# kind with real pods (docs/kind.md): Docker started by PID, every image
# (Debian, kind base and node, Kubernetes' own, Terrace's) built here; caches
# in ~/.cache/terrace/kind.
kind-up: python
	@PYTHON=$(PYTHON) bash hack/kind/up.sh

kind-images:
	@bash hack/kind/terrace-images.sh

kind-down:
	@bash hack/kind/down.sh

# Run by .ci/run after `make test`: needs Docker's engine, which it installs.
test-kind: python
	@PYTHON=$(PYTHON) PYTEST_ARGS="$(PYTEST_ARGS)" bash hack/kind/test.sh
