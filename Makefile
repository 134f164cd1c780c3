# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATE   := $(shell date +%Y-%m-%d)
# The CPU build of torch (a local wheel on our machines); never let pip pull the multi-GB CUDA build.
TORCH  ?= torch==2.13.0
TRITON ?= triton==3.9.0; platform_system == "Linux" and platform_machine == "x86_64"
# timm for the accelerate tests on a real ViT, with the torchvision built for $(TORCH), both without
# their dependencies (resolving them would pull the CUDA torch); see tests/timm_compat.py.
TIMM   ?= timm==1.0.31 torchvision==0.28.0 pillow

.PHONY: install test demo bench audit clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)" '$(TRITON)'
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(TIMM)
	touch $(STAMP)

# The whole suite, Triton kernels under the interpreter (no GPU needed).
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m jepa_engine demo

audit: $(STAMP)
	$(PY) -m jepa_engine.kernels.audit

bench: $(STAMP)
	mkdir -p benches/results
	$(PY) -m pytest benches -q --benchmark-json=benches/results/$$($(PY) -m benches.device_tag)-$(DATE)-bench.json
	$(PY) -m benches.report benches/results/$$($(PY) -m benches.device_tag)-$(DATE)-bench.json

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
