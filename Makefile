# The MoE book: set-up, build and test.
#
#   make book       create .venv (first time only), install, execute and render the HTML book
#   make test       lint + unit tests + every notebook under nbval + the book build (-W) +
#                   the rendered pages checked in headless Chromium + chapters run from the wheel
#
# Every target works from a fresh clone: the ones that need Python depend on `venv`.

PYTHON3 ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
JB      := $(VENV)/bin/jupyter-book
RUFF    := $(VENV)/bin/ruff

# torch is pinned once, in requirements.txt; the venv recipe installs that version first.
TORCH_VERSION := $(shell sed -n 's/^torch==//p' requirements.txt)
# Extra pip arguments for the torch install, e.g. `--index-url <a CPU-only wheel index>`.
TORCH_PIP_ARGS ?=

NOTEBOOKS := $(wildcard notebooks/*.ipynb)
# `make nb NB=notebooks/02_top_k.ipynb` tests one chapter.
NB ?= notebooks
# nbval options: --nbval-lax (outputs are not stored; the assert cells are the checks),
# the kernel of this venv, and tests/conftest.py as a plugin (it lives outside notebooks/, so
# pytest would not load it on its own; it skips cells tagged "cuda" on a machine without CUDA).
NBVAL := -p tests.conftest -p no:cacheprovider --nbval-lax --nbval-current-env

# lint -> unit -> nb, in that order, even under `make -j`.
.NOTPARALLEL:
.PHONY: help venv book book-fast unit nb lint test browser browser-deps strip clean wheel-test

help:
	@echo "make book       build the HTML book (executes every chapter; creates .venv first)"
	@echo "make book-fast  build the HTML book without executing the notebooks"
	@echo "make test       lint, unit tests, nbval over every notebook, book build, browser check"
	@echo "make unit | nb | lint | browser | wheel-test | strip | clean | venv"
	@echo "make nb NB=notebooks/02_top_k.ipynb   test one notebook"

venv: $(VENV)

# The venv directory is the target, so it is made once and remade only when requirements.txt
# or pyproject.toml is newer. It is back-dated while the installs run, so a failed install is
# retried by the next `make`. torch goes first in a pip call of its own: pinned and alone it
# resolves to the local CPU wheel; left to the resolver of the big install it could pull a
# multi-GB CUDA build.
$(VENV): requirements.txt pyproject.toml
	@test -d $@ || $(PYTHON3) -m venv $@
	@touch -t 200001010000 $@
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH_PIP_ARGS) torch==$(TORCH_VERSION)
	$(PIP) install -r requirements.txt
	@touch $@

book: venv
	MOE_BOOK_STATIC=1 $(JB) build . -W --keep-going
	@echo
	@echo "Open the book: file://$(CURDIR)/_build/html/index.html"

# jupyter-book 1.x has no command-line switch for execution and --config replaces (does not
# merge with) _config.yml, so write a copy of _config.yml with execution off and build with it.
# Notebooks render with no outputs (they are stored stripped); use it to check prose and layout.
# The copy lives in _build/, so the local Sphinx extensions' folders (book/_ext: the offline
# MathJax) are made absolute: jupyter-book resolves them from the config file's folder.
book-fast: venv
	@mkdir -p _build
	$(PY) -c 'import os, yaml; c = yaml.safe_load(open("_config.yml")); \
	  c.setdefault("execute", {})["execute_notebooks"] = "off"; \
	  ext = c.get("sphinx", {}).get("local_extensions") or {}; \
	  ext.update({k: os.path.abspath(v) for k, v in ext.items()}); \
	  yaml.safe_dump(c, open("_build/_config.noexec.yml", "w"), sort_keys=False)'
	MOE_BOOK_STATIC=1 $(JB) build . --keep-going --config _build/_config.noexec.yml
	@echo
	@echo "Open the book (not executed): file://$(CURDIR)/_build/html/index.html"

unit: venv
	$(PY) -m pytest tests -q --ignore=tests/browser

# The rendered book in headless Chromium (Debian's package, driven by Playwright; no browser
# download). Needs `make book` first; screenshots go to _build/screenshots/.
browser: venv browser-deps
	$(PY) -m pytest tests/browser -q -p no:cacheprovider

browser-deps:
	@test -x /usr/bin/chromium || { \
	  echo "installing Debian's chromium (needs root)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

nb: venv
	@if [ -z "$$(find $(NB) -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' 2>/dev/null)" ]; then \
	  echo "nb: no notebooks under $(NB); nothing to test"; \
	else \
	  echo "$(PY) -m pytest $(NBVAL) $(NB) -q"; \
	  $(PY) -m pytest $(NBVAL) $(NB) -q; \
	fi

lint: venv
	$(RUFF) check $(wildcard moe_lib tests bench)

# The chapters run twice: under nbval (the asserts are the checks) and in the book build (-W:
# warnings are errors). Each kernel uses one CPU thread (the set-up cell), so on a 2-core machine
# the two run side by side; the build's log goes to _build/book.log. Then the browser checks.
test: lint unit
	@mkdir -p _build
	@$(MAKE) --no-print-directory book >_build/book.log 2>&1 & book_pid=$$!; \
	  $(MAKE) --no-print-directory nb; nb_status=$$?; \
	  wait $$book_pid; book_status=$$?; \
	  echo "---- make book (last lines of _build/book.log) ----"; tail -n 25 _build/book.log; \
	  if [ $$nb_status -ne 0 ]; then echo "make test: nbval failed"; fi; \
	  if [ $$book_status -ne 0 ]; then echo "make test: the book build failed (_build/book.log)"; fi; \
	  [ $$nb_status -eq 0 ] && [ $$book_status -eq 0 ]
	@$(MAKE) --no-print-directory browser
	@$(MAKE) --no-print-directory wheel-test

# Chapters as a reader runs them (in Colab, say): copied to an empty folder outside the clone,
# against moe_lib installed from a freshly built wheel (not editable) with its `book` extra, in
# a venv of its own. A module or data file missing from the wheel fails here.
WHEEL_DIR      := _build/dist
WHEEL_VENV     := _build/wheel-venv
WHEEL_CHAPTERS := notebooks/06_efficient_dispatch.ipynb notebooks/08_moe_language_model.ipynb

wheel-test: venv
	rm -rf $(WHEEL_DIR)
	$(PIP) wheel --no-deps --no-build-isolation -q -w $(WHEEL_DIR) .
	@test -x $(WHEEL_VENV)/bin/python || $(PYTHON3) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q --upgrade pip
	$(WHEEL_VENV)/bin/python -m pip install -q $(TORCH_PIP_ARGS) torch==$(TORCH_VERSION)
	grep -v '^-e' requirements.txt > _build/constraints.txt
	$(WHEEL_VENV)/bin/python -m pip install -q -c _build/constraints.txt \
	  "$$(ls $(WHEEL_DIR)/moe_lib-*.whl)[book]" nbval ipykernel pytest
	$(WHEEL_VENV)/bin/python -m pip install -q --force-reinstall --no-deps $(WHEEL_DIR)/moe_lib-*.whl
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && cp $(WHEEL_CHAPTERS) "$$tmp" && \
	  cd "$$tmp" && py="$(CURDIR)/$(WHEEL_VENV)/bin/python" && \
	  "$$py" -c 'import moe_lib, pathlib, sys; f = pathlib.Path(moe_lib.__file__).resolve(); \
	    print("moe_lib", moe_lib.__version__, "from", f); \
	    sys.exit("moe_lib comes from the clone, not the wheel" if "$(CURDIR)" in str(f) \
	             and "$(WHEEL_VENV)" not in str(f) else 0)' && \
	  echo "running $(notdir $(WHEEL_CHAPTERS)) in $$tmp" && \
	  "$$py" -m pytest --nbval-lax --nbval-current-env -p no:cacheprovider -q *.ipynb

strip: venv
ifeq ($(NOTEBOOKS),)
	@echo "strip: no notebooks yet"
else
	$(VENV)/bin/nbstripout $(NOTEBOOKS)
endif

clean:
	rm -rf _build
