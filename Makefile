# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATE   := $(shell date +%Y-%m-%d)
# The CPU build of torch (a local wheel on our machines); never let pip pull the multi-GB CUDA build.
TORCH  ?= torch==2.13.0
TRITON ?= triton==3.9.0; platform_system == "Linux" and platform_machine == "x86_64"
# timm for the accelerate tests and README example on a real ViT, with the torchvision built for
# $(TORCH), both without their dependencies (resolving them would pull the CUDA torch). PyPI's
# torchvision is a CUDA build: the .pth written after it lets it import on the CPU torch (see
# jepa_engine/integrations/torchvision_cpu.py).
TIMM   ?= timm==1.0.31 torchvision==0.28.0 pillow

# stable-worldmodel for the TwoRoom / PushT benchmarks (`make envs`): the `envs` extra of pyproject.toml,
# then stable-worldmodel itself without its declared dependencies (they would pull a CUDA torch), every
# package already in the venv pinned to its installed version (torch, triton and numpy stay as they are).
# Reacher's MuJoCo renders headless through EGL or OSMesa: Mesa's EGL is installed when neither is there.
SWM       ?= stable-worldmodel==0.1.1
ENVS_STAMP := $(VENV)/.envs-installed

.PHONY: install test demo bench audit clean envs native

install: $(STAMP) native

# The native operator library jepa_engine/_C.so (CMakeLists.txt, csrc/) against the venv's libtorch; an
# incremental rebuild. Without cmake or a C++ compiler, or if the build fails, it says why and the
# package runs its Python path (`jepa-engine selfcheck` lists each op's path). CXX=clang++ picks the compiler.
# The library is built first (target jepa_engine_ops), then the rest: the C++ runner $(NATIVE_BUILD)/jepa_plan
# (cpp/), where the wheel's libtorch has the AOTInductor package loader. A runner that fails to build is
# removed with its own message, and the library stays.
NATIVE_BUILD ?= build/native
NATIVE_PY    := every op runs its Python path
native: $(STAMP)
	@mkdir -p $(NATIVE_BUILD); if ! command -v cmake >/dev/null 2>&1; then \
		echo "native: cmake not found; jepa_engine/_C.so is not built and $(NATIVE_PY)"; \
	elif ! command -v $(CXX) >/dev/null 2>&1; then \
		echo "native: no C++ compiler ($(CXX)) found; jepa_engine/_C.so is not built and $(NATIVE_PY)"; \
	elif ! { CXX=$(CXX) cmake -S . -B $(NATIVE_BUILD) -DCMAKE_BUILD_TYPE=Release \
			-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" >$(NATIVE_BUILD).log 2>&1 \
		&& cmake --build $(NATIVE_BUILD) -j2 --target jepa_engine_ops >>$(NATIVE_BUILD).log 2>&1; }; then \
		rm -f jepa_engine/_C.so $(NATIVE_BUILD)/jepa_plan; tail -n 20 $(NATIVE_BUILD).log; \
		echo "native: the build failed (log: $(NATIVE_BUILD).log); $(NATIVE_PY)"; \
	else \
		echo "native: jepa_engine/_C.so is up to date"; \
		if ! cmake --build $(NATIVE_BUILD) -j2 >>$(NATIVE_BUILD).log 2>&1; then \
			rm -f $(NATIVE_BUILD)/jepa_plan; tail -n 20 $(NATIVE_BUILD).log; \
			echo "native: the C++ runner jepa_plan failed to build (log: $(NATIVE_BUILD).log); jepa_engine/_C.so is built"; \
		elif [ -x $(NATIVE_BUILD)/jepa_plan ]; then \
			echo "native: the C++ runner $(NATIVE_BUILD)/jepa_plan is up to date"; \
		else \
			echo "native: the C++ runner jepa_plan is not built (JEPA_ENGINE_RUNNER=OFF, or see $(NATIVE_BUILD).log)"; \
		fi; \
	fi

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)" '$(TRITON)'
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(TIMM)
	$(PY) -m jepa_engine.integrations.torchvision_cpu --install
	touch $(STAMP)

envs: $(ENVS_STAMP)

$(ENVS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip freeze --exclude-editable > $(VENV)/envs-constraints.txt
	$(PY) -c "import tomllib; print('\\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['envs']))" > $(VENV)/envs-requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check -c $(VENV)/envs-constraints.txt -r $(VENV)/envs-requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps "$(SWM)"
	$(PY) -c "import stable_worldmodel.world, stable_worldmodel.envs.two_room, stable_worldmodel.envs.pusht.env"
	$(PY) -c "import stable_worldmodel.envs.dmcontrol.reacher"
	ldconfig -p | grep -q -e libEGL.so.1 -e libOSMesa || apt-get install -y -q libegl1 libegl-mesa0 libgl1-mesa-dri \
		|| echo "make envs: no libEGL or libOSMesa, and apt-get could not install them: MuJoCo envs (Reacher) will not render"
	touch $(ENVS_STAMP)

# The whole suite, Triton kernels under the interpreter (no GPU needed); the stable-worldmodel tests
# need `make envs` (installed first).
# The native build (C++ compiles) and `make envs` (mostly downloads and unpacking) run side by side.
test: $(STAMP)
	@$(MAKE) --no-print-directory -j2 native envs
	TRITON_INTERPRET=1 $(PY) -m pytest -q

demo: $(STAMP) native
	$(PY) -m jepa_engine demo

audit: $(STAMP)
	$(PY) -m jepa_engine.kernels.audit

bench: $(STAMP)
	mkdir -p benches/results
	$(PY) -m pytest benches -q --benchmark-json=benches/results/$$($(PY) -m benches.device_tag)-$(DATE)-bench.json
	$(PY) -m benches.report benches/results/$$($(PY) -m benches.device_tag)-$(DATE)-bench.json

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks

# The GPU evidence in one command: `make gpu-report [OUT=folder] [STAGES=all|tests|measure|a,b,c]`
# (jepa_engine/gpu_report.py). With an NVIDIA GPU it runs under the system python3, which has the CUDA
# torch, and installs this package into it without a registry; elsewhere under the venv, as the short
# rehearsal. REPORT_PY=... picks the interpreter. `make gpu-wheels` (needs a registry) puts the
# pure-Python test/runtime packages a GPU machine may lack into wheels/, which the report installs from.
OUT        ?= runs/gpu-report
STAGES     ?= all
HAS_GPU     = $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
REPORT_PY  ?= $(if $(HAS_GPU),python3,$(PY))

.PHONY: gpu-report gpu-wheels
gpu-report:
	$(if $(HAS_GPU),,$(MAKE) --no-print-directory install)
	$(REPORT_PY) jepa_engine/gpu_report.py --out "$(OUT)" --stages "$(STAGES)" $(if $(HAS_GPU),--install)

gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --disable-pip-version-check --only-binary=:all: --no-deps --python-version 3.12 \
		-d wheels hypothesis sortedcontainers tqdm
