"""End to end on GPUs: SGLang engines with the flashinfer backend, dcp=1 against dcp=2.

Same weights (seeded random bf16 safetensors: every head differs, unlike SGLang's dummy
weights, which repeat on every TP shard), same requests, same settings but ``dcp_size``:

* ``tp2-kv1`` (2 GPUs) and ``tp4-kv2`` (4 GPUs), Qwen3, page size 1: 64 greedy prompts of
  mixed lengths up to 32k tokens in one batch (chunked prefill), radix-cache prefix hits
  and seeded sampling; DCP with and without decode CUDA graphs.
* ``tp2-llama-page16`` and ``tp2-qwen3moe-page16``: Llama and Qwen3-MoE (8 experts, top 2;
  DCP turns its fused RoPE + KV store off) at page size 16 (a logical page of 32 under DCP2),
  31 prompts up to 16k, decode CUDA graphs on.
* ``tp2-fp8-kv``: Qwen3 with an FP8 (e4m3) KV cache, DCP storing with scale 0.5 on every
  layer (``--quantization-param-path``) against a reference without scales, graphs on and off.

Each case requires exactly 2x the logical KV capacity, top-5 logprobs within a tolerance up
to each request's first differing token, and every greedy divergence a near-tie (the
reference rated the DCP token within a tie tolerance of its own). The tolerances are
``LOGPROB_TOL`` and ``NEAR_TIE``, or ``BASELINE_FACTOR`` times what a no-DCP baseline moves
where the case runs one and that is more: dcp=1 on SGLang's triton attention backend (another
attention kernel, another rounding, no DCP). bf16 rounding in attention moves a random
top-2 MoE much further than a dense model, because it can flip a token's expert choice
(``benchmark/dcp/bf16_sensitivity.py`` measures this on CPU). Results go to
``$DCP_RESULTS_DIR/e2e_<case>.json``. ``DCP_COMM=lse`` runs the DCP engines with
``--dcp-comm lse`` instead of a2a (results in ``e2e_<case>-lse.json``).
"""

import dataclasses
import json
import os
import random
from typing import List, Optional

import pytest
import torch

from sglang_dcp.test.engine_compare import compare, mixed_scenario, run_engine
from sglang_dcp.test.models import write_kv_cache_scales, write_random_gqa_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs"),
]

VOCAB_SIZE = 4096
NUM_LAYERS = 4
MAX_NEW_TOKENS = 16
# bf16 weights, activations and KV: DCP changes the summation order of the softmax
# (a split over D shards plus an fp32 LSE merge), so near-tied logits can flip.
LOGPROB_TOL = 0.1
NEAR_TIE = 0.1
# DCP may move a model at most this many times as far as the no-DCP baseline moves it
# (bf16_sensitivity.py on CPU, 8192 positions: DCP's split arithmetic moved each model 0.75x-0.96x
# as far as a no-DCP rounding change did; a maximum over few requests is noisy, hence 2)
BASELINE_FACTOR = 2.0


@dataclasses.dataclass
class Case:
    tp_size: int
    num_kv_heads: int
    architecture: str
    page_size: int
    num_short: int  # prompts of 1..512 tokens
    num_medium: int  # prompts of 1k..8k tokens
    long: List[int]  # prompt lengths above 8k
    graph_modes: List[bool]  # DCP runs with decode CUDA graphs on / off
    noise_baseline: bool  # also dcp=1 on the triton attention backend: bf16 flips without DCP
    experts_per_token: int = 2  # Qwen3-MoE only
    # FP8 KV cache: the reference stores unscaled (stock SGLang reads no --quantization-param-path
    # scale back), DCP with this scale on every layer, a power of two: the same values
    fp8_kv_scale: Optional[float] = None

    def prompt_lengths(self, seed=0):
        rng = random.Random(seed)
        short = [rng.randint(1, 512) for _ in range(self.num_short)]
        medium = [rng.randint(1024, 8192) for _ in range(self.num_medium)]
        return short + medium + self.long


CASES = {
    "tp2-kv1": Case(2, 1, "Qwen3ForCausalLM", 1, 48, 13, [16384, 24576, 32000], [True, False], True),
    "tp4-kv2": Case(4, 2, "Qwen3ForCausalLM", 1, 48, 13, [16384, 24576, 32000], [True, False], False),
    "tp2-llama-page16": Case(2, 1, "LlamaForCausalLM", 16, 24, 6, [16384], [True], False),
    "tp2-qwen3moe-page16": Case(2, 1, "Qwen3MoeForCausalLM", 16, 24, 6, [16384], [True], True),
    "tp2-fp8-kv": Case(2, 1, "Qwen3ForCausalLM", 1, 24, 6, [16384], [True, False], False, fp8_kv_scale=0.5),
}


def engine_kwargs(case: Case, graphs: bool):
    return dict(
        tp_size=case.tp_size,
        page_size=case.page_size,
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
        **({"kv_cache_dtype": "fp8_e4m3"} if case.fp8_kv_scale else {}),
    )


@pytest.mark.parametrize("name", list(CASES))
def test_dcp2_matches_tp(tmp_path, name):
    case = CASES[name]
    if torch.cuda.device_count() < case.tp_size:
        pytest.skip(f"needs {case.tp_size} GPUs")
    model = write_random_gqa_model(
        str(tmp_path / "model"),
        num_attention_heads=16 * case.num_kv_heads,
        num_key_value_heads=case.num_kv_heads,
        head_dim=128,
        hidden_size=1024,
        num_hidden_layers=NUM_LAYERS,
        intermediate_size=2048,
        vocab_size=VOCAB_SIZE,
        architecture=case.architecture,
        torch_dtype="bfloat16",
        max_position_embeddings=40960,
        initializer_range=0.1,
        experts_per_token=case.experts_per_token,
    )
    scenario = mixed_scenario(VOCAB_SIZE, case.prompt_lengths(), MAX_NEW_TOKENS)
    reference = run_engine(model, scenario, dcp_size=1, **engine_kwargs(case, graphs=True))
    results = {"case": name, **dataclasses.asdict(case), "num_requests": len(reference.results),
               "reference_capacity": reference.capacity}
    failures = []
    logprob_tol, tie_tol = LOGPROB_TOL, NEAR_TIE
    dcp_kwargs = {}
    if case.fp8_kv_scale:
        dcp_kwargs["quantization_param_path"] = write_kv_cache_scales(
            str(tmp_path / "kv_scales.json"), case.fp8_kv_scale, case.tp_size, NUM_LAYERS, "qwen3")
    runs = [("dcp2-graphs" if graphs else "dcp2-eager", 2, {**engine_kwargs(case, graphs), **dcp_kwargs})
            for graphs in case.graph_modes]
    if case.noise_baseline:  # first: it sets the tolerances
        runs.insert(0, ("dcp1-triton", 1, {**engine_kwargs(case, graphs=True), "attention_backend": "triton"}))
    dcp_comm = os.environ.get("DCP_COMM", "a2a")
    results["dcp_comm"] = dcp_comm
    for label, dcp_size, kwargs in runs:
        candidate = run_engine(model, scenario, dcp_size=dcp_size, dcp_comm=dcp_comm, **kwargs)
        agreement = compare(reference, candidate)
        results[label] = {
            "capacity": candidate.capacity,
            "capacity_ratio": candidate.capacity / reference.capacity,
            "identical_fraction": agreement.identical_fraction,
            "max_logprob_diff": agreement.max_logprob_diff,
            "max_divergence_gap": agreement.max_divergence_gap,
        }
        print(name, label, results[label], flush=True)
        if dcp_size == 1:
            logprob_tol = max(LOGPROB_TOL, BASELINE_FACTOR * agreement.max_logprob_diff)
            tie_tol = max(NEAR_TIE, BASELINE_FACTOR * agreement.max_divergence_gap)
            continue
        if candidate.capacity != 2 * reference.capacity:
            failures.append(f"{label}: capacity {candidate.capacity} != 2 x {reference.capacity}")
        if agreement.max_logprob_diff > logprob_tol:
            failures.append(f"{label}: logprob diff {agreement.max_logprob_diff:.4f} > {logprob_tol:.4f}")
        if agreement.max_divergence_gap > tie_tol:
            failures.append(f"{label}: a greedy divergence {agreement.max_divergence_gap:.4f} from a tie "
                            f"(> {tie_tol:.4f})")
    results["tolerances"] = {"logprob": logprob_tol, "near_tie": tie_tol}
    out_dir = os.environ.get("DCP_RESULTS_DIR")
    if out_dir:
        suffix = "" if dcp_comm == "a2a" else f"-{dcp_comm}"
        with open(os.path.join(out_dir, f"e2e_{name}{suffix}.json"), "w") as f:
            json.dump(results, f, indent=1)
    assert not failures, failures
