# The front door: `make help` lists every target.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements/dev.lock 2>/dev/null | sha256sum | cut -c1-12)
COMPOSE := docker compose
PYTEST := $(BIN)/pytest

# `make up BASE=local`: build on the Debian-built base images (no registry needed).
LOCAL_BASE := PYTHON_IMAGE=localbase/python:trixie NGINX_IMAGE=localbase/nginx:trixie \
	PROMETHEUS_IMAGE=localbase/prometheus:trixie NGINX_EXPORTER_IMAGE=localbase/nginx-exporter:trixie \
	ALERTMANAGER_IMAGE=localbase/alertmanager:trixie \
	BLACKBOX_EXPORTER_IMAGE=localbase/blackbox-exporter:trixie ACME_BASE_IMAGE=localbase/acme:trixie
ifeq ($(BASE),local)
COMPOSE := $(LOCAL_BASE) docker compose
endif

# Development server on loopback (make run).
RUN_ENV := HOST=127.0.0.1 PORT=8000 METRICS_HOST=127.0.0.1 METRICS_PORT=9000 \
	PROMETHEUS_MULTIPROC_DIR=$(CURDIR)/.cache/prometheus-multiproc WORKER_TMP_DIR=/tmp \
	LOG_FORMAT=$${LOG_FORMAT:-console}

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# --- development -----------------------------------------------------------------------

$(STAMP): requirements/dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r requirements/dev.lock
	rm -f $(VENV)/.installed-* && touch $(STAMP)

.PHONY: install
install: $(STAMP) ## Create .venv with the pinned (hash-checked) dependencies

.PHONY: lock
lock: ## Re-resolve requirements/*.in into the hash-pinned lock files
	$(PYTHON) -m pip install --quiet --target .cache/uv uv
	PYTHONPATH=.cache/uv $(PYTHON) -m uv pip compile --quiet --universal --python-version 3.11 \
		--generate-hashes requirements/runtime.in -o requirements/runtime.lock
	PYTHONPATH=.cache/uv $(PYTHON) -m uv pip compile --quiet --universal --python-version 3.11 \
		--generate-hashes requirements/dev.in -o requirements/dev.lock

.PHONY: run
run: install ## Run the serving layer on 127.0.0.1:8000 (metrics on :9000), console logs
	$(RUN_ENV) $(BIN)/python -m server

.PHONY: fmt
fmt: install ## Format the code (ruff)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

.PHONY: lint
lint: install ## Static checks: ruff, mypy, hadolint, docker compose config
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	bash scripts/lint-dockerfiles.sh
	bash scripts/ensure-compose.sh
	$(COMPOSE) --profile monitoring --profile loadtest --profile acme config --quiet
	$(DEV_COMPOSE) config --quiet

# --- tests -----------------------------------------------------------------------------

.PHONY: test
test: lint test-unit test-integration test-static test-e2e ## Everything: lint, unit, integration, static, e2e

.PHONY: test-unit
test-unit: install ## Unit tests (seconds, in-process)
	$(PYTEST) tests/unit -q

.PHONY: test-integration
test-integration: install ## Integration tests: real gunicorn + uvicorn workers on loopback
	$(PYTEST) tests/integration -q -m integration

.PHONY: test-static
test-static: install ## Config checks in the real tools: nginx -t, promtool, compose config, kustomize + kubernetes-validate; the contract
	bash scripts/ensure-compose.sh
	bash scripts/base-images.sh nginx prometheus alertmanager
	NGINX_IMAGE=localbase/nginx:trixie bash nginx/check.sh
	$(PYTEST) tests/monitoring tests/static -q

.PHONY: test-e2e
test-e2e: install prerequisites ## End-to-end tests: the real compose stack in Docker
	$(PYTEST) tests/e2e -q -m e2e

.PHONY: prerequisites
prerequisites: ## Compose plugin, local base images and the wheelhouse (no registry needed)
	bash scripts/ensure-compose.sh
	bash scripts/base-images.sh
	bash scripts/wheelhouse.sh

.PHONY: base-images
base-images: ## Build localbase/*:trixie from Debian packages (cached by recipe hash)
	bash scripts/base-images.sh

.PHONY: wheelhouse
wheelhouse: ## Download the app's locked wheels to .cache/wheelhouse (image builds use them)
	bash scripts/wheelhouse.sh

# --- the stack -------------------------------------------------------------------------

# The base images to build on: the configured (official) ones, or, where they cannot be
# pulled, local ones built from Debian plus the wheelhouse (said in one line).
PICK_BASE := bash scripts/pick-base-images.sh

.PHONY: up
up: ## Build and start the stack, wait until healthy (https://localhost); no registry: local bases
	bases=$$($(PICK_BASE)) && env $$bases $(COMPOSE) up --build --detach --wait

.PHONY: deploy
deploy: ## Roll the app to the working tree and .env, no request lost; not ready in DEPLOY_TIMEOUT: undone
	@$(PYTHON) scripts/deploy.py deploy

.PHONY: rollback
rollback: ## Roll the app back to the image that ran before the last deploy, the same way
	@$(PYTHON) scripts/deploy.py rollback

# --- beyond one host (deploy/) ---------------------------------------------------------

.PHONY: kubernetes
kubernetes: install ## Render the production Kubernetes overlay to stdout (kubectl kustomize)
	$(BIN)/kubectl kustomize deploy/kubernetes/overlays/production

.PHONY: kubernetes-generate
kubernetes-generate: install ## Rewrite the files derived from nginx/conf and the alert rules
	$(BIN)/python deploy/kubernetes/generate.py

.PHONY: swarm-deploy
swarm-deploy: ## Deploy the stack on this Swarm manager (TLS_CERT_FILE, TLS_KEY_FILE; deploy/swarm)
	bash deploy/swarm/deploy.sh $${STACK_NAME:-asgi-stack}

# Development: production's compose file plus compose.dev.yml, named here only (compose
# never loads it by itself). `make up` afterwards puts production's containers back.
DEV_COMPOSE := $(COMPOSE) -f docker-compose.yml -f compose.dev.yml

.PHONY: dev
dev: ## The stack for development: code mounted, workers reload on save, console logs; follows the logs
	$(DEV_COMPOSE) up --build --detach --wait
	@echo "serving https://$$($(DEV_COMPOSE) port nginx 8443) - edit app/ and reload the page;" \
	  "Ctrl-C stops following the logs, make down stops the stack"
	$(DEV_COMPOSE) logs --follow --tail=20 app nginx

# --- capacity ------------------------------------------------------------------------------

.PHONY: loadtest
loadtest: install ## Load test the running stack through nginx (HTTPS); pass/fail on loadtests/slo.toml
	$(BIN)/python -m loadtests

.PHONY: loadtest-docker
loadtest-docker: ## The same from Locust containers (LOADTEST_WORKERS=N); reports into loadtests/reports
	bash loadtests/wheelhouse.sh
	rc=0; $(COMPOSE) --profile loadtest up --build -d locust-master locust-worker \
	  && $(COMPOSE) --profile loadtest wait locust-master || rc=$$?; \
	$(COMPOSE) --profile loadtest logs --no-log-prefix locust-master; \
	$(COMPOSE) --profile loadtest cp locust-master:/loadtest/loadtests/reports/. loadtests/reports/; exit $$rc

# The bench builds the images through compose: on a machine without a registry, BASE=local.
BENCH_ENV := $(if $(filter local,$(BASE)),$(LOCAL_BASE))

.PHONY: bench
bench: install ## Benchmark (not a test): our layers side by side, pinned cores; report in bench/reports
	bash scripts/ensure-compose.sh
	$(BENCH_ENV) $(BIN)/python -m bench $(ARGS)

.PHONY: bench-ablate
bench-ablate: install ## Benchmark nginx one directive at a time (bench/ablate.py): µs of nginx CPU per request each
	bash scripts/ensure-compose.sh
	$(BENCH_ENV) $(BIN)/python -m bench.ablate

.PHONY: up-monitoring
up-monitoring: ## The stack plus Prometheus, the nginx exporter and Grafana (ports on 127.0.0.1)
	bases=$$($(PICK_BASE) monitoring) && env $$bases $(COMPOSE) --profile monitoring up --build --detach --wait

.PHONY: dashboard-preview
dashboard-preview: ## Draw the dashboard's main panels from a live Prometheus into docs/dashboard.png
	$(PYTHON) -m pip install --quiet --target .cache/preview matplotlib==3.11.2
	PYTHONPATH=.cache/preview $(PYTHON) monitoring/preview.py

.PHONY: down
down: ## Stop and remove the stack's containers (volumes are kept)
	$(COMPOSE) --profile monitoring --profile loadtest --profile acme down --remove-orphans

.PHONY: logs
logs: ## Follow the logs of every service
	$(COMPOSE) logs --follow --tail=100

.PHONY: ps
ps: ## Show the stack's services and their health
	$(COMPOSE) ps

.PHONY: reload
reload: ## Reload nginx and gunicorn without dropping requests (SIGHUP)
	$(COMPOSE) kill --signal HUP nginx
	$(COMPOSE) kill --signal HUP app
