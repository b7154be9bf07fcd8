"""End to end on GPUs: SGLang engines with the flashinfer backend, dcp=1 against dcp=2.

Same weights (seeded random bf16 safetensors: every head differs, unlike SGLang's dummy
weights, which repeat on every TP shard), same requests: 64 greedy prompts of mixed lengths
up to 32k tokens in one batch (chunked prefill), radix-cache prefix hits and seeded
sampling. DCP runs with and without decode CUDA graphs. Results go to ``$DCP_RESULTS_DIR``.
"""

import json
import os
import random

import pytest
import torch

from sglang_dcp.test.engine_compare import compare, mixed_scenario, run_engine
from sglang_dcp.test.models import write_random_gqa_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs"),
]

VOCAB_SIZE = 4096
MAX_NEW_TOKENS = 16
# bf16 weights, activations and KV: DCP changes the summation order of the softmax
# (a split over D shards plus an fp32 LSE merge), so near-tied logits can flip.
MIN_IDENTICAL_FRACTION = 0.9
LOGPROB_TOL = 0.1


def prompt_lengths(seed=0):
    rng = random.Random(seed)
    short = [rng.randint(1, 512) for _ in range(48)]
    medium = [rng.randint(1024, 8192) for _ in range(13)]
    return short + medium + [16384, 24576, 32000]


def engine_kwargs(tp_size, graphs):
    return dict(
        tp_size=tp_size,
        attention_backend="flashinfer",
        mem_fraction_static=0.6,
        max_total_tokens=300_000,
        context_length=40960,
        skip_tokenizer_init=True,
        grammar_backend="none",
        disable_cuda_graph=not graphs,
        disable_prefill_cuda_graph=True,  # DCP's setting; the same eager prefill for both
        cuda_graph_max_bs_decode=80,
        random_seed=0,
        log_level="warning",
    )


@pytest.mark.parametrize(
    "tp_size,num_heads,num_kv_heads", [(2, 16, 1), (4, 32, 2)], ids=["tp2-kv1", "tp4-kv2"]
)
def test_dcp2_matches_tp(tmp_path, tp_size, num_heads, num_kv_heads):
    if torch.cuda.device_count() < tp_size:
        pytest.skip(f"needs {tp_size} GPUs")
    model = write_random_gqa_model(
        str(tmp_path / "model"),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=128,
        hidden_size=1024,
        num_hidden_layers=4,
        intermediate_size=2048,
        vocab_size=VOCAB_SIZE,
        torch_dtype="bfloat16",
        max_position_embeddings=40960,
        initializer_range=0.1,
    )
    scenario = mixed_scenario(VOCAB_SIZE, prompt_lengths(), MAX_NEW_TOKENS)
    reference = run_engine(model, scenario, dcp_size=1, **engine_kwargs(tp_size, graphs=True))
    results = {"case": f"tp{tp_size}-kv{num_kv_heads}", "num_requests": len(reference.results)}
    failures = []
    for graphs in (True, False):
        candidate = run_engine(model, scenario, dcp_size=2, **engine_kwargs(tp_size, graphs))
        agreement = compare(reference, candidate)
        label = "dcp2-graphs" if graphs else "dcp2-eager"
        results[label] = {
            "capacity": candidate.capacity,
            "capacity_ratio": candidate.capacity / reference.capacity,
            "identical_fraction": agreement.identical_fraction,
            "max_logprob_diff": agreement.max_logprob_diff,
        }
        print(label, results[label], flush=True)
        if candidate.capacity != 2 * reference.capacity:
            failures.append(f"{label}: capacity {candidate.capacity} != 2 x {reference.capacity}")
        if agreement.identical_fraction < MIN_IDENTICAL_FRACTION:
            failures.append(f"{label}: identical {agreement.identical_fraction:.3f}")
        if agreement.max_logprob_diff > LOGPROB_TOL:
            failures.append(f"{label}: logprob diff {agreement.max_logprob_diff:.4f}")
    results["reference_capacity"] = reference.capacity
    out_dir = os.environ.get("DCP_RESULTS_DIR")
    if out_dir:
        with open(os.path.join(out_dir, f"e2e_{results['case']}.json"), "w") as f:
            json.dump(results, f, indent=1)
    assert not failures, failures
