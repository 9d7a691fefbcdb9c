# GeoPEFT: one entry point for set-up, demo, tests and benchmarks.
# `make install` is idempotent: each step is skipped when its inputs have not changed.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SYSPY ?= /usr/bin/python3
export QT_QPA_PLATFORM ?= offscreen
APT_PKGS := qgis python3-qgis python3-venv

.PHONY: install apt venv demo test test-all check-setup bench bench-loop bench-matrix plugin qgis screenshots clean

install: apt $(VENV)/.install-stamp

# Debian's QGIS (no recommends) and the venv module; skipped when already installed.
apt:
	@if [ "$$(dpkg-query -W -f='$${Status}\n' $(APT_PKGS) 2>/dev/null | grep -c 'install ok installed')" = "$(words $(APT_PKGS))" ]; then \
	  echo "apt: $(APT_PKGS) already installed"; \
	else \
	  echo "apt: installing $(APT_PKGS)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PKGS); \
	fi

$(VENV)/bin/python:
	$(SYSPY) -m venv --system-site-packages $(VENV)

# Re-run pip only when the dependency files change.
$(VENV)/.install-stamp: $(VENV)/bin/python pyproject.toml constraints.txt
	$(PY) -m pip install -q --upgrade "pip>=24" setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -c "import engine.models, timm, peft, rasterio, fiona, onnxruntime, qgis.core; print('engine environment OK')"
	touch $@

demo: install
	$(PY) -m engine demo --out demo

test: install
	$(PY) -m pytest

test-all: install
	$(PY) -m pytest -m ''

# The plugin's "Set up engine…" for real (network, about 5 minutes; not in `make test`): its
# commands into a fresh venv without system site-packages plus the engine's smoke test, and
# its requirement set resolved to wheels for Linux/Windows/macOS × Python 3.10-3.13 (a table).
check-setup: install
	$(PY) -m pytest -m slow -s -q tests/plugin/test_engine_setup.py

# TerraTorch runs side by side from a throwaway venv outside the checkout (made on first use, a
# few minutes); `make bench TERRATORCH=` skips it.
TERRATORCH ?= ../ttvenv
bench: install
	$(PY) bench/run.py $(if $(TERRATORCH),--terratorch $(TERRATORCH))

# The analyst's loop on the demo scene: held-out mIoU after each labelling round (about 10 minutes).
bench-loop: install
	$(PY) bench/analyst_loop.py --out bench_loop --budget 90s --rounds 3 --scratch

# The PEFT matrix (backbones × tuning methods: trainable parameters, peak memory, step time, mIoU
# after 120 s of training on the real Sen1Floods11 chip), TerraTorch's LoRA side by side (about
# 90 minutes on 2 cores); `make bench-matrix MATRIX_ARGS=--quick` is a smoke test (a few minutes).
MATRIX_ARGS ?=
bench-matrix: install
	$(PY) bench/peft_matrix.py $(if $(TERRATORCH),--terratorch $(TERRATORCH)) $(MATRIX_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info demo bench_loop

# --- QGIS plugin ---------------------------------------------------------------------------
# dist/geopeft-<version>.zip: folder geopeft/ (qgis_plugin/ + the engine source in
# geopeft/engine_src/ for "Set up engine"). qgis_plugin/metadata.txt is the one source of the
# plugin metadata; this also refreshes its copy in the repository root (metadata.txt).
PLUGIN_DIST ?= dist
plugin:
	$(SYSPY) qgis_plugin/packaging.py zip --out $(PLUGIN_DIST)

# Install the zip into a QGIS profile, enable it (QGIS3.ini [PythonPlugins] geopeft=true), point
# its engine Python at this repository's venv, then start QGIS with that profile.
# `make qgis QGIS_RUN=true QGIS_PROFILES_PATH=/tmp/p` installs without starting QGIS.
QGIS_PROFILES_PATH ?= $(HOME)/.local/share/QGIS/QGIS3
QGIS_PROFILE ?= default
PROFILE_DIR ?= $(QGIS_PROFILES_PATH)/profiles/$(QGIS_PROFILE)
QGIS_RUN ?= qgis
qgis: install plugin
	$(SYSPY) qgis_plugin/packaging.py install --profile-dir "$(PROFILE_DIR)" \
	  --zip-dir $(PLUGIN_DIST) --engine-python "$(abspath $(PY))"
	$(QGIS_RUN) --profiles-path "$(QGIS_PROFILES_PATH)" --profile "$(QGIS_PROFILE)"

# docs/*-dialog.png: the plugin's dialogs rendered offscreen.
screenshots: install
	$(PY) tests/plugin/screenshots.py --out docs
