# The two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
CACHE := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/pneumonia
export NO_ALBUMENTATIONS_UPDATE := 1

MLFLOW_PORT ?= 5000
MLFLOW_BACKEND ?= sqlite:///$(CURDIR)/mlflow-server.db
MLFLOW_ARTIFACTS ?= $(CURDIR)/mlflow-server-artifacts
# The model `make serve` serves (docs/deploy.md) and its port.
MODEL ?= models:/pneumonia@champion
SERVE_PORT ?= 5001
# Servers run in their own process group; stopping them (Ctrl-C) stops the whole group.
IN_OWN_GROUP := $(CURDIR)/scripts/own-group.sh

.PHONY: venv demo test scratch-cpu pretrained-cpu mlflow-ui mlflow-server serve screenshots

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# These torch builds lie on our machines' disk; pyproject accepts a wider range elsewhere.
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[dev,weights]"
	touch $@

venv: $(VENV)/.installed

# Trains both stages on the built-in synthetic data set (CPU, a few minutes), evaluates the
# two-stage pipeline on the synthetic test split (registering it as models:/pneumonia@champion)
# and explains a few test images.
demo: venv
	$(PY) train.py -m experiment=demo stage=binary,subtype
	$(PY) evaluate.py binary=latest subtype=latest register=pneumonia register_alias=champion
	$(PY) explain.py model_uri=models:/pneumonia@champion limit=6 \
		input=$(CACHE)/synthetic-seed0/test/PNEUMONIA
	@echo
	@echo "MLflow runs: sqlite database $(CURDIR)/mlflow.db, artifacts in $(CURDIR)/mlartifacts"
	@echo "Browse them:  make mlflow-ui   (then open http://127.0.0.1:5000)"
	@echo "Serve the registered pipeline:  make serve   (models:/pneumonia@champion, port $(SERVE_PORT))"
	@echo 'Query it:  printf "{\"dataframe_records\": [{\"image\": \"%s\"}]}" "$$(base64 -w0 "$$(ls $(CACHE)/synthetic-seed0/test/PNEUMONIA/* | head -1)")" | curl -s -H "Content-Type: application/json" --data @- http://127.0.0.1:$(SERVE_PORT)/invocations'

# Two pytest workers, each with half the CPU threads (tests/conftest.py): on a 2-core AMD EPYC
# the suite took 469-598 s, against 779-858 s one test after the other (much of a test is
# process start-up and I/O, which the two workers overlap).
TEST_WORKERS ?= 2
test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS)

# The from-scratch CPU recipe on real data (docs/notes/scratch-cpu-history.md): both stages,
# then the two-stage evaluation on the test folder with thresholds chosen on validation.
# make scratch-cpu DATA=/path/to/chest_xray
scratch-cpu: venv
	@test -n "$(DATA)" || (echo "usage: make scratch-cpu DATA=/path/to/chest_xray" >&2; exit 2)
	$(PY) train.py -m experiment=scratch_cpu data.root=$(DATA)
	$(PY) evaluate.py sweep=$$(ls -td multirun/scratch_cpu/*/ | head -1) tta=true

# The pretrained CPU recipe (docs/results.md): EfficientNet-Lite0 from the ImageNet weights that
# install with the project, fine-tuned, both stages, three seeds, then the evaluation.
# make pretrained-cpu DATA=/path/to/chest_xray
pretrained-cpu: venv
	@test -n "$(DATA)" || (echo "usage: make pretrained-cpu DATA=/path/to/chest_xray" >&2; exit 2)
	$(PY) train.py -m experiment=pretrained_cpu data.root=$(DATA)
	$(PY) evaluate.py sweep=$$(ls -td multirun/pretrained_cpu/*/ | head -1) tta=true

mlflow-ui: venv
	$(IN_OWN_GROUP) $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port 5000

# The MLflow UI screenshots in docs/ (docs/deploy.md), after make demo; needs Debian's chromium.
screenshots: venv
	$(CURDIR)/scripts/mlflow-screenshots.sh docs

# A real tracking server for a team: runs log with logger.tracking_uri=http://127.0.0.1:5000.
# MLFLOW_BACKEND may be a PostgreSQL URI (postgresql://user:password@host/db).
mlflow-server: venv
	$(IN_OWN_GROUP) $(VENV)/bin/mlflow server --backend-store-uri $(MLFLOW_BACKEND) \
		--artifacts-destination $(MLFLOW_ARTIFACTS) --serve-artifacts \
		--host 127.0.0.1 --port $(MLFLOW_PORT)

# The registered pipeline behind MLflow's scoring server: POST /invocations (docs/deploy.md).
# make serve MODEL=models:/<name>@<alias> (or runs:/<run id>/pipeline, or a model folder)
serve: venv
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} \
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(IN_OWN_GROUP) $(VENV)/bin/mlflow models serve \
		-m "$(MODEL)" --env-manager local -h 127.0.0.1 -p $(SERVE_PORT)
