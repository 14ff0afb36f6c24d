# cuttle: build, run and ship the container image, with the Squid image's workflow.
#
#   make release                 build the image, start it with docker compose, wait for health
#   make tag [TAG...]            tag it (default: latest, APP_VERSION, COMMIT_ID, the git tag)
#   make login publish           push every tag to ECR
#   make clean                   stop, remove volumes and images
#
# `make help` lists every target. `make -n TARGET` prints what a target would run.

# Project and registry settings (override on the command line or in the environment).
PROJECT ?= cuttle
AWS_REGION ?= us-west-2
AWS_ACCOUNT_ID ?=
# ECR when AWS_ACCOUNT_ID (or DOCKER_REGISTRY) is set; a local image name otherwise.
DOCKER_REGISTRY ?= $(if $(AWS_ACCOUNT_ID),$(AWS_ACCOUNT_ID).dkr.ecr.$(AWS_REGION).amazonaws.com)
IMAGE ?= $(if $(DOCKER_REGISTRY),$(DOCKER_REGISTRY)/cuttle,cuttle)
# org.opencontainers.image.source label; empty unless set.
SOURCE_URL ?=

# Version settings: <commit timestamp>.<short hash>, as the Squid image.
COMMIT_TIMESTAMP := $(shell git log -1 --pretty=format:%cd --date=format:%Y%m%d%H%M%S 2>/dev/null)
COMMIT_ID := $(shell git rev-parse --short HEAD 2>/dev/null)
COMMIT_SHA := $(shell git rev-parse HEAD 2>/dev/null)
COMMIT_TAG := $(shell git tag --points-at HEAD 2>/dev/null)
APP_VERSION ?= $(if $(COMMIT_ID),$(COMMIT_TIMESTAMP).$(COMMIT_ID),dev)

# docker compose reads these for the image name, build args and settings.
export IMAGE APP_VERSION COMMIT_SHA SOURCE_URL

COMPOSE ?= docker compose -p $(PROJECT) -f docker-compose.yml
HEALTH_TIMEOUT ?= 60

# The host where published ports are reached (from DOCKER_HOST when it is a remote engine).
DOCKER_HOST_IP := $(shell echo "$${DOCKER_HOST:-}" | awk -F/ '{print $$3}' | awk -F: '{print $$1}')
DOCKER_HOST_IP := $(if $(DOCKER_HOST_IP),$(DOCKER_HOST_IP),localhost)

TARGETS := help version release tag login logout publish clean log compose all test bench lint \
	check-registry fuzz soak bench-peers

# `make tag v1 stable` and `make compose ps`: the words after the first goal that are not
# targets are its arguments (`make tag v1 publish` tags v1, then publishes). Only for those two
# targets, so that a typo elsewhere still fails.
ifneq ($(filter tag compose,$(firstword $(MAKECMDGOALS))),)
GOAL_ARGS := $(filter-out $(TARGETS),$(wordlist 2,$(words $(MAKECMDGOALS)),$(MAKECMDGOALS)))
ifneq ($(GOAL_ARGS),)
$(eval .PHONY: $(GOAL_ARGS))
$(eval $(GOAL_ARGS):;@:)
endif
endif

# Tags for `make tag`: the given ones (TAGS=... or words after `tag`), else the
# defaults.
DEFAULT_TAGS := latest $(APP_VERSION) $(COMMIT_ID) $(COMMIT_TAG)
TAGS ?= $(if $(and $(filter tag,$(firstword $(MAKECMDGOALS))),$(GOAL_ARGS)),$(GOAL_ARGS),$(DEFAULT_TAGS))
# Arguments for `make compose`: ARGS=... or the words after `compose`.
ARGS ?= $(if $(filter compose,$(firstword $(MAKECMDGOALS))),$(GOAL_ARGS))

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

INFO = @printf '\033[1;33m=> %s\033[0m\n'

.PHONY: $(TARGETS)

help: ## List the targets
	@echo "cuttle $(APP_VERSION): image $(IMAGE)"
	@echo
	@echo "Usage: make TARGET [VAR=value ...]"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(firstword $(MAKEFILE_LIST)) \
		| awk 'BEGIN {FS = ":.*## "} {printf "  %-10s %s\n", $$1, $$2}'
	@echo
	@echo "Variables: AWS_ACCOUNT_ID, AWS_REGION (us-west-2), DOCKER_REGISTRY (ECR of the account),"
	@echo "IMAGE (DOCKER_REGISTRY/cuttle), APP_VERSION (commit timestamp.short hash), TAGS, ARGS,"
	@echo "HTTP_PORT (3128), and the proxy settings of docker-compose.yml (SQUID_WHITELIST, ...)."

version: ## Print the app version (commit timestamp.short hash)
	@echo $(APP_VERSION)

all: ## clean, release, tag, login, publish, clean (the full CI workflow, as the Squid image)
	$(MAKE) clean
	$(MAKE) release
	$(MAKE) tag
	$(MAKE) login
	$(MAKE) publish
	$(MAKE) clean

release: ## Build the image, start it with docker compose, wait until it is healthy
	$(INFO) "Building $(IMAGE):$(APP_VERSION)..."
	$(COMPOSE) build --pull \
		--build-arg VERSION=$(APP_VERSION) \
		--build-arg REVISION=$(COMMIT_SHA) \
		--build-arg SOURCE=$(SOURCE_URL) \
		cuttle
	$(INFO) "Starting cuttle..."
	$(COMPOSE) up -d cuttle
	$(INFO) "Waiting for cuttle to be healthy (up to $(HEALTH_TIMEOUT) s)..."
	@id="$$($(COMPOSE) ps -q cuttle)"; \
	status=missing; \
	for _ in $$(seq 1 $(HEALTH_TIMEOUT)); do \
		status="$$(docker inspect --format '{{.State.Health.Status}}' "$$id" 2>/dev/null || echo missing)"; \
		if [ "$$status" != starting ]; then break; fi; \
		sleep 1; \
	done; \
	if [ "$$status" != healthy ]; then \
		echo "cuttle is not healthy (status: $$status); last log lines:"; \
		$(COMPOSE) logs --tail 20 cuttle; \
		exit 1; \
	fi
	@port="$$($(COMPOSE) port cuttle 3128 | awk -F: '{print $$NF}')"; \
	printf '\033[1;33m=> %s\033[0m\n' "cuttle is running at http://$(DOCKER_HOST_IP):$$port"; \
	echo "Try it:"; \
	echo "  curl -sv -x http://$(DOCKER_HOST_IP):$$port https://sts.amazonaws.com/ -o /dev/null"

tag: ## Tag the image: make tag [TAG...] or TAGS="a b" (default: latest APP_VERSION COMMIT_ID COMMIT_TAG)
	$(INFO) "Tagging $(IMAGE):$(APP_VERSION) with $(strip $(TAGS))..."
	$(foreach t,$(TAGS),docker tag $(IMAGE):$(APP_VERSION) $(IMAGE):$(t);)

check-registry:
	@if [ -z "$(DOCKER_REGISTRY)" ]; then \
		echo "Set AWS_ACCOUNT_ID (ECR in AWS_REGION) or DOCKER_REGISTRY to log in and publish." >&2; \
		exit 1; \
	fi

login: check-registry ## Log in to ECR (aws ecr get-login-password)
	$(INFO) "Logging in to $(DOCKER_REGISTRY)..."
	aws ecr get-login-password --region $(AWS_REGION) \
		| docker login --username AWS --password-stdin $(DOCKER_REGISTRY)

logout: check-registry ## Log out of the registry
	docker logout $(DOCKER_REGISTRY)

publish: check-registry ## Push every tag of the image built by release (see make tag)
	$(INFO) "Publishing $(IMAGE)..."
	docker image inspect --format '{{range .RepoTags}}{{println .}}{{end}}' $(IMAGE):$(APP_VERSION) \
		| awk -v repo='$(IMAGE):' 'index($$0, repo) == 1' \
		| xargs -r -n 1 docker push

clean: ## Stop cuttle, remove its volumes and images
	$(INFO) "Removing the compose environment and images..."
	$(COMPOSE) down -v --remove-orphans || true
	docker image ls -q $(IMAGE) | sort -u | xargs -r docker image rm -f || true
	docker image prune -f --filter label=application=cuttle || true

log: ## Follow the logs
	$(COMPOSE) logs -f

compose: ## Run a docker compose command: make compose ps, make compose ARGS="logs --tail 5"
	$(COMPOSE) $(ARGS)

test: ## cargo test
	cargo test

bench: ## cargo bench
	cargo bench

bench-peers: ## Side-by-side benchmark against Squid and tinyproxy (bench/peers.sh)
	bash bench/peers.sh

soak: ## The soak and integrity test, longer: make soak CUTTLE_SOAK_SECS=300
	CUTTLE_SOAK_SECS=$${CUTTLE_SOAK_SECS:-120} cargo test --release --test soak -- --nocapture

fuzz: ## Run each cargo-fuzz target for FUZZ_SECS (default 60) from the checked-in seeds
	cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz
	for t in allowlist_entry host decision; do \
		mkdir -p fuzz/corpus/$$t; \
		RUSTC_BOOTSTRAP=1 cargo fuzz run -O $$t fuzz/corpus/$$t fuzz/seeds/$$t -- -max_total_time=$${FUZZ_SECS:-60}; \
	done

lint: ## cargo fmt --check, clippy, hadolint, cfn-lint, kubernetes-validate
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	hadolint Dockerfile
	cfn-lint deploy/ecs/cuttle.yaml
	kubernetes-validate --strict $(filter-out deploy/kubernetes/kustomization.yaml,$(wildcard deploy/kubernetes/*.yaml))
