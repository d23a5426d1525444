# Two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
.DELETE_ON_ERROR:  # a failed `make archive` leaves no manifest that looks done
PY := .venv/bin/python
# The real data sets (training, `make evaluate`): ../shared/data unless DATA_DIR says otherwise
# (catalog.py). Everything else works without them.
ifdef DATA_DIR
export DATA_DIR
endif
UI_PORT ?= 8501
# Models with shipped weights are exported, archived and served.
WEIGHTS := $(wildcard training/weights/*.pt)
EXPORTS := $(patsubst training/weights/%.pt,optimize/exported/%/export.json,$(WEIGHTS))

.PHONY: help venv java chromium postgres nginx grpc export archive serve stop ui demo demo-check test test-fast test-prerequisites docs-screenshots evaluate corrections clean
help:
	@echo "make demo      install, build the archives, start TorchServe and the UI"
	@echo "make test      install and run the whole test suite"
	@echo "make serve / make stop / make ui / make archive / make evaluate / make train-<model>"
	@echo "python -m serving.modelctl --help   versions: list, register, set-default, rollback, ..."

.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

venv: .venv/.installed java

java:  # TorchServe's frontend needs Java 17
	@java -version 2>&1 | grep -q 'version "17' || (apt-get update -q && apt-get install -y -q openjdk-17-jre-headless)

chromium:  # the UI tests drive Debian's chromium through Playwright (no browser download)
	@test -x /usr/bin/chromium || (apt-get update -q && apt-get install -y -q chromium)

postgres:  # the prediction-log tests start a real PostgreSQL server
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q postgresql)

nginx:  # tests/test_k8s_manifests.py checks the rendered nginx configurations with `nginx -t`
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || (apt-get update -q && apt-get install -y -q nginx-light)

serving/grpc_stubs/inference_pb2_grpc.py: .venv/.installed serving/generate_grpc.py
	$(PY) -m serving.generate_grpc

grpc: serving/grpc_stubs/inference_pb2_grpc.py

optimize/exported/%/export.json: training/weights/%.pt optimize/export.py | venv
	$(PY) -m optimize.export --model $*

export: $(EXPORTS)

model_store/manifest.json: $(EXPORTS) model_store/models.yaml model_store/archive.py $(wildcard handlers/*.py) \
		$(wildcard training/weights/*_calibration.json) | venv
	$(PY) -m model_store.archive
	$(PY) -m optimize.tune --unless-tuned  # each model's default: its fastest version on this CPU (~2 min)

archive: model_store/manifest.json

serve: archive grpc
	$(PY) -m serving.server start

stop:
	-@test ! -f .run/ui.pid || (kill $$(cat .run/ui.pid) 2>/dev/null; rm -f .run/ui.pid; echo "UI stopped")
	$(PY) -m serving.server stop

ui: venv
	@mkdir -p .run
	@test ! -f .run/ui.pid || ! kill -0 $$(cat .run/ui.pid) 2>/dev/null || (echo "UI already runs"; exit 1)
	nohup $(PY) -m streamlit run ui/app.py --server.address 127.0.0.1 --server.port $(UI_PORT) \
		--server.headless true --browser.gatherUsageStats false --client.toolbarMode minimal \
		> .run/ui.log 2>&1 & echo $$! > .run/ui.pid
	@echo "UI: http://127.0.0.1:$(UI_PORT)"

demo: serve ui
	@$(PY) -m serving.demo_check --ui-port $(UI_PORT)
	@echo "Open http://127.0.0.1:$(UI_PORT) to draw a digit; \`make stop\` stops everything."

demo-check: venv  # a prediction from every served model and an answer from the UI
	$(PY) -m serving.demo_check --ui-port $(UI_PORT)

test-prerequisites: venv chromium postgres nginx grpc archive

test: test-prerequisites
	$(PY) -m pytest tests

test-fast: venv export  # the unit tests alone (pytest.ini: markers): ~30 s
	$(PY) -m pytest tests -m unit -q

docs-screenshots: test-prerequisites  # refresh docs/ui_*.png from a browser run
	UPDATE_DOCS=1 $(PY) -m pytest tests/test_ui.py

evaluate: venv
	$(PY) -m training.evaluate

.PHONY: calibrate
calibrate: venv  # temperature scaling of every shipped model (needs the data sets): training/calibrate.py
	$(PY) -m training.calibrate

corrections: venv  # predictions users corrected, as a data set: make corrections MODEL=mnist_lenet5
	$(PY) -m serving.corrections --model $(MODEL) --out data/corrections/$(MODEL)

train-%: venv
	$(PY) -m training.train --model $* --ship

clean: stop
	rm -rf optimize/exported model_store/*.mar model_store/manifest.json .run

# Serving formats (optimize/formats.py): `make archive` builds and validates every format models.yaml
# lists; these measure them in-process (results/formats/). The quick run is the CI smoke run's size.
.PHONY: bench-formats bench-formats-quick tune
tune: archive  # measure again: the fastest archived version per model on this CPU becomes its default
	$(PY) -m optimize.tune

bench-formats: archive
	$(PY) -m optimize.bench_formats

bench-formats-quick: archive
	$(PY) -m optimize.bench_formats --quick

# Load tests (loadtest/) against the server `make serve` started; results in results/loadtest/<time>/.
# e.g. make loadtest USERS=32 DURATION=30 PROTOCOL=grpc TARGETS="mnist_lenet5:1.1=1"
# Distributed: make loadtest WORKERS=4 (a Locust master and 4 worker processes); another server:
# make loadtest HOST=http://<load balancer>:8080 KEY_FILE=<its key file> TARGETS=mnist_lenet5 (REST)
WORKERS ?= 0
HOST ?=
KEY_FILE ?=
USERS ?= 16
SPAWN_RATE ?= 16
DURATION ?= 60
PROTOCOL ?= rest
TARGETS ?=
TARGET_ARG = $(if $(TARGETS),--targets "$(TARGETS)")
REMOTE_ARGS = $(if $(HOST),--host "$(HOST)") $(if $(KEY_FILE),--key-file "$(KEY_FILE)")
.PHONY: loadtest loadtest-knee bench-serving soak
loadtest: venv grpc
	$(PY) -m loadtest.run --users $(USERS) --spawn-rate $(SPAWN_RATE) --duration $(DURATION) --protocol $(PROTOCOL) $(TARGET_ARG) \
		--workers $(WORKERS) $(REMOTE_ARGS)

loadtest-knee: venv grpc  # step load: the highest request rate whose p99 stays under the SLO
	$(PY) -m loadtest.run --step --protocol $(PROTOCOL) $(TARGET_ARG)

soak: venv grpc archive  # 20 minutes of mixed load on a TorchServe of its own: memory and p99 over time
	$(PY) -m loadtest.soak

bench-serving: venv grpc archive  # the tuning sweep and the Flask baseline, side by side (~40 min): BENCHMARKS.md
	$(PY) -m loadtest.bench

# Container deployment (deploy/, README "Deploy"): 2 TorchServe replicas behind nginx, PostgreSQL, the
# UI, with podman and podman-compose. DEPLOY_BASE: the images' base; by default one built here from
# Debian's packages (this machine pulls from no container registry); elsewhere e.g.
# make deploy-up DEPLOY_BASE=docker.io/library/python:3.11-slim-bookworm
DEPLOY_BASE ?= localhost/deploy-base:bookworm
DEPLOY_COMPOSE = deploy/.tools/bin/podman-compose -f deploy/compose.yaml
DEPLOY_BUILD = podman build --format docker --build-arg BASE=$(DEPLOY_BASE)
# pip inside a build: this machine's pip configuration and CA bundle, as build secrets (not in the image)
DEPLOY_PIP_SECRETS = --secret id=pip_conf,src=deploy/.build/pip.conf --secret id=pip_cert,src=deploy/.build/pip_cert
.PHONY: deploy-tools deploy-base deploy-images deploy-keys deploy-up deploy-down deploy-reload-keys test-deploy
deploy-tools deploy-base deploy-images deploy-up deploy-down deploy-reload-keys test-deploy: export CONTAINERS_CONF = $(CURDIR)/deploy/containers.conf

deploy-tools:  # podman (with runc: crun refuses this machine's hybrid cgroups), mmdebstrap, podman-compose
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v mmdebstrap >/dev/null || \
		(apt-get update -q && apt-get install -y -q podman runc uidmap slirp4netns fuse-overlayfs mmdebstrap)
	@test -x deploy/.tools/bin/podman-compose || (python3 -m venv deploy/.tools && \
		deploy/.tools/bin/pip install -q --disable-pip-version-check -r deploy/requirements-tools.txt)

deploy-base: deploy-tools
	@case "$(DEPLOY_BASE)" in localhost/deploy-base:*) podman image exists $(DEPLOY_BASE) || \
		deploy/base/build-base.sh $(DEPLOY_BASE);; esac

deploy-images: deploy-base archive
	deploy/context.sh deploy/.build/context
	@cp $${PIP_CONFIG_FILE:-/etc/pip.conf} deploy/.build/pip.conf 2>/dev/null || : > deploy/.build/pip.conf
	@cp $${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt} deploy/.build/pip_cert 2>/dev/null || : > deploy/.build/pip_cert
	$(DEPLOY_BUILD) $(DEPLOY_PIP_SECRETS) --target serve -t localhost/digits-serve:latest -f deploy/Containerfile deploy/.build/context
	$(DEPLOY_BUILD) $(DEPLOY_PIP_SECRETS) --target ui -t localhost/digits-ui:latest -f deploy/Containerfile deploy/.build/context
	$(DEPLOY_BUILD) -t localhost/digits-nginx:latest -f deploy/nginx/Containerfile deploy/nginx
	$(DEPLOY_BUILD) -t localhost/digits-postgres:latest -f deploy/postgres/Containerfile deploy/postgres
	@rm -f deploy/.build/pip.conf deploy/.build/pip_cert
	@podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep 'localhost/digits-'

deploy-keys:
	@python3 deploy/make-keys.py

deploy-up: deploy-images deploy-keys
	$(DEPLOY_COMPOSE) up -d
	python3 deploy/wait.py --timeout 900
	@echo "inference and management (read-only): http://127.0.0.1:$${DEPLOY_PORT:-8180}  UI: http://127.0.0.1:$${DEPLOY_UI_PORT:-8601}"
	@echo "metrics: http://127.0.0.1:$${DEPLOY_PORT:-8180}/metrics/ts1 and /metrics/ts2; keys: deploy/secrets/ts_keys.json"

deploy-down: deploy-tools
	$(DEPLOY_COMPOSE) down -v

deploy-reload-keys:  # after python3 deploy/make-keys.py --force: nginx takes the new keys, no restart
	podman exec digits-nginx python3 /opt/nginx/entrypoint.py reload

test-deploy: deploy-images venv
	DEPLOY_TESTS=1 $(PY) -m pytest -v -s tests/test_deploy.py
