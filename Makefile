# Two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python
DATA_DIR ?= ../shared/data
UI_PORT ?= 8501
# Models with shipped weights are exported, archived and served.
WEIGHTS := $(wildcard training/weights/*.pt)
EXPORTS := $(patsubst training/weights/%.pt,optimize/exported/%/export.json,$(WEIGHTS))

.PHONY: help venv java chromium postgres grpc export archive serve stop ui demo test evaluate corrections clean
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

serving/grpc_stubs/inference_pb2_grpc.py: .venv/.installed serving/generate_grpc.py
	$(PY) -m serving.generate_grpc

grpc: serving/grpc_stubs/inference_pb2_grpc.py

optimize/exported/%/export.json: training/weights/%.pt optimize/export.py | venv
	$(PY) -m optimize.export --model $* --data-dir $(DATA_DIR)

export: $(EXPORTS)

model_store/manifest.json: $(EXPORTS) model_store/models.yaml model_store/archive.py $(wildcard handlers/*.py) | venv
	$(PY) -m model_store.archive

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
		--server.headless true --browser.gatherUsageStats false > .run/ui.log 2>&1 & echo $$! > .run/ui.pid
	@echo "UI: http://127.0.0.1:$(UI_PORT)"

demo: serve ui
	@echo "Open http://127.0.0.1:$(UI_PORT) to draw a digit; \`make stop\` stops everything."

test: venv chromium postgres grpc archive
	$(PY) -m pytest tests

evaluate: venv
	$(PY) -m training.evaluate --data-dir $(DATA_DIR)

corrections: venv  # predictions users corrected, as a data set: make corrections MODEL=mnist_lenet5
	$(PY) -m serving.corrections --model $(MODEL) --out data/corrections/$(MODEL)

train-%: venv
	$(PY) -m training.train --model $* --data-dir $(DATA_DIR) --ship

clean: stop
	rm -rf optimize/exported model_store/*.mar model_store/manifest.json .run
