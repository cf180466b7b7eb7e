# make demo   -- install (once) and train the embedded default on CPU
# make test   -- install (once) and run the test suite
# make bench  -- the benchmark of every engine (issue 4), quick version
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	touch $@

demo: install
	$(PY) -m src fit --config configs/demo.yaml

test: install
	$(PY) -m pytest -q -p no:cacheprovider

bench: install
	$(PY) -m src bench --quick --out_dir runs/bench

clean:
	rm -rf runs .pytest_cache
