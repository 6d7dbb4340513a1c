# Sluice developer tasks. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# uv from PATH, else the copy `make uv` installs with pip (PyPI is all a fresh machine needs).
UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
SYNC := $(UV) sync --all-packages --locked
PYTEST_ARGS ?=

.PHONY: help uv sync run test test-chaos test-unit test-integration test-e2e lint fmt bench images images-test clean

help: ## List the tasks
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

uv: ## Install uv if it is missing
	@if [ ! -x "$(UV)" ]; then \
		echo "installing uv with pip"; \
		python3 -m pip install --user --quiet uv || python3 -m pip install --user --quiet --break-system-packages uv; \
	fi

sync: uv ## Create or update the workspace virtualenv from uv.lock
	@$(SYNC) --quiet

run: sync ## Run the whole system (embedded PostgreSQL and Redis unless DATABASE_URL/REDIS_URL are set)
	$(UV) run --no-sync sluice dev

# pytest exits 5 when it collected no test; a selection that matches nothing is not a failure.
define run_pytest
	@$(UV) run --no-sync pytest $(1) $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc
endef

test: sync ## Run every test (unit, integration, end-to-end); the fault-injection tests are test-chaos
	$(call run_pytest,tests --ignore=tests/chaos)

test-chaos: sync ## Crash PostgreSQL under the running services (a server of the tests' own)
	$(call run_pytest,tests/chaos -s)

test-unit: sync ## Run the unit tests only (no network)
	$(call run_pytest,tests/unit)

test-integration: sync ## Run the integration tests (real PostgreSQL and Redis)
	$(call run_pytest,tests/integration)

test-e2e: sync ## Run the end-to-end tests (services as processes)
	$(call run_pytest,tests/e2e)

lint: sync ## ruff, mypy --strict on src, import contracts, hadolint, compose and Kubernetes files, promtool
	$(UV) run --no-sync ruff check .
	$(UV) run --no-sync ruff format --check .
	$(UV) run --no-sync mypy libs/common/src services/api/src services/worker/src services/scheduler/src services/standalone/src services/cli/src
	$(UV) run --no-sync lint-imports
	$(UV) run --no-sync hadolint deploy/Dockerfile
	$(UV) run --no-sync python deploy/validate.py
	@if command -v promtool >/dev/null; then \
		promtool check rules deploy/prometheus/alerts.yaml && \
		promtool test rules deploy/prometheus/alerts.test.yaml && \
		promtool check config --syntax-only deploy/prometheus/prometheus.yml; \
	else \
		echo "lint: promtool not found, alert rules not checked (Debian package prometheus; CI installs it)"; \
	fi

fmt: sync ## Format and autofix
	$(UV) run --no-sync ruff format .
	$(UV) run --no-sync ruff check --fix .

bench: sync ## Benchmarks (next to baselines where there is one): pipeline, engine, API, metrics, slow clients, end to end, statements, dashboard, scale
	$(UV) run --no-sync python bench/pipeline.py --metrics --tracing $(BENCH_ARGS)
	$(UV) run --no-sync python bench/engine.py $(ENGINE_BENCH_ARGS)
	$(UV) run --no-sync python bench/api.py $(API_BENCH_ARGS)
	$(UV) run --no-sync python bench/api_metrics.py $(API_METRICS_BENCH_ARGS)
	$(UV) run --no-sync python bench/slow_clients.py $(SLOW_BENCH_ARGS)
	$(UV) run --no-sync python bench/e2e.py $(E2E_BENCH_ARGS)
	@if command -v valgrind >/dev/null; then $(UV) run --no-sync python bench/statements.py $(STATEMENTS_BENCH_ARGS); \
	else echo "bench/statements.py skipped: it needs valgrind"; fi
	$(UV) run --no-sync python bench/dashboard.py $(DASHBOARD_BENCH_ARGS)
	$(UV) run --no-sync python bench/scale.py $(SCALE_BENCH_ARGS)

# PYTHON_IMAGE: the images' base (default python:3.11-slim-bookworm); IMAGE_TAG: their tag (latest).
images: ## Build the api, worker and scheduler images (docker if its daemon answers, else podman)
	bash deploy/images-test.sh build

images-test: ## Build the images on a local Debian base with podman and run them on this machine's PostgreSQL and Redis
	bash deploy/images-test.sh

clean: ## Stop the embedded servers of ./.sluice and remove caches (keeps the data)
	-$(UV) run --no-sync sluice embedded stop
	rm -rf .pytest_cache .mypy_cache .ruff_cache
